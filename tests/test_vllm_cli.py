"""engine=vllm through the command line, on vLLM's CPU build: a sweep mixing engines, and kill -9 then
resume. Apart from tests/test_vllm.py, so that its engine has given its memory back first."""

from __future__ import annotations

import pytest

try:
    import vllm

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here (scripts/setup_vllm.sh)")


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_a_sweep_over_continuous_and_vllm_writes_the_same_greedy_records_and_exports(write_jsonl, tmp_path):
    import json
    import subprocess
    import sys

    from test_cli import PROJECT, read_jsonl

    from runner.rundir.reader import Run
    from runner.tools.export import export

    source = write_jsonl(
        [
            {"question_id": 81, "turns": ["Name a colour.", "Name another one."]},
            {
                "custom_id": "r1",
                "body": {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3},
            },
        ],
        name="mixed.jsonl",
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "runner", "-m", "engine=continuous,vllm", f"input.path={source}"),
            *("generation.max_new_tokens=8", "device=cpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    continuous_job, vllm_job = sorted(p for p in (tmp_path / "sweep").iterdir() if (p / ".hydra").is_dir())
    summary = json.loads((vllm_job / "summary.json").read_text())
    assert (summary["engine"], summary["engine_version"], summary["status"]) == (
        "vllm",
        vllm.__version__,
        "completed",
    )
    assert summary["cache"]["prompt_tokens"] > 0 and summary["records"] == 2
    mine, theirs = (
        read_jsonl(vllm_job / "chats" / "mixed.jsonl"),
        read_jsonl(continuous_job / "chats" / "mixed.jsonl"),
    )
    assert [r["messages"] for r in mine] == [r["messages"] for r in theirs]
    assert mine[1]["replay"]["turns"][0]["new_tokens"] <= 3  # the request's own max_tokens
    assert Run.open(vllm_job).summary.engine == "vllm"
    [results] = export(vllm_job, "openai-batch")
    assert [json.loads(line)["custom_id"] for line in results.read_text().splitlines()] == [81, "r1"]


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_kill_9_mid_run_then_resume_keeps_every_record_once_in_order(write_jsonl, tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_cli import PROJECT, read_jsonl

    questions = [
        {"id": f"q{i}", "messages": [{"role": "user", "content": f"Count to {i}."}]} for i in range(24)
    ]
    source = write_jsonl(questions, name="many.jsonl")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "runner", "engine=vllm", "engine.batch_size=2", f"input.path={source}"]
    command += [
        "generation.max_new_tokens=24",
        "device=cpu",
        "engine.enforce_eager=true",
        f"hydra.run.dir={run_dir}",
    ]
    chats = run_dir / "chats" / "many.jsonl"
    started = subprocess.Popen(
        command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and not (chats.exists() and chats.read_bytes().count(b"\n") >= 3):
        time.sleep(0.2)
    os.killpg(started.pid, signal.SIGKILL)  # the run and vLLM's engine core, as a job's kill does
    started.wait()
    kept = [json.loads(line) for line in chats.read_bytes().split(b"\n")[:-1]]  # whole lines
    assert 3 <= len(kept) < len(questions)
    resumed = subprocess.run(
        [*command, "resume=true"], cwd=PROJECT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_jsonl(chats)
    assert [r["id"] for r in records] == [q["id"] for q in questions]
    assert records[: len(kept)] == kept  # what was written before the kill, byte for byte
