"""Multirun sweeps, sharding and merging: real sweeps on the embedded model, refusals on fake shards."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT, chat

from runner.errors import RunnerError
from runner.rundir.resume import manifest
from runner.rundir.writer import record_sha256
from runner.tools.merge import merge

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

    # The shards as a user's bad day leaves them: each spoiled copy is refused, naming what is wrong.
    spoils = {
        "a line deleted": (lambda chats: drop_line(chats, 1), "is short: it lacks 1 record(s): 'q1'"),
        "the chats file deleted": (lambda chats: chats.unlink(), "is missing: it should hold 2 record(s)"),
        "a foreign record": (
            lambda chats: append_line(chats, {**json.loads(chats.read_text().splitlines()[0]), "id": "evil"}),
            "five.jsonl:3: conversation 'evil' (sample 0) is not one that shard.index 1 of 2 owns",
        ),
        "a reply edited": (
            edit_reply,
            "five.jsonl:1: conversation 'q1' (sample 0) is not as the run wrote it",
        ),
    }
    for name, (spoil, message) in spoils.items():
        copy = tmp_path / name.replace(" ", "_")
        shutil.copytree(jobs[1], copy)
        spoil(copy / "chats" / "five.jsonl")
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "runner.merge",
                str(tmp_path / f"out_{copy.name}"),
                str(jobs[0]),
                str(copy),
            ],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1 and message in refused.stderr, (name, refused.stderr)


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
    # The sweep ends with a line per job (the failure a line, not a traceback) and where to look.
    tail = sweep.stderr.strip().splitlines()[-4:]
    assert tail[0].split()[0] == "failed" and f"{failed}: model 'hub' has source=hub but no id" in tail[0]
    assert tail[1].split()[0] == "completed" and tail[1].endswith(str(succeeded))
    assert tail[2:] == [f"report: {tmp_path / 'report.md'}", f"read them: python -m runner.view {tmp_path}"]
    assert "Traceback" not in sweep.stderr
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


FOUR = [chat(f"q{i}", ("user", f"Question {i}.")) for i in range(1, 5)]


def fake_shard(source: Path, index: int, count: int, **changes) -> Path:
    """A finished shard of a run over `source` as the runner writes it: manifest, summary with the
    record digests, and the conversations its index owns (config trimmed to what merge reads)."""
    shard = changes.get("root", source.parent) / f"shard{index}"
    (shard / "chats").mkdir(parents=True)
    config = {
        "model": {"name": "m"},
        "input": {"format": "auto", "max_line_bytes": 2**20},
        "generation": {"num_samples": 1},
        "shard": {"index": index, "count": count},
        **changes.get("config", {}),
    }
    (shard / "manifest.json").write_text(json.dumps(manifest(config, [source])))
    owned = [json.loads(line) for line in source.read_text().splitlines()][index::count]
    lines = [
        {**conversation, "replay": {"line": int(conversation["id"][1:]), "sample": 0, "turns": []}}
        for conversation in owned
    ]
    summary = {
        "status": changes.get("status", "completed"),
        "turns": len(lines),
        "generated_tokens": 3 * len(lines),
        "record_sha256": {"chats/in.jsonl": [record_sha256(line) for line in lines]},
    }
    (shard / "summary.json").write_text(json.dumps(summary))
    (shard / "chats" / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return shard


def test_merge_orders_records_by_input_line(write_jsonl, tmp_path):
    source = write_jsonl(FOUR, name="in.jsonl")
    summary = merge([fake_shard(source, 0, 2), fake_shard(source, 1, 2)], tmp_path / "out")
    merged = [
        json.loads(line)["id"] for line in (tmp_path / "out" / "chats" / "in.jsonl").read_text().splitlines()
    ]
    assert merged == ["q1", "q2", "q3", "q4"]
    assert (summary.records, summary.turns, summary.status) == (4, 4, "merged")


def drop_line(path: Path, number: int) -> None:
    lines = path.read_text().splitlines(keepends=True)
    del lines[number - 1]
    path.write_text("".join(lines))


def append_line(path: Path, record: dict) -> None:
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")


def swap_lines(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[::-1]))


def edit_reply(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["messages"][-1]["content"] += " (edited)"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            lambda chats: drop_line(chats, 2),
            "shard1/chats/in.jsonl is short: it lacks",
        ),
        (
            lambda chats: chats.unlink(),
            "shard1/chats/in.jsonl is missing: it should",
        ),
        (
            lambda chats: append_line(chats, {"id": "evil", "replay": {"sample": 0}}),
            "shard1/chats/in.jsonl:3: conversation 'evil' (sample 0) is not one that shard.index 1 of 2 owns",
        ),
        (
            lambda chats: append_line(chats, json.loads(chats.read_text().splitlines()[0])),
            "shard1/chats/in.jsonl:3: conversation 'q2' (sample 0) is held twice (first at line 1)",
        ),
        (edit_reply, "shard1/chats/in.jsonl:1: conversation 'q2' (sample 0) is not as the run wrote it"),
        (swap_lines, "shard1/chats/in.jsonl:2: conversation 'q2' (sample 0) is out of input order"),
        (
            lambda chats: chats.with_name("other.jsonl").write_text(""),
            "shard1/chats/other.jsonl is no chats file of this run's inputs",
        ),
    ],
)
def test_merge_refuses_a_short_foreign_duplicated_or_edited_shard(write_jsonl, tmp_path, spoil, message):
    source = write_jsonl(FOUR, name="in.jsonl")
    first, second = fake_shard(source, 0, 2), fake_shard(source, 1, 2)
    spoil(second / "chats" / "in.jsonl")
    with pytest.raises(RunnerError, match=re.escape(message)):
        merge([first, second], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"index": 1, "status": "interrupted"}, "is incomplete (status 'interrupted'): resume it first"),
        ({"index": 0}, "shards are not one full set: shard.count [2], shard.index [0, 0]"),
        ({"index": 1, "config": {"model": {"name": "other"}}}, "ran another config"),
    ],
)
def test_merge_refuses_incomplete_or_mismatched_shards(write_jsonl, tmp_path, second, message):
    source = write_jsonl(FOUR, name="in.jsonl")
    first = fake_shard(source, 0, 2)
    other = fake_shard(source, second.pop("index"), 2, root=tmp_path / "b", **second)
    with pytest.raises(RunnerError, match=re.escape(message)):
        merge([first, other], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_refuses_inputs_that_changed_since_the_shards_ran(write_jsonl, tmp_path):
    source = write_jsonl(FOUR, name="in.jsonl")
    shards = [fake_shard(source, 0, 2), fake_shard(source, 1, 2)]
    write_jsonl(FOUR[:3], name="in.jsonl")
    with pytest.raises(RunnerError, match=r"input .*in\.jsonl changed since the shards ran"):
        merge(shards, tmp_path / "out")
    source.unlink()
    with pytest.raises(RunnerError, match=r"input .*in\.jsonl .* is not found from"):
        merge(shards, tmp_path / "out")


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
