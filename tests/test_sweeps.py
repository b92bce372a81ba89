"""Multirun sweeps, sharding and merging: real sweeps on the embedded model, refusals on fake shards."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT, chat

from runner.errors import RunnerError
from runner.merge import merge

FIVE = [chat(f"q{i}", ("user", f"Count to {i + 2}."), ("user", "Again, backwards.")) for i in range(5)]


def runner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )


def records_without_timings(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        for turn in record["replay"]["turns"]:
            del turn["seconds"], turn["first_token_seconds"]
    return records


@pytest.mark.slow
def test_sharded_sweep_merges_into_what_one_run_writes(write_jsonl, tmp_path):
    source = write_jsonl(FIVE, name="five.jsonl")
    common = [f"input.path={source}", "generation.max_new_tokens=3"]
    sweep = runner("-m", *common, "shard.count=2", "shard.index=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2
    for number, job in enumerate(jobs):
        assert job.name.startswith(f"{number}_") and f"shard.index={number}" in job.name
        assert re.fullmatch(r"[A-Za-z0-9._=,+-]+", job.name)  # safe characters: no "/" from input.path
        assert {"chats", "summary.json", "manifest.json", ".hydra", "chat-runner.log"} <= {
            p.name for p in job.iterdir()
        }
    assert [r["id"] for r in records_without_timings(jobs[1] / "chats" / "five.jsonl")] == ["q1", "q3"]

    single = runner(*common, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr
    merged = subprocess.run(
        [sys.executable, "-m", "runner.merge", str(tmp_path / "merged"), *map(str, jobs)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert merged.returncode == 0, merged.stderr
    assert "merged 2 shards: 5 records" in merged.stdout
    assert records_without_timings(tmp_path / "merged" / "chats" / "five.jsonl") == records_without_timings(
        tmp_path / "single" / "chats" / "five.jsonl"
    )


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(write_jsonl, tmp_path):
    source = write_jsonl(FIVE[:1])
    sweep = runner(
        "-m",
        "model=hub,smollm2_135m",
        f"input.path={source}",
        "generation.max_new_tokens=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert sweep.returncode != 0
    assert "model 'hub' has source=hub but no id" in sweep.stderr
    failed, succeeded = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert not (failed / "summary.json").exists()
    assert json.loads((succeeded / "summary.json").read_text())["status"] == "completed"
    # The report, written after each job, has both rows: the failure with its error.
    with (tmp_path / "report.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["job"], r["status"], r["model"]) for r in rows] == [
        (failed.name, "failed", "hub"),
        (succeeded.name, "completed", "smollm2_135m"),
    ]
    assert "model 'hub' has source=hub but no id" in rows[0]["error"]
    assert float(rows[1]["tokens_per_second"]) > 0 and float(rows[1]["peak_memory_gib"]) > 0
    assert f"| {succeeded.name} | model=smollm2_135m" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "report.csv").unlink()
    again = subprocess.run(
        [sys.executable, "-m", "runner.report", str(tmp_path)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "2 job(s)" in again.stdout and (tmp_path / "report.csv").exists()


def fake_shard(root: Path, index: int, count: int, ids: list[str], **changes) -> Path:
    """A finished shard's run dir as the runner writes it (config trimmed to what merge reads)."""
    shard = root / f"shard{index}"
    (shard / "chats").mkdir(parents=True)
    config = {"model": {"name": "m"}, "shard": {"index": index, "count": count}, **changes.get("config", {})}
    inputs = changes.get("inputs", [{"path": "in.jsonl", "sha256": "ab"}])
    (shard / "manifest.json").write_text(json.dumps({"config": config, "inputs": inputs}))
    summary = {
        "status": changes.get("status", "completed"),
        "turns": len(ids),
        "generated_tokens": 3 * len(ids),
    }
    (shard / "summary.json").write_text(json.dumps(summary))
    lines = [{"id": i, "messages": [], "replay": {"line": int(i[1:]), "sample": 0, "turns": []}} for i in ids]
    (shard / "chats" / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return shard


def test_merge_orders_records_by_input_line(tmp_path):
    shards = [fake_shard(tmp_path, 0, 2, ["q1", "q3"]), fake_shard(tmp_path, 1, 2, ["q2", "q4"])]
    summary = merge(shards, tmp_path / "out")
    merged = [
        json.loads(line)["id"] for line in (tmp_path / "out" / "chats" / "in.jsonl").read_text().splitlines()
    ]
    assert merged == ["q1", "q2", "q3", "q4"]
    assert (summary["records"], summary["turns"], summary["status"]) == (4, 4, "merged")


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            {"index": 1, "ids": ["q2"], "status": "interrupted"},
            "is incomplete (status 'interrupted'): resume it first",
        ),
        ({"index": 1, "ids": ["q1"]}, "conversation 'q1' (sample 0) is in both"),
        ({"index": 0, "ids": ["q2"]}, "shards are not one full set: shard.count [2], shard.index [0, 0]"),
        (
            {"index": 1, "ids": ["q2"], "inputs": [{"path": "in.jsonl", "sha256": "cd"}]},
            "replayed other inputs",
        ),
        ({"index": 1, "ids": ["q2"], "config": {"model": {"name": "other"}}}, "ran another config"),
    ],
)
def test_merge_refuses_incomplete_overlapping_or_mismatched_shards(tmp_path, second, message):
    first = fake_shard(tmp_path / "a", 0, 2, ["q1"])
    other = fake_shard(tmp_path / "b", second.pop("index"), 2, second.pop("ids"), **second)
    with pytest.raises(RunnerError, match=re.escape(message)):
        merge([first, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_local_submitit_launcher_runs_a_two_job_sweep(write_jsonl, tmp_path):
    source = write_jsonl(FIVE[:2])
    sweep = runner(
        "-m",
        "hydra/launcher=local",
        "quant=none,int4",
        f"input.path={source}",
        "generation.max_new_tokens=2",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert sweep.returncode == 0, sweep.stderr
    jobs = sorted(p for p in tmp_path.iterdir() if (p / ".hydra").is_dir())
    assert [job.name for job in jobs] == [
        "0_generation.max_new_tokens=2,quant=none",
        "1_generation.max_new_tokens=2,quant=int4",
    ]
    for job, quant in zip(jobs, ("none", "int4"), strict=True):
        summary = json.loads((job / "summary.json").read_text())
        assert (summary["status"], summary["quant"], summary["records"]) == ("completed", quant, 2)
    with (tmp_path / "report.csv").open() as stream:
        assert [row["status"] for row in csv.DictReader(stream)] == ["completed", "completed"]


def test_requeue_hook_resumes_the_same_job(compose_config):
    from hydra_plugins.chat_runner_launcher import ResumingSlurmLauncher

    launcher = ResumingSlurmLauncher()
    requeued = launcher.checkpoint(["quant=int8", "resume=false"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    assert requeued.function is launcher
    assert requeued.args == (["quant=int8", "resume=true"], "hydra.sweep.dir", 3, "job_id_for_3", {})


def test_slurm_preset_requeues_on_timeout():
    from hydra import compose, initialize

    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.chat_runner_launcher.ResumingSlurmLauncher"
    assert launcher.max_num_timeout == 5  # submitit's default of 0 would never requeue a timed-out job
    assert (launcher.gpus_per_node, launcher.array_parallelism, launcher.timeout_min) == (1, 16, 240)
    # The job dir name leaves out resume, so a requeued job (resume=true) writes into the same dir.
    assert "resume" in cfg.hydra.job.config.override_dirname.exclude_keys
