"""Exports, merge and the report as a user meets them, model-free (run dirs built by hand, or the old
run dirs of tests/fixtures/rundir_v1): every input line accounted for, unfinished runs refused or
marked, answer files that do not overwrite each other, one-line refusals, and output that no
spreadsheet or Markdown viewer runs."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from test_interop import fastchat_load_model_answers, python, request

from runner.rundir.reader import Run, read_records
from runner.tools import export as export_tool
from runner.tools import merge as merge_tool
from runner.tools import report, view

FIXTURE = Path(__file__).parent / "fixtures" / "rundir_v1"
MODEL = "smollm2_135m"


def turn_record(conversation_id, line, *replies, error=None, **extra) -> dict:
    """A chats line as the runner writes it: a user message and a generated reply per reply."""
    messages, turns = [], []
    for number, reply in enumerate(replies):
        messages += [
            {"role": "user", "content": f"question {number}"},
            {"role": "assistant", "content": reply},
        ]
        turns.append(
            {
                "message_index": len(messages) - 1,
                "prompt_tokens": 10,
                "new_tokens": 3,
                "seconds": 0.1,
                "first_token_seconds": 0.05,
                "finish_reason": "length",
                "reference": None,
                "control_tokens_in_content": 0,
            }
        )
    if error is not None:
        messages.append({"role": "user", "content": "a question too long to answer"})
    replay = {"line": line, "sample": 0, "seed": 1, "system_folded": False, "chat_template_sha256": "x"}
    return {
        "id": conversation_id,
        **extra,
        "messages": messages,
        "replay": {**replay, "error": error, "turns": turns},
    }


def reject(
    line: int, code: str, message: str, raw: str, conversation_id=None, file: str = "in.jsonl"
) -> dict:
    return {"file": file, "line": line, "id": conversation_id, "code": code, "message": message, "raw": raw}


def make_run(
    directory: Path,
    records: list[dict],
    *,
    rejects: list[dict] = (),
    status: str | None = "completed",
    overrides: list[str] = ("input.path=in.jsonl",),
    input_lines: list[dict | str] | None = None,
    input_format: str = "auto",
) -> Path:
    """A run dir as the runner leaves it: chats, rejects, manifest, overrides and (unless `status` is
    None: a run killed before it wrote one) its summary. `input_lines` also writes its input, in.jsonl
    in the current directory, which the manifest names as the run was given it."""
    (directory / "chats").mkdir(parents=True)
    (directory / ".hydra").mkdir()
    (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (directory / "chats" / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if rejects:
        (directory / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    if input_lines is not None:
        text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in input_lines)
        Path("in.jsonl").write_text(text)
    digest = hashlib.sha256(Path("in.jsonl").read_bytes()).hexdigest() if Path("in.jsonl").is_file() else "0"
    config = {
        "model": {"name": MODEL},
        "input": {"path": "in.jsonl", "format": input_format, "on_error": "skip", "max_line_bytes": 2**20},
        "generation": {"num_samples": 1},
        "shard": {"index": 0, "count": 1},
    }
    (directory / "manifest.json").write_text(
        json.dumps({"config": config, "inputs": [{"path": "in.jsonl", "sha256": digest}]})
    )
    if status is not None:
        summary = {
            "status": status,
            "model": {"name": MODEL},
            "input_files": ["in.jsonl"],
            "chat_files": ["chats/in.jsonl"],
            "records": len(records),
        }
        (directory / "summary.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """A working directory, where the runs' input in.jsonl lies (manifests name it relatively)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def old_dirs(tmp_path, monkeypatch) -> Path:
    """A copy of the old run dirs, with the input they read where their manifests say (relative)."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    return tmp_path / "old"


def run_export(*argv: str) -> None:
    """`python -m runner.export ...` in this process."""
    export_tool.main([str(arg) for arg in argv])


def refused(main, *argv: str) -> str:
    """The one line a refused command exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in message
    return message


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


# 1. A `body` key that is not an OpenAI Batch request's


def test_a_body_key_of_a_messages_line_is_no_request_body(here, capsys):
    lines = [
        {"id": "text", "body": "not an object", "messages": [{"role": "user", "content": "q"}]},
        {"id": "object", "body": {"model": "not-a-request"}, "messages": [{"role": "user", "content": "q"}]},
        request("req", "q"),
    ]
    records = [
        turn_record("text", 1, "a", body="not an object"),
        turn_record("object", 2, "a", body={"model": "not-a-request"}),
        turn_record("req", 3, "a", body={"model": "gpt-4o-mini"}, method="POST", url="/v1/chat/completions"),
    ]
    run = make_run(here / "run", records, input_lines=lines)
    run_export(run, "--format", "openai-batch")
    results = jsonl(run / "exports" / "openai-batch" / "results.jsonl")
    assert [(r["custom_id"], r["response"]["body"]["model"]) for r in results] == [
        ("text", MODEL),
        ("object", MODEL),  # a messages line's own body, not a request's
        ("req", "gpt-4o-mini"),  # a request's model is echoed back
    ]


# 2. A conversation that ended in an error


def test_a_conversation_that_ended_in_an_error_is_in_every_export_and_counted(here, capsys):
    overflow = {
        "code": "context_overflow",
        "message": "prompt of 9000 tokens exceeds 8192",
        "prompt_tokens": 9000,
    }
    # "answered": gold_history with every reply in the input, nothing to generate.
    records = [
        turn_record("ok", 1, "fine"),
        turn_record("long", 2, error=overflow),
        turn_record("answered", 3),
    ]
    run = make_run(here / "run", records)

    run_export(run, "--format", "table")
    assert "1 ended in an error (context_overflow: 1)" in capsys.readouterr().err
    rows = csv_rows(run / "exports" / "table" / "turns.csv")
    assert [(r["conversation_id"], r["turn"], r["error"]) for r in rows] == [
        ("ok", "0", ""),
        ("long", "", "context_overflow"),
        ("answered", "", ""),
    ]

    run_export(run, "--format", "mt-bench")
    assert "warning:" in capsys.readouterr().err
    answers = fastchat_load_model_answers(run / "exports" / "mt-bench")[MODEL]
    assert answers["ok"]["choices"] == [{"index": 0, "turns": ["fine"]}]
    [choice] = answers["long"]["choices"]
    assert choice["turns"] == []
    assert choice["error"] == {"code": "context_overflow", "message": overflow["message"]}

    run_export(run, "--format", "openai-batch")
    [ok, long, answered] = jsonl(run / "exports" / "openai-batch" / "results.jsonl")
    assert ok["error"] is None
    assert (long["response"], long["error"]["code"]) == (None, "context_overflow")
    assert (answered["response"], answered["error"]["code"]) == (None, "no_turn")


# 3. Rejected requests in the OpenAI Batch results


def test_every_request_is_a_result_or_an_error_line_in_input_order(here, capsys):
    bad_model = {**request("r2", "q"), "body": {"messages": [], "n": 2}}
    lines = [request("r1", "q"), bad_model, request("r3", "q"), {**request("r4", "q"), "custom_id": ""}]
    lines.append('{"custom_id": "r5", "body": ')  # invalid JSON: no id can be read
    rejects = [
        reject(2, "unsupported_option", "body.n=2: only 1 is supported", json.dumps(bad_model), "r2"),
        reject(4, "invalid_id", "'custom_id' must be a non-empty string", json.dumps(lines[3]), ""),
        reject(5, "invalid_json", "invalid JSON: Expecting value (column 28)", lines[4]),
    ]
    records = [
        turn_record(cid, line, "a", method="POST", url="/v1/chat/completions", body={"model": "gpt-4o-mini"})
        for cid, line in (("r1", 1), ("r3", 3))
    ]
    run = make_run(here / "run", records, rejects=rejects, input_lines=lines)
    run_export(run, "--format", "openai-batch")
    results = jsonl(run / "exports" / "openai-batch" / "results.jsonl")
    assert [(r["custom_id"], r["error"] and r["error"]["code"]) for r in results] == [
        ("r1", None),
        ("r2", "unsupported_option"),
        ("r3", None),
        ("", "invalid_id"),
        (None, "invalid_json"),
    ]
    r2 = results[1]
    assert r2["response"] is None and r2["error"]["message"] == "in.jsonl:2: body.n=2: only 1 is supported"
    assert len({r["id"] for r in results}) == 5
    assert "3 rejected input line(s) (unsupported_option: 1, invalid_id: 1, invalid_json: 1)" in (
        capsys.readouterr().err
    )


# 4. Unfinished runs: refused, or exported marked partial


@pytest.mark.parametrize(
    ("status", "said"), [("interrupted", "status interrupted"), (None, "no summary.json")]
)
def test_an_unfinished_run_is_refused_unless_partial(here, capsys, status, said):
    lines = [{"id": f"c{n}", "messages": [{"role": "user", "content": "q"}]} for n in range(3)]
    run = make_run(here / "run", [turn_record("c0", 1, "a")], status=status, input_lines=lines)
    for form in export_tool.FORMATS:
        message = refused(export_tool.main, run, "--format", form)
        assert message.startswith(f"error: {run} is not finished ({said}") and "--partial" in message
    assert not (run / "exports").exists()

    run_export(run, "--format", "openai-batch", "--partial")
    err = capsys.readouterr().err
    assert "PARTIAL" in err and "the 2 conversation(s) it did not reach are errors (not_run)" in err
    results = jsonl(run / "exports" / "openai-batch" / "results.jsonl")
    assert [(r["custom_id"], r["partial"]) for r in results] == [("c0", True), ("c1", True), ("c2", True)]
    assert [r["error"] and r["error"]["code"] for r in results] == [None, "not_run", "not_run"]

    run_export(run, "--format", "mt-bench", "--partial")
    answers = jsonl(run / "exports" / "mt-bench" / f"{MODEL}.jsonl")
    assert all(answer["partial"] for answer in answers)
    assert [a.get("error", {}).get("code") for a in answers] == [None, "not_run", "not_run"]

    run_export(run, "--format", "table", "--partial")
    rows = csv_rows(run / "exports" / "table" / "turns.csv")
    assert {row["status"] for row in rows} == {status or "unfinished"}
    assert [(r["conversation_id"], r["error"]) for r in rows] == [
        ("c0", ""),
        ("c1", "not_run"),
        ("c2", "not_run"),
    ]


def test_a_partial_export_says_when_the_conversations_not_reached_are_unknown(here, capsys):
    lines = [{"id": f"c{n}", "messages": [{"role": "user", "content": "q"}]} for n in range(3)]
    run = make_run(here / "run", [turn_record("c0", 1, "a")], status="failed", input_lines=lines)
    Path("in.jsonl").unlink()
    run_export(run, "--format", "openai-batch", "--partial")
    assert "the conversations it did not reach are not listed" in capsys.readouterr().err
    assert [r["custom_id"] for r in jsonl(run / "exports" / "openai-batch" / "results.jsonl")] == ["c0"]


def test_a_sweep_with_an_interrupted_job_is_refused_naming_it(here, capsys):
    lines = [{"id": "c0", "messages": [{"role": "user", "content": "q"}]}]
    sweep = here / "sweep"
    make_run(sweep / "0_quant=none", [turn_record("c0", 1, "a")], overrides=["quant=none"], input_lines=lines)
    make_run(sweep / "1_quant=int4", [], overrides=["quant=int4"], status="interrupted")
    message = refused(export_tool.main, sweep, "--format", "mt-bench")
    assert f"{sweep / '1_quant=int4'} (status interrupted)" in message and "--partial" in message
    assert str(sweep / "0_quant=none") not in message
    assert not (sweep / "exports").exists()

    run_export(sweep, "--format", "mt-bench", "--partial")
    answers = fastchat_load_model_answers(sweep / "exports" / "mt-bench")
    assert "partial" not in answers[f"{MODEL}_quant=none"]["c0"]
    assert answers[f"{MODEL}_quant=int4"]["c0"]["partial"] is True
    assert answers[f"{MODEL}_quant=int4"]["c0"]["error"]["code"] == "not_run"


# 5. MT-bench answer files of single runs


def test_single_runs_get_their_own_model_id_and_never_overwrite_each_other(here, capsys):
    out = here / "model_answer"
    runs = {}
    for name, setting in (("int4", "quant=int4"), ("fp32", "precision=fp32"), ("int4_again", "quant=int4")):
        overrides = ["input.path=in.jsonl", "hydra.run.dir=x", setting, "generation.max_new_tokens=3"]
        runs[name] = make_run(here / name, [turn_record("q", 1, f"by {name}")], overrides=overrides)
    run_export(runs["int4"], "--format", "mt-bench", "--out", out)
    run_export(runs["fp32"], "--format", "mt-bench", "--out", out)
    answers = fastchat_load_model_answers(out)
    assert sorted(answers) == [f"{MODEL}_precision=fp32", f"{MODEL}_quant=int4"]
    assert answers[f"{MODEL}_quant=int4"]["q"]["model_id"] == f"{MODEL}_quant=int4"
    assert answers[f"{MODEL}_quant=int4"]["q"]["choices"][0]["turns"] == ["by int4"]

    run_export(runs["int4"], "--format", "mt-bench", "--out", out)  # the same run again: replaced
    before = (out / f"{MODEL}_quant=int4.jsonl").read_text()
    message = refused(export_tool.main, runs["int4_again"], "--format", "mt-bench", "--out", out)
    assert message.startswith(f"error: {out / f'{MODEL}_quant=int4.jsonl'}: already holds the export of")
    assert str(runs["int4"].resolve()) in message
    assert (out / f"{MODEL}_quant=int4.jsonl").read_text() == before

    (out / "vicuna.jsonl").write_text("{}\n")  # someone else's file: not replaced either
    vicuna = make_run(here / "other", [turn_record("q", 1, "x")], overrides=[])
    (vicuna / "summary.json").write_text(json.dumps({"status": "completed", "model": {"name": "vicuna"}}))
    message = refused(export_tool.main, vicuna, "--format", "mt-bench", "--out", out)
    assert "vicuna.jsonl: already holds a file not exported from" in message
    assert (out / "vicuna.jsonl").read_text() == "{}\n"


# 6. --out that cannot be written


def out_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a_file").write_text("x")
    return {
        "an existing file": (tmp_path / "a_file", "exists and is not a directory"),
        "under a file": (tmp_path / "a_file" / "answers", "Not a directory"),
        "under /proc": (Path("/proc/chat-runner-export/answers"), "No such file or directory"),
    }


@pytest.mark.parametrize("case", ["an existing file", "under a file", "under /proc"])
@pytest.mark.parametrize("form", export_tool.FORMATS)
def test_an_out_that_cannot_be_written_is_one_line(here, case, form):
    run = make_run(here / "run", [turn_record("q", 1, "a")])
    out, reason = out_cases(here)[case]
    message = refused(export_tool.main, run, "--format", form, "--out", out)
    assert message.startswith("error: ") and message.endswith(f": {reason}")
    assert str(out) in message or str(out.parent) in message
    assert not (run / "exports").exists() and not Path("/proc/chat-runner-export").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_an_unwritable_out_is_one_line(here):
    run = make_run(here / "run", [turn_record("q", 1, "a")])
    (here / "locked").mkdir(mode=0o500)
    message = refused(export_tool.main, run, "--format", "table", "--out", here / "locked" / "new")
    assert message == f"error: {here / 'locked' / 'new'}: Permission denied"


def test_a_failed_write_leaves_no_export_dir_behind(here, monkeypatch):
    run = make_run(here / "run", [turn_record("q", 1, "a")])

    def full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = here / "new" / "deeper" / "answers"
    message = refused(export_tool.main, run, "--format", "mt-bench", "--out", out)
    assert message == f"error: {out / f'{MODEL}.jsonl'}: No space left on device"
    assert not (here / "new").exists()
    message = refused(export_tool.main, run, "--format", "table")
    assert message.endswith(": No space left on device")
    assert not (run / "exports").exists()


# 7. merge: one line, never a traceback, never half a merge


def test_merge_into_a_file_is_one_line(old_dirs):
    (old_dirs / "a_file").write_text("x")
    shards = [old_dirs / "shard0", old_dirs / "shard1"]
    message = refused(merge_tool.main, old_dirs / "a_file", *shards)
    assert (
        message == f"error: {old_dirs / 'a_file'}: exists and is not a directory: merge into a new directory"
    )
    message = refused(merge_tool.main, old_dirs / "a_file" / "merged", *shards)
    assert message.startswith(f"error: {old_dirs / 'a_file' / 'merged'}") and "Not a directory" in message
    assert (old_dirs / "a_file").read_text() == "x"


def test_merge_of_a_shard_with_a_corrupt_summary_is_one_line(old_dirs):
    (old_dirs / "shard1" / "summary.json").write_text('{"status": "completed", "records": ')
    message = refused(merge_tool.main, "remerged", "shard0", "shard1")
    assert message.startswith("error: shard1/summary.json: not a readable summary")
    assert not (old_dirs / "remerged").exists()


def test_a_merge_that_fails_to_write_leaves_nothing_behind(old_dirs, monkeypatch):
    def full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    message = refused(merge_tool.main, "new/merged", "shard0", "shard1")
    assert message.endswith("No space left on device")
    assert not Path("new").exists()


# 8. CSV cells that a spreadsheet would run


FORMULAS = ['=HYPERLINK("http://evil.example","click")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]


def test_csv_cells_that_would_run_as_formulas_start_with_a_quote(here):
    records = [turn_record(text, n, text) for n, text in enumerate(FORMULAS, start=1)]
    records.append(turn_record("plain", 7, "a = b, + c"))
    run = make_run(here / "run", records)
    run_export(run, "--format", "table")
    rows = csv_rows(run / "exports" / "table" / "turns.csv")
    assert [(row["conversation_id"], row["reply"]) for row in rows] == [
        *((f"'{text}", f"'{text}") for text in FORMULAS),
        ("plain", "a = b, + c"),
    ]


def test_the_parquet_table_keeps_the_cells_exact(here):
    parquet = pytest.importorskip("pyarrow.parquet")
    run = make_run(here / "run", [turn_record(text, n, text) for n, text in enumerate(FORMULAS, start=1)])
    run_export(run, "--format", "table")
    table = parquet.read_table(run / "exports" / "table" / "turns.parquet").to_pydict()
    assert table["reply"] == FORMULAS and table["conversation_id"] == FORMULAS


def sweep_job(sweep: Path, name: str, overrides: list[str], **summary) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))  # YAML reads a JSON list
    (job / "summary.json").write_text(json.dumps({"status": "completed", **summary}))
    return job


def test_report_csv_cells_that_would_run_as_formulas_start_with_a_quote(tmp_path):
    sweep_job(tmp_path, "0_a", ["+evil=x"], tokens_per_second=1.5)
    sweep_job(tmp_path, "1_b", ["quant=int4"], status="failed", error="=HYPERLINK(1)")
    report.write_report(tmp_path)
    rows = csv_rows(tmp_path / "report.csv")
    assert [(row["overrides"], row["error"], row["tokens_per_second"]) for row in rows] == [
        ("'+evil=x", "", "1.5"),
        ("quant=int4", "'=HYPERLINK(1)", ""),
    ]


# 9. report.md: text, never markup


def test_report_md_shows_html_of_paths_and_overrides_as_text(tmp_path):
    evil = "input.path=<img src=x onerror=alert(1)>&x|y.jsonl"
    sweep_job(tmp_path, "0_a", [evil, "quant=none"])
    sweep_job(tmp_path, "1_b", [evil, "quant=int4"], status="failed", error="<script>alert(2)</script>")
    report.write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "<img" not in text and "<script>" not in text
    assert "input.path=&lt;img src=x onerror=alert(1)&gt;&amp;x\\|y.jsonl quant=none" in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    assert all(line.count(" | ") == len(report.COLUMNS) - 1 for line in text.splitlines() if "quant=" in line)


# 10. Merged runs: the viewer and every export, every conversation in each


def test_a_merged_run_views_and_exports_every_conversation(old_dirs, capsys):
    merge_tool.merge([old_dirs / "shard0", old_dirs / "shard1"], old_dirs / "remerged")
    for merged in (old_dirs / "remerged", old_dirs / "merged"):  # merged now, and by the old layout
        data = view.collect(merged, None)
        assert [c["id"] for c in data["conversations"]] == ["capital", "hi", "81"]
        assert view.build(merged).is_file()
        for form in export_tool.FORMATS:
            run_export(merged, "--format", form)
        exports = merged / "exports"
        # A result per conversation, and an error line for the rejected one: every input line.
        results = jsonl(exports / "openai-batch" / "results.jsonl")
        assert [(r["custom_id"], r["error"] and r["error"]["code"]) for r in results] == [
            ("capital", None),
            ("hi", None),
            (81, None),
            ("bad", "no_messages"),
        ]
        assert "1 rejected input line(s) (no_messages: 1)" in capsys.readouterr().err
        answers = jsonl(exports / "mt-bench" / f"{MODEL}.jsonl")
        assert [a["question_id"] for a in answers] == ["capital", "hi", 81, "bad"]
        assert [len(a["choices"][0]["turns"]) for a in answers[:3]] == [2, 1, 2]
        assert answers[3]["choices"] == [] and answers[3]["error"]["code"] == "no_messages"
        rows = csv_rows(exports / "table" / "turns.csv")
        assert [(r["conversation_id"], r["turn"], r["error"]) for r in rows] == [
            ("capital", "0", ""),
            ("capital", "1", ""),
            ("hi", "0", ""),
            ("81", "0", ""),
            ("81", "1", ""),
            ("bad", "", "no_messages"),
        ]
        assert {r["status"] for r in rows} == {"merged"}


def test_the_records_of_a_merged_run_are_the_single_runs(old_dirs):
    merge_tool.merge([old_dirs / "shard0", old_dirs / "shard1"], old_dirs / "remerged")
    merged, single = Run.open(old_dirs / "remerged"), Run.open(old_dirs / "run")
    assert [r["id"] for r in merged.records] == [r["id"] for r in single.records]
    assert merged.finished and single.finished and merged.status == "merged"
    assert read_records(old_dirs / "remerged" / "rejected.jsonl")[0]["id"] == "bad"


# The real CLI, once: a batch file with a rejected request, a messages line with a body of its own
# and a conversation too long for the model's context.


@pytest.mark.slow
def test_a_real_run_exports_every_request_and_conversation(write_jsonl, tmp_path):
    too_long = " ".join(["word"] * 9000)  # more tokens than SmolLM2's 8192 context
    lines = [
        request("first", "Name a colour.", max_tokens=3),
        {**request("refused", "Hi"), "body": {"messages": [{"role": "user", "content": "Hi"}], "n": 3}},
        {"id": "own-body", "body": "not an object", "messages": [{"role": "user", "content": "Hi"}]},
        {"id": "long", "messages": [{"role": "user", "content": too_long}]},
    ]
    source = write_jsonl(lines, name="batch.jsonl")
    run_dir = tmp_path / "run"
    done = python(
        "-m", "runner", f"input.path={source}", "input.on_error=skip", "generation.max_new_tokens=3",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    exported = python("-m", "runner.export", str(run_dir), "--format", "openai-batch")
    assert exported.returncode == 0, exported.stderr
    results = jsonl(run_dir / "exports" / "openai-batch" / "results.jsonl")
    assert [(r["custom_id"], r["error"] and r["error"]["code"]) for r in results] == [
        ("first", None),
        ("refused", "unsupported_option"),
        ("own-body", None),
        ("long", "context_overflow"),
    ]
    assert results[0]["response"]["body"]["model"] == "gpt-4o-mini"
    assert results[2]["response"]["body"]["model"] == MODEL
    assert "1 ended in an error (context_overflow: 1)" in exported.stderr
    table = python("-m", "runner.export", str(run_dir), "--format", "table")
    assert table.returncode == 0, table.stderr
    rows = csv_rows(run_dir / "exports" / "table" / "turns.csv")
    assert [(r["conversation_id"], r["error"]) for r in rows] == [
        ("first", ""),
        ("refused", "unsupported_option"),
        ("own-body", ""),
        ("long", "context_overflow"),
    ]


def test_csv_of_the_table_reads_back_with_the_csv_module(here):
    """The table is plain CSV: a reply with commas, quotes and newlines is one cell."""
    text = 'a, "b"\nc'
    run = make_run(here / "run", [turn_record("q", 1, text)])
    run_export(run, "--format", "table")
    raw = (run / "exports" / "table" / "turns.csv").read_text(encoding="utf-8")
    [row] = list(csv.DictReader(io.StringIO(raw, newline="")))
    assert row["reply"] == text
