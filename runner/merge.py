"""`python -m runner.merge OUT SHARD_DIR...`: join the run dirs of a sharded replay into one.

The shards must be one replay cut in pieces: the same inputs (sha256) and config but for
`shard.index`, every index of `shard.count` present once, each run completed, no conversation in
two shards. OUT gets one chats file per input, in input order, as a single run would have written
it, plus the union of rejected lines, a manifest and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.outputs import (
    MANIFEST,
    REJECTED,
    read_records,
    write_json_atomically,
    write_jsonl_atomically,
)


def merge(shard_dirs: list[Path], out: Path) -> dict[str, Any]:
    """Check that the shards make one whole replay, then write it to `out`; return its summary."""
    manifests = [_read_json(shard / MANIFEST) for shard in shard_dirs]
    summaries = [_read_json(shard / "summary.json") for shard in shard_dirs]
    _check_shards(shard_dirs, manifests, summaries)

    by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
    owner: dict[tuple[str, int], Path] = {}
    for shard in shard_dirs:
        for path in sorted((shard / "chats").glob("*.jsonl")):
            for record in read_records(path):
                key = (str(record["id"]), record["replay"]["sample"])
                if key in owner:
                    raise RunnerError(
                        f"conversation {key[0]!r} (sample {key[1]}) is in both {owner[key]} and {shard}"
                    )
                owner[key] = shard
                by_file[path.name].append(record)
    if out.exists() and any(out.iterdir()):
        raise RunnerError(f"{out} is not empty: merge into a new directory")
    (out / "chats").mkdir(parents=True, exist_ok=True)
    for name, records in by_file.items():
        records.sort(key=lambda record: (record["replay"]["line"], record["replay"]["sample"]))
        write_jsonl_atomically(out / "chats" / name, records)
    rejected = {
        (reject["file"], reject["line"]): reject
        for shard in shard_dirs
        if (shard / REJECTED).exists()
        for reject in read_records(shard / REJECTED)
    }
    if rejected:
        write_jsonl_atomically(out / REJECTED, [rejected[key] for key in sorted(rejected)])
    config = {**manifests[0]["config"], "shard": {"index": 0, "count": 1}}
    write_json_atomically(out / MANIFEST, {"config": config, "inputs": manifests[0]["inputs"]})
    summary = {
        "status": "merged",
        "shards": [str(shard) for shard in shard_dirs],
        "records": sum(len(records) for records in by_file.values()),
        "rejected": len(rejected),
        "turns": sum(s["turns"] for s in summaries),
        "generated_tokens": sum(s["generated_tokens"] for s in summaries),
        "chat_files": [f"chats/{name}" for name in sorted(by_file)],
    }
    write_json_atomically(out / "summary.json", summary)
    return summary


def _check_shards(shard_dirs: list[Path], manifests: list[dict], summaries: list[dict]) -> None:
    problems = []
    counts = {manifest["config"]["shard"]["count"] for manifest in manifests}
    indices = sorted(manifest["config"]["shard"]["index"] for manifest in manifests)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        problems.append(f"shards are not one full set: shard.count {sorted(counts)}, shard.index {indices}")
    for shard, manifest, summary in zip(shard_dirs, manifests, summaries, strict=True):
        if summary.get("status") != "completed":
            problems.append(f"{shard} is incomplete (status {summary.get('status')!r}): resume it first")
        if manifest["inputs"] != manifests[0]["inputs"]:
            problems.append(f"{shard} replayed other inputs than {shard_dirs[0]} (paths or sha256 differ)")
        config = {**manifest["config"], "shard": None}
        if config != {**manifests[0]["config"], "shard": None}:
            problems.append(f"{shard} ran another config than {shard_dirs[0]}")
    if problems:
        raise RunnerError("cannot merge:\n  " + "\n  ".join(problems))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RunnerError(f"{path} is missing: is {path.parent} a run dir of a finished shard?")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.merge", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new directory for the merged run")
    parser.add_argument("shards", type=Path, nargs="+", help="the shard run dirs")
    args = parser.parse_args(argv)
    try:
        summary = merge(args.shards, args.out)
    except RunnerError as error:
        sys.exit(f"error: {error}")
    print(f"merged {len(args.shards)} shards: {summary['records']} records in {args.out}")


if __name__ == "__main__":
    main()
