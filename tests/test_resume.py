"""Crash safety and resume, with real processes: kill -9, SIGTERM, torn lines, a full disk."""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT, chat

pytestmark = pytest.mark.slow

TIMINGS = ("seconds", "first_token_seconds")
ARGS = ["generation.max_new_tokens=4", "engine.batch_size=4"]


def command(source: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "runner", f"input.path={source}", f"hydra.run.dir={run_dir}", *ARGS, *extra]


def run(source: Path, run_dir: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(source, run_dir, *extra), cwd=PROJECT, capture_output=True, text=True, timeout=300, **kwargs
    )


def chats(run_dir: Path) -> Path:
    return run_dir / "chats" / "twenty.jsonl"


def without_timings(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for record in records:
        for turn in record["replay"]["turns"]:
            for key in TIMINGS:
                turn.pop(key)
    return records


@pytest.fixture(scope="module")
def reference(tmp_path_factory, embedded_dir) -> tuple[Path, list[dict]]:
    """An uninterrupted run: what every interrupted-then-resumed run must end up equal to."""
    root = tmp_path_factory.mktemp("reference")
    records = [
        chat(
            f"c{i:02d}",
            ("user", f"Name a fruit that starts with the letter {chr(65 + i)}."),
            ("user", "Why?"),
        )
        for i in range(20)
    ]
    source = root / "twenty.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    done = run(source, root / "run")
    assert done.returncode == 0, done.stderr
    return source, without_timings(chats(root / "run"))


def start_and_stop_after(
    source: Path, run_dir: Path, records: int, how: signal.Signals
) -> tuple[int, bytes, str]:
    """Start a run, send `how` once `records` records are on disk; return exit code, chats bytes, stderr."""
    process = subprocess.Popen(command(source, run_dir), cwd=PROJECT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if chats(run_dir).exists() and chats(run_dir).read_bytes().count(b"\n") >= records:
            break
        time.sleep(0.02)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert 0 < chats(run_dir).read_bytes().count(b"\n") < 20, "the signal came after the run ended"
    return process.returncode, chats(run_dir).read_bytes(), stderr


@pytest.mark.parametrize("after", [2, 13])
def test_kill_9_then_resume_ends_equal_to_an_uninterrupted_run(reference, tmp_path, after):
    source, expected = reference
    run_dir = tmp_path / "run"
    code, before, _ = start_and_stop_after(source, run_dir, after, signal.SIGKILL)
    assert code == -signal.SIGKILL
    done = run(source, run_dir, "resume=true")
    assert done.returncode == 0, done.stderr
    after_bytes = chats(run_dir).read_bytes()
    whole = before[: before.rfind(b"\n") + 1]
    assert after_bytes.startswith(whole)  # records from before the kill are kept byte for byte
    final = without_timings(chats(run_dir))
    assert [r["id"] for r in final] == [f"c{i:02d}" for i in range(20)]  # each exactly once, in order
    assert final == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["records"] == 20 and summary["records_kept_from_before"] == whole.count(b"\n")
    assert summary["turns"] == 40 and summary["status"] == "completed"


def test_sigterm_keeps_what_is_complete_and_says_how_to_resume(reference, tmp_path):
    source, expected = reference
    run_dir = tmp_path / "run"
    code, before, stderr = start_and_stop_after(source, run_dir, 3, signal.SIGTERM)
    assert code == 1
    assert f"hydra.run.dir={run_dir} resume=true" in stderr and "Traceback" not in stderr
    assert before.endswith(b"\n")  # nothing half-written
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["records"] == before.count(b"\n")
    assert run(source, run_dir, "resume=true").returncode == 0
    assert without_timings(chats(run_dir)) == expected


def test_torn_last_line_is_set_aside_and_regenerated_once(reference, tmp_path):
    source, expected = reference
    run_dir = tmp_path / "run"
    assert run(source, run_dir).returncode == 0
    data = chats(run_dir).read_bytes()
    lines = data.splitlines(keepends=True)
    torn = b"".join(lines[:5]) + lines[5][:40]  # a crash in the middle of writing record 6
    chats(run_dir).write_bytes(torn)
    done = run(source, run_dir, "resume=true")
    assert done.returncode == 0, done.stderr
    offset = len(b"".join(lines[:5]))
    assert (run_dir / "chats" / f"twenty.jsonl.corrupt-{offset}").read_bytes() == lines[5][:40]
    assert chats(run_dir).read_bytes().startswith(b"".join(lines[:5]))
    assert without_timings(chats(run_dir)) == expected


def test_resume_refuses_a_changed_config_or_input(reference, tmp_path):
    source, _ = reference
    run_dir = tmp_path / "run"
    assert run(source, run_dir).returncode == 0
    changed_config = run(source, run_dir, "resume=true", "generation.repetition_penalty=1.2")
    assert changed_config.returncode == 1
    assert "config generation.repetition_penalty: 1.0 then, 1.2 now" in changed_config.stderr
    edited = tmp_path / "twenty.jsonl"
    shutil.copy(source, edited)
    with edited.open("a") as stream:
        stream.write(json.dumps(chat("extra", ("user", "One more?"))) + "\n")
    changed_input = run(edited, run_dir, "resume=true")
    assert changed_input.returncode == 1 and "input files:" in changed_input.stderr
    again = run(source, run_dir)
    assert again.returncode == 1 and "add resume=true to continue it" in again.stderr


def _small_file_limit() -> None:
    """In the child: files may not grow past 10 KB, as on a disk that fills up."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_full_disk_is_a_clear_error_that_keeps_whole_records(reference, tmp_path):
    source, expected = reference
    run_dir = tmp_path / "run"
    done = run(source, run_dir, preexec_fn=_small_file_limit)
    assert done.returncode == 1
    assert f"could not write {chats(run_dir)}: File too large" in done.stderr
    assert "Traceback" not in done.stderr
    kept = without_timings(chats(run_dir))  # every line on disk is a whole record
    assert 0 < len(kept) < 20 and kept == expected[: len(kept)]
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]  # no temp files left


def test_two_resumes_at_once_one_runs_and_the_other_is_refused(reference, tmp_path):
    source, expected = reference
    run_dir = tmp_path / "run"
    assert run(source, run_dir).returncode == 0
    lines = chats(run_dir).read_bytes().splitlines(keepends=True)
    chats(run_dir).write_bytes(b"".join(lines[:5]))  # a partial run dir, as a preempted job leaves it
    racers = [
        subprocess.Popen(
            command(source, run_dir, "resume=true"), cwd=PROJECT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outcomes = sorted((racer.wait(timeout=300), racer.stderr.read()) for racer in racers)
    (won, _), (lost, refusal) = outcomes
    assert (won, lost) == (0, 1)
    assert f"{run_dir} is in use by pid " in refusal and "Traceback" not in refusal
    assert without_timings(chats(run_dir)) == expected  # every conversation once, in input order
    assert json.loads((run_dir / "summary.json").read_text())["records"] == 20


def test_resume_repairs_a_duplicated_or_reordered_record_and_refuses_a_foreign_one(reference, tmp_path):
    source, expected = reference
    run_dir = tmp_path / "run"
    assert run(source, run_dir).returncode == 0
    lines = chats(run_dir).read_bytes().splitlines(keepends=True)
    chats(run_dir).write_bytes(b"".join([lines[1], lines[0], lines[2], lines[2], *lines[3:6]]))
    repaired = run(source, run_dir, "resume=true")
    assert repaired.returncode == 0, repaired.stderr
    assert "1 duplicate record(s) dropped, 6 record(s) held; input order restored" in repaired.stderr
    assert without_timings(chats(run_dir)) == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["records"], summary["records_kept_from_before"]) == (20, 6)
    # Progress (logged, stderr not being a terminal) starts from the 12 kept turns, and its rate
    # counts only this session's turns: rate x seconds is the new turns, not new + kept.
    progress = re.findall(
        r"replay: (\d+)/40 turns \(12 kept\), (\d+) new in ([\d.]+) s, ([\d.]+) turns/s", repaired.stderr
    )
    assert progress and progress[-1][:2] == ("40", "28")
    for done, new, seconds, rate in progress:
        assert int(done) == 12 + int(new)
        assert abs(float(rate) * float(seconds) - int(new)) <= 1 + 0.05 * float(rate)
    assert f"read them: python -m runner.view {run_dir}" in repaired.stderr

    foreign = json.loads(lines[0])
    foreign["id"] = "evil"
    with chats(run_dir).open("a") as stream:
        stream.write(json.dumps(foreign) + "\n")
    refused = run(source, run_dir, "resume=true")
    assert refused.returncode == 1
    assert f"{chats(run_dir)}:21: record 'evil' (sample 0) is no conversation of this run's input" in (
        refused.stderr
    )


@pytest.mark.parametrize("after", [0.5, 1.5, 3.0])
def test_a_run_killed_at_any_moment_resumes(reference, tmp_path, after):
    source, expected = reference
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(source, run_dir), cwd=PROJECT, stderr=subprocess.DEVNULL)
    time.sleep(after)
    process.kill()
    process.wait(timeout=60)
    done = run(source, run_dir, "resume=true")  # what a SLURM requeue runs
    assert done.returncode == 0, done.stderr
    assert without_timings(chats(run_dir)) == expected


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_an_early_signal_gives_the_interrupted_summary_without_a_traceback(reference, tmp_path, how):
    source, expected = reference
    run_dir = tmp_path / "run"
    # A shell running this suite in the background ignores SIGINT, and its children inherit that (a
    # Python started so never raises KeyboardInterrupt): the run gets the default, as in a terminal.
    process = subprocess.Popen(
        command(source, run_dir),
        cwd=PROJECT,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not (run_dir / "manifest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(how)  # while the model loads
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "Traceback" not in stderr and f"hydra.run.dir={run_dir} resume=true" in stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert run(source, run_dir, "resume=true").returncode == 0
    assert without_timings(chats(run_dir)) == expected
