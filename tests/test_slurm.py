"""Sweeps on a real one-node SLURM cluster (scripts/slurm_cluster.sh, started by .ci/run): the
submitit launcher as a user drives it, and preemption, requeue and time limits as SLURM does them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PROJECT, chat

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SIX = [chat(f"s{i}", ("user", f"Name {i + 2} colours."), ("user", "And one more?")) for i in range(6)]
GENERATION = ["generation.max_new_tokens=8"]
ONE_ROW = "engine.batch_size=1"  # records come one by one: a disturbance lands mid-run


@pytest.fixture(autouse=True)
def no_jobs_left() -> Iterator[None]:
    """Each test starts and ends with an empty queue, whatever happened in it."""
    yield
    subprocess.run(["scancel", "--full", *squeue()], capture_output=True, timeout=60)


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """The test cluster must answer; under CI its absence is a failure, elsewhere a skip."""
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
        states = up.stdout.split() if up.returncode == 0 else []
    except (FileNotFoundError, subprocess.TimeoutExpired):
        states = []
    if not any(state.rstrip("*") in {"idle", "mixed", "allocated"} for state in states):
        if os.environ.get("CI"):
            raise RuntimeError("CI must run the SLURM tests: .ci/run starts scripts/slurm_cluster.sh")
        pytest.skip("no SLURM cluster here: bash scripts/slurm_cluster.sh start")


def slurm_sweep(sweep_dir: Path, *args: str, cpus: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "runner",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=0",
        f"hydra.launcher.cpus_per_task={cpus}",
        "hydra.launcher.mem_gb=3",
        f"hydra.sweep.dir={sweep_dir}",
        *GENERATION,
        *args,
    ]


def records(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for record in records:
        for turn in record["replay"]["turns"]:
            del turn["seconds"], turn["first_token_seconds"]
    return records


def squeue(*args: str) -> list[str]:
    """The ids of the cluster's jobs (the tests run one sweep at a time)."""
    listed = subprocess.run(["squeue", "-h", "-o", "%i", *args], capture_output=True, text=True, check=True)
    return listed.stdout.split()


def report_rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "report.csv").open() as stream:
        return list(csv.DictReader(stream))


def test_a_two_job_sweep_on_the_cluster_writes_two_run_dirs_and_the_report(write_jsonl, tmp_path):
    source = write_jsonl(SIX[:2])
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        slurm_sweep(sweep_dir, f"input.path={source}", "quant=none,int4"),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    jobs = sorted(path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir())
    assert [job.name for job in jobs] == [
        "0_generation.max_new_tokens=8,quant=none",
        "1_generation.max_new_tokens=8,quant=int4",
    ]
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert (summary["status"], summary["records"]) == ("completed", 2)
        assert summary["environment"]["torch_threads"] == 1  # the CPU the job was granted
        assert len((job / "chats" / source.name).read_text().splitlines()) == 2
    assert [(row["job"], row["status"]) for row in report_rows(sweep_dir)] == [
        (job.name, "completed") for job in jobs
    ]
    # The sweep ends with a line per job, the report and the viewer command.
    tail = done.stderr.strip().splitlines()[-4:]
    assert all(line.split()[0] == "completed" and "tokens/s" in line for line in tail[:2])
    assert [line.split()[-1] for line in tail[:2]] == [str(job) for job in jobs]
    assert tail[2:] == [f"report: {sweep_dir / 'report.md'}", f"read them: python -m runner.view {sweep_dir}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The six conversations replayed without interruption (outside SLURM): what every preempted
    and resumed job must end up equal to."""
    root = tmp_path_factory.mktemp("uninterrupted")
    source = root / "six.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in SIX))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            f"input.path={source}",
            f"hydra.run.dir={root / 'run'}",
            *GENERATION,
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return source, records(root / "run" / "chats" / "six.jsonl")


def start_and_disturb(sweep_dir: Path, source: Path, disturb: list[str], *args: str) -> subprocess.Popen:
    """Submit a one-job sweep; once two records are written, run `disturb` + the SLURM job id."""
    submit = subprocess.Popen(
        slurm_sweep(sweep_dir, f"input.path={source}", ONE_ROW, *args, cpus=2),
        cwd=PROJECT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not any(chats.read_text().count("\n") >= 2 for chats in sweep_dir.glob(f"0_*/chats/{source.name}")):
        assert submit.poll() is None and time.monotonic() < deadline, "the job ended before it was disturbed"
        time.sleep(0.2)
    job_id = subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(job_id) == 1, job_id
    subprocess.run([*disturb, job_id[0]], check=True, capture_output=True, timeout=60)
    return submit


@pytest.mark.parametrize(
    "disturb",
    [["scontrol", "requeue"], ["scancel", "--signal=USR2"]],
    ids=["scontrol-requeue", "usr2-before-the-time-limit"],
)
def test_a_preempted_or_requeued_job_resumes_and_the_submitter_waits_for_it(uninterrupted, tmp_path, disturb):
    source, expected = uninterrupted
    sweep_dir = tmp_path / "sweep"
    submit = start_and_disturb(sweep_dir, source, disturb)
    _, stderr = submit.communicate(timeout=300)
    assert submit.returncode == 0, stderr
    [job] = sweep_dir.glob("0_*")
    summary = json.loads((job / "summary.json").read_text())
    assert summary["status"] == "completed" and 2 <= summary["records_kept_from_before"] < 6
    final = records(job / "chats" / "six.jsonl")
    assert [record["id"] for record in final] == [f"s{i}" for i in range(6)]  # once each, in order
    assert final == expected
    [row] = report_rows(sweep_dir)
    user_overrides = " ".join([*GENERATION, f"input.path={source}", ONE_ROW])
    assert (row["status"], row["overrides"]) == ("completed", user_overrides)  # no resume=true


def test_a_job_whose_requeues_are_used_up_ends_as_failed_with_a_clear_line(uninterrupted, tmp_path):
    source, _ = uninterrupted
    sweep_dir = tmp_path / "sweep"
    # max_num_timeout=0: no requeue on a time limit. With a 1-minute limit every USR2 means the
    # limit is near (SLURM's own comes 5 s before it: signal_delay_s=5). The test sends one once the
    # job's handlers are in place (its log exists), as SLURM does `signal_delay_s` before the limit.
    submit = subprocess.Popen(
        slurm_sweep(
            sweep_dir,
            f"input.path={source}",
            ONE_ROW,
            "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=5",
            "hydra.launcher.max_num_timeout=0",
        ),
        cwd=PROJECT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(sweep_dir.glob("0_*/chat-runner.log")):
        assert submit.poll() is None and time.monotonic() < deadline, "the job never ran"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", *squeue()], check=True, timeout=60)
    _, stderr = submit.communicate(timeout=300)
    assert submit.returncode == 1 and "Traceback" not in stderr, stderr
    [job] = sweep_dir.glob("0_*")
    assert (
        "UncompletedJobError: Job not requeued because: timed-out too many times."
        in (job / "chat-runner.log").read_text()
    )
    [row] = report_rows(sweep_dir)
    assert row["status"] == "failed" and "timed-out too many times" in row["error"]
    assert any(line.split()[0] == "failed" and f"{job}: " in line for line in stderr.splitlines())


def test_each_job_of_a_sweep_brings_its_own_server_and_leaves_none_behind(write_jsonl, tmp_path):
    """engine=openai with engine.serve on SLURM: every job starts `transformers serve` on a free
    port of its node, replays through it, and stops it when the job ends."""
    source = write_jsonl(SIX[:2])
    sweep_dir = tmp_path / "sweep"
    serve = f"{Path(sys.executable).parent / 'transformers'} serve {{model}} --port {{port}} --device cpu"
    done = subprocess.run(
        slurm_sweep(
            sweep_dir,
            f"input.path={source}",
            "engine=openai",
            f"engine.serve='{serve}'",
            "generation.max_new_tokens=4,8",
            cpus=1,
        ),
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir())
    assert len(jobs) == 2
    ports = set()
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        assert (summary["status"], summary["records"], summary["engine"]) == ("completed", 2, "openai")
        assert summary["server"]["started_with"][1] == "serve"
        ports.add(summary["server"]["base_url"].split(":")[-1].removesuffix("/v1"))
        assert (job / "server.log").stat().st_size > 0
    assert len(ports) == 2  # a port of its own per job
    for port in ports:
        left = subprocess.run(["pgrep", "-f", f"serve .* --port {port} "], capture_output=True, text=True)
        assert left.stdout == ""  # stopped at the job's end
