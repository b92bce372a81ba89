"""What a run is made of (the manifest), and what an interrupted run left: resume checks the
manifest, cuts a torn last line, and keeps each complete record once, in input order."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from runner.errors import RunnerError
from runner.rundir.layout import MANIFEST
from runner.rundir.reader import iter_records, read_records
from runner.rundir.writer import write_jsonl_atomically

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(config: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    """What a run is made of, so that resume can refuse to mix two different runs in one dir."""
    return {
        "config": config,
        "inputs": [{"path": str(path), "sha256": file_sha256(path)} for path in files],
    }


def check_resumable(run_dir: Path, expected: dict[str, Any]) -> None:
    """Refuse to resume into `run_dir` unless its manifest matches this run's config and inputs."""
    path = run_dir / MANIFEST
    recorded = json.loads(path.read_text(encoding="utf-8"))
    differences = [
        f"config {key}: {old!r} then, {new!r} now"
        for key, old, new in _changed(recorded["config"], expected["config"])
    ]
    if [i["path"] for i in recorded["inputs"]] != [i["path"] for i in expected["inputs"]]:
        differences.append(
            f"input files: {[i['path'] for i in recorded['inputs']]} then, "
            f"{[i['path'] for i in expected['inputs']]} now"
        )
    else:
        differences += [
            f"input {old['path']} changed (sha256 {old['sha256'][:12]}... then, {new['sha256'][:12]}... now)"
            for old, new in zip(recorded["inputs"], expected["inputs"], strict=True)
            if old["sha256"] != new["sha256"]
        ]
    if differences:
        shown = "\n  ".join(differences)
        raise RunnerError(f"cannot resume {run_dir}: this run differs from the one there:\n  {shown}")


def _changed(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            change
            for name in sorted(set(old) | set(new))
            for change in _changed(old.get(name), new.get(name), f"{key}.{name}" if key else name)
        ]
    return [] if old == new else [(key, old, new)]


def cut_torn_tail(path: Path) -> None:
    """A torn last line (a crash mid-write) is moved aside to `<file>.corrupt-<offset>` and cut off,
    so that its conversation is generated again, once."""
    with path.open("r+b") as stream:
        whole, size = _whole_length(stream), stream.seek(0, os.SEEK_END)
        if whole < size:
            stream.seek(whole)
            path.with_name(f"{path.name}.corrupt-{whole}").write_bytes(stream.read())
            stream.truncate(whole)
            os.fsync(stream.fileno())


def _whole_length(stream: BinaryIO) -> int:
    """The bytes up to and including the file's last newline, read from its end a MiB at a time."""
    position = stream.seek(0, os.SEEK_END)
    while position > 0:
        start = max(0, position - (1 << 20))
        stream.seek(start)
        newline = stream.read(position - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


@dataclass(frozen=True)
class KeptRecords:
    """The complete records an earlier session left in one chats file, each once and in input
    order; iterating reads them one at a time."""

    path: Path
    count: int

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter_records(self.path)


def kept_records(path: Path, order: dict[tuple[str, int], int]) -> KeptRecords:
    """A chats file an interrupted session left, made whole (a torn tail cut) and checked in one
    streaming pass; rewritten (`repair_order`, records in memory) only where it needs it."""
    cut_torn_tail(path)
    count, last, in_order = 0, -1, True
    for record in iter_records(path):
        place = order.get((str(record["id"]), record["replay"]["sample"]), -1)
        in_order = in_order and place > last  # unknown, repeated or out of order: repair
        count, last = count + 1, place
    if not in_order:
        count = len(repair_order(path, read_records(path), order))
    return KeptRecords(path, count)


def repair_order(
    path: Path, records: list[dict[str, Any]], order: dict[tuple[str, int], int]
) -> list[dict[str, Any]]:
    """A chats file's records once each, in input order: duplicates dropped and the order restored
    (rewritten atomically, with a log line); a record of no conversation of this run is refused.

    Args:
        order: (str(id), sample) of each conversation sample of this run -> its place in input order.
    """
    unique: dict[tuple[str, int], dict[str, Any]] = {}
    for line, record in enumerate(records, start=1):
        key = (str(record["id"]), record["replay"]["sample"])
        if key not in order:
            raise RunnerError(
                f"{path}:{line}: record {record['id']!r} (sample {key[1]}) is no conversation of this run's "
                "input: the file was edited or comes from another run; cannot resume into it"
            )
        unique.setdefault(key, record)
    repaired = sorted(unique.values(), key=lambda r: order[(str(r["id"]), r["replay"]["sample"])])
    if repaired != records:
        write_jsonl_atomically(path, repaired)
        log.warning(
            "repaired %s: %d duplicate record(s) dropped, %d record(s) held; input order restored",
            path,
            len(records) - len(unique),
            len(repaired),
        )
    return repaired


def previous_records(
    run_dir: Path,
    paths: dict[Path, Path],
    run_manifest: dict[str, Any],
    order: Callable[[], dict[tuple[str, int], int]],
    *,
    resume: bool,
) -> list[KeptRecords]:
    """What an interrupted session of this run left, when resuming (each record once, in input
    order); refuse to write over a run otherwise. A job SLURM requeued (SLURM_RESTART_COUNT set)
    resumes its own run dir without being asked.

    Args:
        paths: each input file's chats file.
        run_manifest: this run's manifest, which the one in the dir must match.
        order: gives (str(id), sample) of each conversation sample of this run -> its place in
            input order; called only when there are records to put in order.

    Returns what each chats file keeps.
    """
    existing = [path for path in dict.fromkeys(paths.values()) if path.exists()]
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if not resume and restarts and (run_dir / MANIFEST).exists():
        log.info("SLURM requeued this job (restart %d): resuming its run dir %s", restarts, run_dir)
    elif not resume:
        if existing or (run_dir / MANIFEST).exists():
            raise RunnerError(
                f"{run_dir} already holds a run: add resume=true to continue it, or pick a new hydra.run.dir"
            )
        return []
    if not (run_dir / MANIFEST).exists():
        if existing:
            raise RunnerError(f"{run_dir} holds chats but no {MANIFEST}: cannot tell which run wrote them")
        log.info("resume=true: %s holds no records yet, so the run starts from the beginning", run_dir)
        return []
    check_resumable(run_dir, run_manifest)
    places = order() if existing else {}
    return [kept_records(path, places) for path in existing]
