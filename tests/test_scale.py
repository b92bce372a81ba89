"""Large inputs: one streaming pass reads a shard's own lines and only the ids of the others, the
conversations are held as where they are, the chat template checks what it did not see before the
model loaded as the replay reaches it, and shards, merge and resume agree at 100k lines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT, chat
from test_cli import STRICT_TEMPLATE
from test_sweeps import records_without_timings

from runner.config.compose import to_run_config
from runner.inputs.reader import read_conversations
from runner.workload import read_workload

# Lines 1-8; line 5 is blank. Line 2 is no JSON, line 4 reuses line 1's id, line 7 is invalid but
# claims id "z", which line 8 then reuses.
LINES = [
    json.dumps(chat("a", ("user", "One."))),
    "{not json",
    json.dumps(chat("b", ("user", "Two."))),
    json.dumps(chat("a", ("user", "Three."))),
    "",
    json.dumps(chat("c", ("user", "Four."))),
    json.dumps({"id": "z", "messages": "not a list"}),
    json.dumps(chat("z", ("user", "Five."))),
]


def shard_of(compose_config, source: Path, index: int, count: int):
    overrides = [
        f"input.path={source}",
        "input.on_error=skip",
        f"shard.index={index}",
        f"shard.count={count}",
    ]
    return read_workload(to_run_config(compose_config(*overrides)))


def test_a_shard_parses_its_own_lines_and_agrees_with_the_others_on_ids(compose_config, tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    # Non-blank lines counted from 0: shard 0 of 2 owns lines 1, 3, 6, 8; shard 1 lines 2, 4, 7.
    first, second = (shard_of(compose_config, source, index, 2) for index in (0, 1))
    assert [c.id for c in first.conversations] == ["a", "b", "c"]
    assert [(r.line, r.code) for r in first.rejected] == [(8, "duplicate_id")]
    assert "first at" in first.rejected[0].message and f"{source}:7" in first.rejected[0].message
    assert [c.id for c in second.conversations] == []
    assert [(r.line, r.code) for r in second.rejected] == [
        (2, "invalid_json"),
        (4, "duplicate_id"),
        (7, "no_messages"),
    ]
    assert f"{source}:1" in second.rejected[1].message  # a duplicate of a line shard 1 never parsed
    # One run reads what the shards read between them.
    whole = shard_of(compose_config, source, 0, 1)
    assert [c.id for c in whole.conversations] == ["a", "b", "c"]
    assert sorted((r.line, r.code) for r in whole.rejected) == sorted(
        (r.line, r.code) for r in first.rejected + second.rejected
    )


def test_the_workload_holds_where_conversations_are_and_reads_them_back_equal(compose_config, tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + "\n".join(LINES).encode() + b"\r\n\n")
    workload = shard_of(compose_config, source, 0, 1)
    conversations, _ = read_conversations([source])
    assert list(workload.conversations) == conversations
    assert [c.offset for c in workload.conversations] == [c.offset for c in conversations]
    assert workload.conversations.ids == ["a", "b", "c"] and workload.replies == 3
    # An input edited under a running replay is named, not replayed as something else.
    source.write_bytes(source.read_bytes().replace(b'"b"', b'"B"'))
    with pytest.raises(Exception, match=r"input.jsonl:3: changed since the run read it"):
        list(workload.conversations)


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["skip", "fail"])
def test_beyond_what_is_rendered_up_front_the_template_checks_each_conversation_as_it_comes(
    monkeypatch, tmp_path, embedded_dir, on_error
):
    import runner
    from runner import workload
    from runner.errors import InputError

    checkpoint = tmp_path / "strict"
    checkpoint.mkdir()
    for item in embedded_dir.iterdir():
        (checkpoint / item.name).symlink_to(item)
    (checkpoint / "chat_template.jinja").unlink()
    (checkpoint / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    monkeypatch.setattr(workload, "RENDER_ALL_UP_TO", 2)
    monkeypatch.setattr(workload, "LONGEST_SAMPLE", 1)
    lines = [
        chat("long", ("user", "Tell me a story about a lighthouse keeper and a storm at sea, please.")),
        chat("ok", ("user", "Hi.")),
        chat("bad", ("user", "Say forbidden.")),
        chat("fine", ("user", "Bye.")),
    ]
    source = tmp_path / "input.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    overrides = [
        "model=local",
        f"model.path={checkpoint}",
        f"input.path={source}",
        f"input.on_error={on_error}",
        "generation.max_new_tokens=2",
    ]
    run_dir = tmp_path / "run"
    if on_error == "fail":
        with pytest.raises(InputError, match=r"input.jsonl:3: the model's chat template refuses"):
            runner.run(overrides, run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and "input.jsonl:3" in summary["error"]
        return
    summary = runner.run(overrides, run_dir)
    assert summary["rejected"] == {"template_error": 1} and summary["records"] == 3
    [rejected] = [json.loads(line) for line in (run_dir / "rejected.jsonl").read_text().splitlines()]
    assert (rejected["line"], rejected["id"], rejected["code"]) == (3, "bad", "template_error")
    records = [json.loads(line) for line in (run_dir / "chats" / "input.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["long", "ok", "fine"]
    assert (
        "the longest of the 1 longest conversations by characters" in summary["memory_plan"]["context_from"]
    )


def runner_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen) -> str:
    """Its stderr, once it has ended well."""
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


@pytest.mark.slow
def test_a_shard_of_100k_lines_is_killed_and_resumed_into_what_one_session_writes(tmp_path):
    source = tmp_path / "big.jsonl"
    with source.open("w") as stream:
        for number in range(100_000):
            question = f"Name {number % 7 + 2} colours." if number % 3 else f"Count to {number % 5 + 2}."
            stream.write(json.dumps(chat(f"c{number:06d}", ("user", question), ("user", "Shorter."))) + "\n")
    common = [f"input.path={source}", "shard.count=20000", "shard.index=7", "generation.max_new_tokens=3"]
    whole = tmp_path / "whole"
    finished(runner_process(*common, f"hydra.run.dir={whole}"))
    expected = records_without_timings(whole / "chats" / "big.jsonl")
    assert [r["id"] for r in expected] == [f"c{n:06d}" for n in range(7, 100_000, 20_000)]

    run_dir = tmp_path / "killed"
    process = runner_process(*common, f"hydra.run.dir={run_dir}")
    chats = run_dir / "chats" / "big.jsonl"
    deadline = time.monotonic() + 300
    while not (chats.exists() and chats.read_bytes().count(b"\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    kept = chats.read_bytes().count(b"\n")
    resumed = finished(runner_process(*common, f"hydra.run.dir={run_dir}", "resume=true"))
    assert f"resuming with {kept} record(s) kept" in resumed
    assert records_without_timings(chats) == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["records"] == 5 and summary["records_kept_from_before"] == kept >= 1


@pytest.mark.slow
def test_shards_with_rejects_and_duplicates_between_them_merge_into_what_one_run_writes(tmp_path):
    source = tmp_path / "input.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    common = [f"input.path={source}", "input.on_error=skip", "generation.max_new_tokens=2"]
    shards = [tmp_path / f"shard{index}" for index in (0, 1)]
    runs = [runner_process(*common, f"hydra.run.dir={tmp_path / 'single'}")]
    runs += [
        runner_process(*common, "shard.count=2", f"shard.index={index}", f"hydra.run.dir={path}")
        for index, path in enumerate(shards)
    ]
    for process in runs:
        finished(process)
    merged = subprocess.run(
        [sys.executable, "-m", "runner.merge", str(tmp_path / "merged"), *map(str, shards)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert merged.returncode == 0, merged.stderr
    single, union = (tmp_path / name for name in ("single", "merged"))
    assert records_without_timings(union / "chats" / "input.jsonl") == records_without_timings(
        single / "chats" / "input.jsonl"
    )

    def rejects(run_dir: Path) -> list[tuple[int, str]]:
        lines = (run_dir / "rejected.jsonl").read_text().splitlines()
        return sorted((json.loads(line)["line"], json.loads(line)["code"]) for line in lines)

    assert (
        rejects(union)
        == rejects(single)
        == [(2, "invalid_json"), (4, "duplicate_id"), (7, "no_messages"), (8, "duplicate_id")]
    )
