"""Merge at scale: the time and peak RSS of `python -m runner.merge` over the shards of a large input.

    python benchmarks/merge_scale.py --input /tmp/1m.jsonl --shards 10

Replaying a million conversations here would take days, so the shards are written as finished
runs write them without a model: each holds the records its index owns (the input line as it is,
with the `replay` block), a manifest naming the input and its sha256, and a summary with every
record's digest. Merge then does all it does for real shards: reads the input again, checks every
record of every shard, and writes the merged chats file, summary and manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def write_shards(source: Path, count: int, root: Path) -> list[Path]:
    """`count` finished shards of a run over `source` (one sample, every line valid)."""
    from runner.rundir.resume import manifest
    from runner.rundir.writer import record_sha256

    config = {
        "model": {"name": "smollm2_135m"},
        "input": {"format": "auto", "max_line_bytes": 16 * 2**20},
        "generation": {"num_samples": 1},
        "shard": {"index": 0, "count": count},
    }
    shards = [root / f"shard{index}" for index in range(count)]
    streams, digests = [], [[] for _ in shards]
    for index, shard in enumerate(shards):
        (shard / "chats").mkdir(parents=True)
        config["shard"]["index"] = index
        (shard / "manifest.json").write_text(json.dumps(manifest(config, [source])))
        streams.append((shard / "chats" / source.name).open("w", encoding="utf-8"))
    ordinal = 0
    with source.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = {**json.loads(line), "replay": {"line": number, "sample": 0, "turns": []}}
            streams[ordinal % count].write(json.dumps(record, ensure_ascii=False) + "\n")
            digests[ordinal % count].append(record_sha256(record))
            ordinal += 1
    for index, shard in enumerate(shards):
        streams[index].close()
        summary = {
            "status": "completed",
            "conversations": len(digests[index]),
            "turns": len(digests[index]),
            "record_sha256": {f"chats/{source.name}": digests[index]},
        }
        (shard / "summary.json").write_text(json.dumps(summary))
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, required=True, help="e.g. benchmarks/make_sharegpt.py's output")
    parser.add_argument("--shards", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.input.parent) as scratch:
        started = time.perf_counter()
        shards = write_shards(args.input.resolve(), args.shards, Path(scratch))
        print(f"{args.shards} shards written in {time.perf_counter() - started:.0f} s")
        command = [sys.executable, "-m", "runner.merge", str(Path(scratch) / "merged"), *map(str, shards)]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=PROJECT, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        if status:
            sys.exit(process.stderr.read()[-3000:])
        merged = Path(scratch) / "merged" / "chats" / args.input.name
        records = sum(1 for _ in merged.open("rb"))
        print(
            f"merge of {args.shards} shards, {records} records: {time.perf_counter() - started:.1f} s, "
            f"peak RSS {usage.ru_maxrss * 1024 / 1e9:.2f} GB"
        )


if __name__ == "__main__":
    main()
