"""Scale check on a large input: time to the first record and peak RSS of a run on one shard,
and the time and peak RSS of `plan=true` on the whole file.

    python benchmarks/scale.py --input /tmp/1m.jsonl --shard-counts 10000,1000 --plan

The input is written first by benchmarks/make_sharegpt.py when it does not exist. Each run is a
real `python -m runner` on the embedded model with tiny generation, stopped by SIGTERM once its
first record is on disk; peak RSS is the child's own (model included).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(overrides: list[str], *, first_record: bool) -> tuple[float, float]:
    """(seconds to the first record, or to the end; peak RSS in GB) of one runner process."""
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        command = [sys.executable, "-m", "runner", *overrides, f"hydra.run.dir={run_dir}"]
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        seconds = None
        while first_record and process.poll() is None:
            chats = list((run_dir / "chats").glob("*.jsonl")) if (run_dir / "chats").is_dir() else []
            if any(b"\n" in path.read_bytes()[: 1 << 20] for path in chats):
                seconds = time.perf_counter() - started
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = seconds or time.perf_counter() - started
        if (
            first_record
            and status
            and not os.WIFSIGNALED(status)
            and os.waitstatus_to_exitcode(status) not in (0, 1)
        ):
            sys.exit(process.stderr.read().decode()[-3000:])
        return seconds, usage.ru_maxrss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument(
        "--conversations", type=int, default=1_000_000, help="written when --input is missing"
    )
    parser.add_argument("--shard-counts", default="10000,1000")
    parser.add_argument("--plan", action="store_true", help="also time plan=true on the whole file")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="a runner override for every run, e.g. engine.kv_cache_gb=0.4",
    )
    args = parser.parse_args()
    if not args.input.exists():
        subprocess.run(
            [
                sys.executable,
                HERE / "make_sharegpt.py",
                args.input,
                "--conversations",
                str(args.conversations),
            ],
            check=True,
        )
    lines = sum(1 for _ in args.input.open("rb"))
    print(f"input: {args.input}, {lines} lines, {args.input.stat().st_size / 1e9:.2f} GB")
    common = [f"input.path={args.input}", "generation.max_new_tokens=4", *args.override]
    print(f"overrides: {' '.join(common[1:])}")
    for count in (int(c) for c in args.shard_counts.split(",") if c):
        seconds, rss = measure([*common, f"shard.count={count}", "shard.index=0"], first_record=True)
        print(
            f"shard 0 of {count} ({lines // count} conversations): first record {seconds:.1f} s, "
            f"peak RSS {rss:.2f} GB"
        )
    if args.plan:
        seconds, rss = measure([*common, "plan=true"], first_record=False)
        print(f"plan=true, whole file: {seconds:.1f} s, peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
