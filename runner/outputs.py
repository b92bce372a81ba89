"""The run directory: chats written append-and-flush as they complete, summary.json, environment.

Layout (Hydra writes `.hydra/` and `chat-runner.log` beside these):
    chats/<input-file-stem>.jsonl   one completed conversation a line, in input order
    manifest.json                   the config and the input files' sha256, checked by resume
    .lock                           held (flock) by the one process writing the dir; says its pid and host
    rejected.jsonl                  bad input lines, with input.on_error=skip
    summary.json                    config choices, counts, speed, memory, versions, hardware
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import resource
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonlines
from omegaconf import OmegaConf

from runner.errors import InputError, RunnerError
from runner.replay import ReplayedConversation

PACKAGES = (
    "chat-runner",
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "hydra-core",
    "omegaconf",
    "gguf",
    "tokenizers",
)

MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
LOCK = ".lock"

log = logging.getLogger(__name__)

_claimed_dirs: dict[str, str] = {}


def unique_dir(base: str) -> str:
    """Hydra resolver for the run dir: `base`, or `base-1`, `base-2`... if another run holds it.

    `mkdir` claims a directory atomically, so two runs started in the same second never share one;
    the answer is remembered so that every resolution in this process agrees.
    """
    if base not in _claimed_dirs:
        for suffix in ("", *(f"-{n}" for n in range(1, 10_000))):
            candidate = Path(base + suffix)
            candidate.parent.mkdir(parents=True, exist_ok=True)
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            _claimed_dirs[base] = str(candidate)
            break
    return _claimed_dirs[base]


LATEST_RUN = Path("outputs/latest")  # -> the newest run dir under outputs/ (relative to the cwd)
LATEST_SWEEP = Path("outputs/multirun/latest")  # -> the newest sweep dir under outputs/multirun/


def point_latest(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (replaced atomically), when `target` lies in the link's
    directory tree: `outputs/latest` follows the default run dirs, not a run put elsewhere."""
    target, home = target.resolve(), link.parent.resolve()
    if home not in target.parents:
        return
    scratch = link.with_name(f".{link.name}.{os.getpid()}")
    try:
        scratch.unlink(missing_ok=True)
        scratch.symlink_to(target.relative_to(home), target_is_directory=True)
        os.replace(scratch, link)
    except OSError as error:  # a convenience: never a reason to stop a run
        log.warning("could not point %s at %s: %s", link, target, error)
        scratch.unlink(missing_ok=True)


def safe_name(text: str, limit: int = 200) -> str:
    """Hydra resolver for sweep job dirs: overrides as a name of [A-Za-z0-9._=,+-] only."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:limit] or "defaults"


def register_resolvers() -> None:
    """The run dir's resolvers (`unique_dir`, `safe_name`), for the CLI and the Python API alike."""
    for name, resolver in (("unique_dir", unique_dir), ("safe_name", safe_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def chat_paths(run_dir: Path, files: Iterable[Path]) -> dict[Path, Path]:
    """Map each input file to `chats/<stem>.jsonl`; two inputs may not share a stem."""
    paths: dict[Path, Path] = {}
    owners: dict[str, Path] = {}
    problems = []
    for source in files:
        if source.stem in owners:
            problems.append(
                f"{source}: same file name as {owners[source.stem]}; both would write "
                f"chats/{source.stem}.jsonl (rename one, or run them separately)"
            )
        owners[source.stem] = source
        paths[source] = run_dir / "chats" / f"{source.stem}.jsonl"
    if problems:
        raise InputError(problems)
    return paths


def chat_record(replayed: ReplayedConversation, chat_template_sha256: str) -> dict[str, Any]:
    """One output line: id, the input's other keys, the full messages, and replay metadata."""
    conversation = replayed.conversation
    return {
        "id": conversation.id,
        **conversation.extra,
        "messages": [message.as_dict() for message in replayed.messages],
        "replay": {
            "line": conversation.line,
            "sample": replayed.sample,
            "seed": replayed.seed,
            "system_folded": replayed.system_folded,
            "chat_template_sha256": chat_template_sha256,
            "error": None
            if replayed.error is None
            else {"code": replayed.error.code, "message": replayed.error.message, **replayed.error.details},
            "turns": [
                {
                    "message_index": turn.message_index,
                    "prompt_tokens": turn.prompt_tokens,
                    "new_tokens": turn.new_tokens,
                    "seconds": round(turn.seconds, 4),
                    "first_token_seconds": round(turn.first_token_seconds, 4),
                    "finish_reason": turn.finish_reason,
                    "reference": turn.reference,
                    "control_tokens_in_content": turn.control_tokens_in_content,
                }
                for turn in replayed.turns
            ],
        },
    }


class RunDirLock:
    """One writer per run dir: an exclusive `flock` on `<run dir>/.lock`, held for the run's whole
    life. The OS drops it when the process ends, however it ends, so a killed run never leaves
    its dir locked; a second run or resume of a held dir is refused at once, naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._descriptor: int | None = None

    def __enter__(self) -> RunDirLock:
        descriptor = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 4096).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            raise RunnerError(
                f"{self.run_dir} is in use by {holder}: one process writes a run dir at a time; wait for "
                "it to end (or stop it), or pick another hydra.run.dir"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._descriptor = descriptor
        return self

    def __exit__(self, *exc: object) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # releases the lock
            self._descriptor = None


def record_sha256(record: dict[str, Any]) -> str:
    """A record's digest: sha256 over its canonical JSON (sorted keys, no spaces, UTF-8), so that
    rewriting a file (resume's repair) keeps it and any edit of a value changes it."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ChatWriter:
    """Appends each record to its chats file as one write, then fsyncs: a crash loses at most the
    conversation in flight, and a line is either whole or the torn tail that resume cuts off.

    `digests` holds each chats file's record digests in file order, as written (records kept from
    an earlier session first, given by `keep`): summary.json records them, and merge checks them.
    """

    def __init__(self, paths: dict[Path, Path]):
        self._paths = paths
        self._files: dict[Path, int] = {}
        self.digests: dict[Path, list[str]] = {path: [] for path in paths.values()}

    def keep(self, path: Path, record: dict[str, Any]) -> None:
        """Count a record an earlier session of this run wrote to `path`."""
        self.digests[path].append(record_sha256(record))

    def write(self, source: Path, record: dict[str, Any]) -> None:
        path = self._paths[source]
        if source not in self._files:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[source] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        descriptor = self._files[source]
        end = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            written = os.write(descriptor, data)
            while written < len(data):  # only a full disk makes a regular file take less
                written += os.write(descriptor, data[written:])
            os.fsync(descriptor)
        except OSError as error:
            os.ftruncate(descriptor, end)  # leave whole records only
            raise RunnerError(f"could not write {path}: {error.strerror or error}") from error
        self.digests[path].append(record_sha256(record))

    def close(self) -> None:
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()

    def __enter__(self) -> ChatWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    _write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomically(path: Path, records: list[dict[str, Any]]) -> None:
    """A whole JSONL file, written like `write_json_atomically`."""
    _write_atomically(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _write_atomically(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with scratch.open("w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(scratch, path)
    except OSError as error:
        raise RunnerError(f"could not write {path}: {error.strerror or error}") from error
    finally:
        scratch.unlink(missing_ok=True)


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


def completed_records(path: Path) -> list[dict[str, Any]]:
    """The whole records of a chats file left by an interrupted run.

    A torn last line (a crash mid-write) is moved aside to `<file>.corrupt-<offset>` and cut off,
    so that its conversation is generated again, once.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        path.with_name(f"{path.name}.corrupt-{whole}").write_bytes(data[whole:])
        with path.open("r+b") as stream:
            stream.truncate(whole)
            os.fsync(stream.fileno())
    return read_records(path)


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


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file the runner wrote; anything but whole records is an error."""
    try:
        with jsonlines.open(path) as reader:
            return list(reader)
    except jsonlines.InvalidLineError as error:
        raise RunnerError(f"{path}:{error.lineno}: not a whole JSON record") from None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment() -> dict[str, Any]:
    """Package versions, hardware and git revision: what a colleague needs to reproduce a run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "git_revision": _git_revision(),
    }


def _git_revision() -> str | None:
    """The project's commit (with "+dirty" for local changes), or None outside a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
