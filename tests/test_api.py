"""The Python API: runner.run composes, validates and runs as the CLI does; runner.load_run reads a
run dir back, one row per turn."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import chat

import runner
from runner.errors import ConfigError, InputError


@pytest.mark.slow
def test_run_returns_the_summary_and_load_run_reads_the_turns_back(
    write_jsonl, tmp_path, caplog, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a notebook's working directory: run_dir= puts nothing else there
    source = write_jsonl(
        [chat("a", ("user", "Name a colour."), ("user", "Another?")), chat("b", ("user", "Say hi."))]
    )
    caplog.set_level(logging.INFO, logger="runner")
    summary = runner.run([f"input.path={source}", "generation.max_new_tokens=3"], run_dir=tmp_path / "run")
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert not (tmp_path / "outputs").exists()
    assert (summary["status"], summary["records"], summary["turns"]) == ("completed", 2, 3)
    log = (tmp_path / "run" / "chat-runner.log").read_text()
    assert "done: 2 conversation(s), 3 turn(s)" in log and "done: 2 conversation(s)" in caplog.text

    loaded = runner.load_run(tmp_path / "run")
    assert [record["id"] for record in loaded.records] == ["a", "b"]
    turns = loaded.turns()
    assert [(t["conversation_id"], t["turn"], t["prompt"]) for t in turns] == [
        ("a", 0, "Name a colour."),
        ("a", 1, "Another?"),
        ("b", 0, "Say hi."),
    ]
    assert all(0 < t["new_tokens"] <= 3 and t["finish_reason"] in {"length", "stop"} for t in turns)
    assert turns[1]["reply"] == loaded.records[0]["messages"][3]["content"]
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            loaded.to_pandas()
    else:
        assert loaded.to_pandas()["reply"].tolist() == [t["reply"] for t in turns]


def test_run_raises_the_projects_errors_before_loading_anything(write_jsonl, tmp_path):
    with pytest.raises(ConfigError, match="lama3"):
        runner.run(["model=lama3"], run_dir=tmp_path / "a")
    with pytest.raises(InputError, match="1 problem"):
        runner.run([f"input.path={write_jsonl([b'{oops'])}"], run_dir=tmp_path / "b")
    with pytest.raises(runner.api.RunnerError, match="not a run dir"):
        runner.load_run(tmp_path / "nothing")
