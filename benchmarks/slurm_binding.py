"""CPU binding on a SLURM node: one job alone against two jobs sharing the node, in one run.

    bash scripts/slurm_cluster.sh start
    .venv/bin/python benchmarks/slurm_binding.py --input ../shared/data/mt_bench_questions.jsonl

Both sweeps go through `hydra/launcher=slurm` with `cpus_per_task` CPUs a job (default 1) on the
same conversations. Each job sizes torch's threads to what it was granted (SLURM_CPUS_PER_TASK),
so on a 2-CPU node two 1-CPU jobs should each keep at least half the speed of one job alone (they
share memory bandwidth, not cores). Prints each job's tokens/s and threads, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def sweep(sweep_dir: Path, source: Path, args: argparse.Namespace, jobs: int) -> list[dict]:
    """A sweep of `jobs` identical jobs (they differ only in generation.seed, unused by greedy)."""
    command = [
        sys.executable,
        "-m",
        "runner",
        "-m",
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={args.partition}",
        "hydra.launcher.gpus_per_node=0",
        f"hydra.launcher.cpus_per_task={args.cpus_per_task}",
        "hydra.launcher.mem_gb=3",
        f"hydra.sweep.dir={sweep_dir}",
        f"input.path={source}",
        f"generation.max_new_tokens={args.new_tokens}",
        f"generation.min_new_tokens={args.new_tokens}",
        "generation.seed=" + ",".join(str(seed) for seed in range(jobs)),
    ]
    subprocess.run(command, cwd=PROJECT, check=True, capture_output=True, text=True)
    summaries = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/summary.json"))]
    assert len(summaries) == jobs and all(s["status"] == "completed" for s in summaries)
    return summaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=PROJECT.parent / "shared/data/mt_bench_questions.jsonl")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--partition", default="debug")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        source = root / "conversations.jsonl"
        lines = args.input.read_text(encoding="utf-8").splitlines()[: args.conversations]
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        alone = sweep(root / "alone", source, args, jobs=1)
        together = sweep(root / "together", source, args, jobs=2)
    base = alone[0]["tokens_per_second"]
    workload = f"{args.conversations} conversations, {args.new_tokens} tokens a reply"
    print(f"{workload}, cpus_per_task={args.cpus_per_task}")
    print(f"alone:    {base:7.1f} tokens/s  (torch threads {alone[0]['environment']['torch_threads']})")
    for number, summary in enumerate(together):
        speed = summary["tokens_per_second"]
        threads = summary["environment"]["torch_threads"]
        ratio = speed / base
        print(f"together: {speed:7.1f} tokens/s  (torch threads {threads})  job {number}: {ratio:.2f}x alone")


if __name__ == "__main__":
    main()
