"""The run-dir layer, model-free: the typed summary round-trips, and run dirs written before it (a
run, two shards and their merge, made by the previous layout's code: tests/fixtures/rundir_v1)
still open in load_run, the viewer, every export and merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import runner
from runner.errors import RunnerError
from runner.rundir.reader import Run, read_records, sweep_jobs
from runner.rundir.summary import PeakMemory, Summary
from runner.tools import view
from runner.tools.export import FORMATS, export
from runner.tools.merge import merge

FIXTURE = Path(__file__).parent / "fixtures" / "rundir_v1"


@pytest.fixture
def old_dirs(tmp_path, monkeypatch) -> Path:
    """A copy of the old run dirs, with the input they read where their manifests say (relative)."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    return tmp_path / "old"


def test_an_old_summary_reads_as_the_typed_summary_and_writes_back_every_key(old_dirs):
    data = json.loads((old_dirs / "run" / "summary.json").read_text())
    summary = Summary.from_json(data)
    assert (summary.status, summary.model.name, summary.engine) == ("completed", "smollm2_135m", "continuous")
    assert summary.peak_memory.rss_bytes == data["peak_memory"]["rss_bytes"]
    assert (summary.records, summary.rejected, summary.errors) == (3, {"no_messages": 1}, {})
    assert summary.to_json() | data == summary.to_json()  # nothing of the old file is lost
    assert Summary.from_json(summary.to_json()) == summary


def test_an_old_merged_summary_has_no_model_and_counts_rejects_as_one_number(old_dirs):
    summary = Run.open(old_dirs / "merged").summary
    assert (summary.status, summary.model, summary.peak_memory) == ("merged", None, None)
    assert summary.rejected == {"rejected": 1}
    assert Run.open(old_dirs / "merged").model_name == "smollm2_135m"  # from the manifest's config


def test_unknown_keys_are_kept_and_a_broken_summary_is_named(tmp_path):
    summary = Summary.from_json({"status": "completed", "from_the_future": {"x": 1}})
    assert summary.other == {"from_the_future": {"x": 1}} and summary.to_json()["from_the_future"] == {"x": 1}
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(RunnerError, match=r"summary.json: not a readable summary"):
        Run.open(tmp_path).summary  # noqa: B018
    assert PeakMemory(rss_bytes=5, cuda_bytes=None).bytes == 5


def test_load_run_reads_an_old_run_dir(old_dirs):
    run = runner.load_run(old_dirs / "run")
    assert [record["id"] for record in run.records] == ["capital", "hi", 81]
    turns = run.turns()
    assert [(t["conversation_id"], t["turn"]) for t in turns] == [
        ("capital", 0),
        ("capital", 1),
        ("hi", 0),
        (81, 0),
        (81, 1),
    ]
    assert turns[0]["prompt"] == "What is the capital of France?"
    assert run.config["generation"]["max_new_tokens"] == 3
    assert run.resolved_setup() == {"precision": "fp32", "device": "cpu"}


@pytest.mark.parametrize("name", ["run", "merged"])
def test_the_viewer_and_every_export_open_old_dirs(old_dirs, name):
    page = view.build(old_dirs / name)
    assert "capital" in page.read_text()
    for form in FORMATS:
        written = export(old_dirs / name, form)
        assert written and all(path.stat().st_size > 0 for path in written)
    [batch] = (old_dirs / name / "exports" / "openai-batch").glob("*.jsonl")
    lines = read_records(batch)  # every input line: a result, or an error line for the rejected one
    assert [line["custom_id"] for line in lines] == ["capital", "hi", 81, "bad"]
    assert lines[3]["error"]["code"] == "no_messages" and lines[3]["response"] is None
    [answers] = (old_dirs / name / "exports" / "mt-bench").glob("*.jsonl")
    assert answers.name == "smollm2_135m.jsonl"


def test_old_shards_merge_into_a_summary_of_the_whole_run(old_dirs):
    summary = merge([old_dirs / "shard0", old_dirs / "shard1"], old_dirs / "remerged")
    single = Run.open(old_dirs / "run")
    merged = Run.open(old_dirs / "remerged")
    assert [r["id"] for r in merged.records] == [r["id"] for r in single.records]
    assert (summary.status, summary.records, summary.turns) == ("merged", 3, single.summary.turns)
    assert (summary.model.name, summary.engine, summary.conversations) == ("smollm2_135m", "continuous", 3)
    assert summary.rejected == {"no_messages": 1}
    assert summary.peak_memory.rss_bytes == max(
        Run.open(old_dirs / shard).summary.peak_memory.rss_bytes for shard in ("shard0", "shard1")
    )
    assert merged.summary == summary


def test_a_torn_last_line_is_left_out_and_a_torn_middle_line_named(tmp_path):
    chats = tmp_path / "chats"
    chats.mkdir()
    whole = json.dumps({"id": "a", "messages": [], "replay": {"sample": 0, "turns": [], "error": None}})
    (chats / "in.jsonl").write_text(whole + "\n" + whole[:20])
    assert [record["id"] for record in Run.open(tmp_path).records] == ["a"]
    (chats / "in.jsonl").write_text(whole[:20] + "\n" + whole + "\n")
    with pytest.raises(RunnerError, match=r"in.jsonl:1: not a whole JSON record"):
        Run.open(tmp_path).records  # noqa: B018


def test_load_run_reads_a_run_killed_before_its_summary(old_dirs):
    killed = old_dirs / "run"
    (killed / "summary.json").unlink()  # kill -9: chats and manifest, no summary
    chats = killed / "chats" / "in.jsonl"
    chats.write_bytes(chats.read_bytes() + b'{"id": "torn", "mess')
    run = runner.load_run(killed)
    assert run.summary is None and [r["id"] for r in run.records] == ["capital", "hi", 81]
    assert len(run.turns()) == 5 and run.config["shard"] == {"index": 0, "count": 1}


def test_sweep_jobs_come_in_job_order(tmp_path):
    for name in ("10_b", "2_a", "notes"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
    (tmp_path / "report").mkdir()
    assert [job.name for job in sweep_jobs(tmp_path)] == ["2_a", "10_b", "notes"]
