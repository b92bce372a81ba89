"""`python -m runner.merge OUT SHARD_DIR...`: join the run dirs of a sharded replay into one.

The shards must be one replay cut in pieces: the same inputs (sha256) and config but for
`shard.index`, every index of `shard.count` present once, each run completed. Merge reads the
inputs again (refusing them if their sha256 is not the manifests') and checks that each shard holds
exactly the conversations its index owns, each once, in input order, each record as the run wrote
it (its sha256 in the shard's summary.json). OUT gets one chats file per input, in input order, as a
single run would have written it, plus the union of rejected lines, a manifest and a summary.

Memory holds where each input conversation is and one record per shard at a time, never the
conversations or the records: the checks stream through each shard's files, and the merged files
are written by interleaving the shards' (each already in input order).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from runner.config.schema import InputFormat
from runner.errors import RunnerError
from runner.inputs.conversation import Conversation
from runner.inputs.reader import scan_conversations
from runner.rundir.layout import MANIFEST, REJECTED, SUMMARY, chat_paths
from runner.rundir.reader import Run, iter_records
from runner.rundir.resume import file_sha256
from runner.rundir.summary import Summary
from runner.rundir.writer import record_sha256, write_json_atomically, write_jsonl_atomically

SHOWN_PROBLEMS = 20  # a refusal lists at most this many problems, then counts the rest

Key = tuple[str, int]  # (str(id), sample): one record of a run


class Place(NamedTuple):
    """Where an input conversation is, and which shard owns it (its ordinal modulo shard.count)."""

    id: str
    source: Path
    line: int
    ordinal: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Shard:
    """A shard's run dir with what it says of itself."""

    path: Path
    manifest: dict[str, Any]
    summary: Summary

    @classmethod
    def read(cls, path: Path) -> Shard:
        run = Run(path)
        for name in (MANIFEST, SUMMARY):
            if not (path / name).is_file():
                raise RunnerError(f"{path / name} is missing: is {path} a run dir of a finished shard?")
        assert run.manifest is not None and run.summary is not None
        try:
            for key in ("index", "count"):
                int(run.manifest["config"]["shard"][key])
            list(run.manifest["inputs"])
        except (KeyError, TypeError, ValueError):
            raise RunnerError(f"{path / MANIFEST}: not a run manifest (no config.shard or inputs)") from None
        return cls(path, run.manifest, run.summary)

    @property
    def index(self) -> int:
        return self.manifest["config"]["shard"]["index"]


def merge(shard_dirs: list[Path], out: Path) -> Summary:
    """Check that the shards make one whole replay, then write it to `out`; return its summary."""
    shards = [Shard.read(path) for path in shard_dirs]
    _check_shards(shards)
    if out.exists() and not out.is_dir():
        raise RunnerError(f"{out}: exists and is not a directory: merge into a new directory")
    if out.exists() and any(out.iterdir()):
        raise RunnerError(f"{out} is not empty: merge into a new directory")
    files, places = _validated_input(shards[0])
    count = shards[0].manifest["config"]["shard"]["count"]
    owned: dict[int, list[Place]] = defaultdict(list)
    for place in places:
        owned[place.ordinal % count].append(place)
    del places
    problems: list[str] = []
    parts: dict[str, list[Path]] = defaultdict(list)  # merged chats file -> the shards' files of it
    for shard in shards:
        for name, path in _verified_files(shard, files, owned.pop(shard.index, []), problems).items():
            parts[name].append(path)
    if problems:
        shown = problems[:SHOWN_PROBLEMS]
        if len(problems) > SHOWN_PROBLEMS:
            shown.append(f"... and {len(problems) - SHOWN_PROBLEMS} more")
        raise RunnerError("cannot merge:\n  " + "\n  ".join(shown))

    rejected = {
        (reject["file"], reject["line"]): reject for shard in shards for reject in _rejects(shard.path)
    }
    manifest = shards[0].manifest
    config = {**manifest["config"], "shard": {"index": 0, "count": 1}}
    made = [path for path in (out, *out.parents) if not path.exists()]
    digests: dict[str, list[str]] = {}
    try:
        (out / "chats").mkdir(parents=True, exist_ok=True)
        for name, paths in parts.items():
            digests[name] = []
            write_jsonl_atomically(out / name, _digested(_interleaved(paths), digests[name]))
        if rejected:
            write_jsonl_atomically(out / REJECTED, [rejected[key] for key in sorted(rejected)])
        summary = _merged_summary(shards, digests, list(rejected.values()))
        write_json_atomically(out / MANIFEST, {"config": config, "inputs": manifest["inputs"]})
        write_json_atomically(out / SUMMARY, summary.to_json())
    except (OSError, RunnerError) as error:
        _remove_written(out, made)
        if isinstance(error, RunnerError):
            raise
        raise RunnerError(f"{error.filename or out}: {error.strerror or error}") from None
    return summary


def _order(record: dict[str, Any]) -> tuple[int, int]:
    """A record's place in its chats file: its input line, then its sample."""
    return record["replay"]["line"], record["replay"]["sample"]


def _interleaved(paths: list[Path]) -> Iterator[dict[str, Any]]:
    """The records of the shards' files of one chats file, in input order (each file is already)."""
    return heapq.merge(*(iter_records(path) for path in paths), key=_order)


def _digested(records: Iterator[dict[str, Any]], digests: list[str]) -> Iterator[dict[str, Any]]:
    for record in records:
        digests.append(record_sha256(record))
        yield record


def _remove_written(out: Path, made: list[Path]) -> None:
    """Leave no half-merged run: what this merge wrote into `out` (which was empty), and the
    directories it made."""
    if out.is_dir():
        for path in out.iterdir():
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    for directory in made:  # innermost first
        with contextlib.suppress(OSError):
            directory.rmdir()


def _merged_summary(
    shards: list[Shard], digests: dict[str, list[str]], rejected: list[dict[str, Any]]
) -> Summary:
    """A single run's summary for the whole replay: the first shard's setup, everything counted
    summed over the shards, the largest peak memory, and the merged files' record digests."""
    summaries = [shard.summary for shard in shards]
    first = summaries[0]

    def total(name: str) -> Counter[str]:
        return sum((Counter(getattr(s, name)) for s in summaries), Counter())

    peaks = [s.peak_memory for s in summaries if s.peak_memory is not None]
    order = [name for name in first.chat_files if name in digests] + sorted(
        set(digests) - set(first.chat_files)
    )
    return dataclasses.replace(
        first,
        status="merged",
        error=None,
        conversations=sum(s.conversations or 0 for s in summaries),
        rejected=dict(Counter(reject["code"] for reject in rejected)),
        records=sum(len(written) for written in digests.values()),
        records_kept_from_before=0,
        turns=sum(s.turns for s in summaries),
        errors=dict(total("errors")),
        prompt_tokens=sum(s.prompt_tokens for s in summaries),
        generated_tokens=sum(s.generated_tokens for s in summaries),
        finish_reasons=dict(total("finish_reasons")),
        load_seconds=None,
        replay_seconds=None,
        wall_seconds=None,
        tokens_per_second=None,
        turn_seconds=None,
        first_token_seconds=None,
        roofline=None,
        peak_memory=max(peaks, key=lambda peak: peak.bytes or 0) if peaks else None,
        chat_files=order,
        record_sha256={name: digests[name] for name in order},
        shards=[str(shard.path) for shard in shards],
    )


def _check_shards(shards: list[Shard]) -> None:
    """One full set of indices of one run, each completed."""
    problems = []
    first = shards[0]
    counts = {shard.manifest["config"]["shard"]["count"] for shard in shards}
    indices = sorted(shard.index for shard in shards)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        problems.append(f"shards are not one full set: shard.count {sorted(counts)}, shard.index {indices}")
    for shard in shards:
        if shard.summary.status != "completed":
            problems.append(f"{shard.path} is incomplete (status {shard.summary.status!r}): resume it first")
        if shard.manifest["inputs"] != first.manifest["inputs"]:
            problems.append(f"{shard.path} replayed other inputs than {first.path} (paths or sha256 differ)")
        if {**shard.manifest["config"], "shard": None} != {**first.manifest["config"], "shard": None}:
            problems.append(f"{shard.path} ran another config than {first.path}")
    if problems:
        raise RunnerError("cannot merge:\n  " + "\n  ".join(problems))


def _validated_input(shard: Shard) -> tuple[list[Path], list[Place]]:
    """The run's input files, and where each valid conversation of them is, read and validated again
    as the run did (in one streaming pass) once their sha256 is checked against the manifest's:
    which conversation each shard owns comes from them, not from the shards."""
    files = []
    for entry in shard.manifest["inputs"]:
        path = Path(entry["path"])
        if not path.is_file():
            raise RunnerError(
                f"cannot merge: input {path} (named in {shard.path / MANIFEST}) is not found from "
                f"{Path.cwd()}: merge reads the input again to check what each shard holds; run it where "
                "the shards ran"
            )
        if file_sha256(path) != entry["sha256"]:
            raise RunnerError(
                f"cannot merge: input {path} changed since the shards ran (its sha256 is not the one in "
                f"{shard.path / MANIFEST})"
            )
        files.append(path)
    settings = shard.manifest["config"]["input"]
    scanned = scan_conversations(files, InputFormat(settings["format"]), settings["max_line_bytes"])
    places = [
        Place(str(item.id), item.source, item.line, item.ordinal)
        for item in scanned
        if isinstance(item, Conversation)
    ]
    return files, places


def _verified_files(
    shard: Shard, files: list[Path], owned: list[Place], problems: list[str]
) -> dict[str, Path]:
    """The shard's chats files by name (relative to the run dir), each read through once; each
    problem found is appended to `problems`, naming the shard's file, line and conversation."""
    config = shard.manifest["config"]
    count, samples = config["shard"]["count"], config["generation"]["num_samples"]
    refused = {(reject["file"], reject["line"]) for reject in _rejects(shard.path)}
    paths = chat_paths(shard.path, files)
    names = {source: str(path.relative_to(shard.path)) for source, path in paths.items()}
    expected: dict[str, dict[Key, Place]] = {name: {} for name in names.values()}
    for place in owned:
        if (str(place.source), place.line) not in refused:
            for sample in range(samples):
                expected[names[place.source]][(place.id, sample)] = place
    for stray in sorted(set((shard.path / "chats").glob("*.jsonl")) - {shard.path / n for n in expected}):
        problems.append(f"{stray} is no chats file of this run's inputs")

    digests = shard.summary.record_sha256
    if not digests and any(expected.values()):
        problems.append(f"{shard.path / 'summary.json'} holds no record digests: cannot verify {shard.path}")
    held: dict[str, Path] = {}
    for name, wanted in expected.items():
        path = shard.path / name
        if not path.exists():
            if wanted:
                problems.append(f"{path} is missing: it should hold {_listed(wanted)}")
            continue
        written = set(digests.get(name, ()))
        seen: dict[Key, int] = {}
        last = (-1, -1)
        try:
            for line, record in enumerate(iter_records(path), start=1):
                key = (str(record.get("id")), record.get("replay", {}).get("sample"))
                where = f"{path}:{line}: conversation {key[0]!r} (sample {key[1]})"
                if key not in wanted:
                    problems.append(f"{where} is not one that shard.index {shard.index} of {count} owns")
                elif key in seen:
                    problems.append(f"{where} is held twice (first at line {seen[key]})")
                elif record_sha256(record) not in written:
                    problems.append(f"{where} is not as the run wrote it (sha256 not in summary.json)")
                elif _order(record) < last:
                    problems.append(f"{where} is out of input order (a run writes its records in it)")
                else:
                    last = _order(record)
                seen.setdefault(key, line)
        except RunnerError as error:
            problems.append(str(error))
            continue
        missing = {key: place for key, place in wanted.items() if key not in seen}
        if missing:
            problems.append(f"{path} is short: it lacks {_listed(missing)}")
        held[name] = path
    return held


def _listed(keys: dict[Key, Place], shown: int = 5) -> str:
    """'3 records: 'q1' (sample 0, in.jsonl:1), ...'"""
    listed = [f"{key[0]!r} (sample {key[1]}, {c.where})" for key, c in list(keys.items())[:shown]]
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} record(s): {', '.join(listed)}{more}"


def _rejects(shard: Path) -> list[dict[str, Any]]:
    return Run(shard).rejects()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.merge", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new directory for the merged run")
    parser.add_argument("shards", type=Path, nargs="+", help="the shard run dirs")
    args = parser.parse_args(argv)
    try:
        summary = merge(args.shards, args.out)
    except RunnerError as error:
        sys.exit(f"error: {error}")
    print(f"merged {len(args.shards)} shards: {summary.records} records in {args.out}")


if __name__ == "__main__":
    main()
