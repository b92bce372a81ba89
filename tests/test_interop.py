"""OpenAI Batch requests in, and exports out: OpenAI Batch results, FastChat MT-bench answers and
the per-turn table, for a run and for a sweep."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT

from runner.inputs.reader import read_conversations


def request(custom_id: str, content: str, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **body},
    }


def python(*args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_batch_requests_are_conversations_with_their_own_settings(write_jsonl):
    source = write_jsonl(
        [
            request("a", "Hi", max_tokens=7, temperature=0, seed=5, stop="\n\n"),
            request("b", "Hi", max_completion_tokens=9, temperature=0.5, top_p=0.9, stop=["x", "y"]),
        ]
    )
    conversations, rejected = read_conversations([source])
    assert rejected == []
    first, second = conversations
    assert (first.id, first.messages[0].content) == ("a", "Hi")
    assert dict(first.settings) == {"max_new_tokens": 7, "do_sample": False, "seed": 5, "stop": ("\n\n",)}
    assert dict(second.settings) == {
        "max_new_tokens": 9,
        "do_sample": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ("x", "y"),
    }
    # What the request said is recorded with the conversation (the model too, never used).
    assert first.extra["body"]["model"] == "gpt-4o-mini" and "messages" not in first.extra["body"]


@pytest.mark.parametrize(
    ("line", "code", "message"),
    [
        (
            request("a", "Hi", frequency_penalty=0.5),
            "unsupported_option",
            "body.frequency_penalty: the runner cannot",
        ),
        (request("a", "Hi", n=2), "unsupported_option", "body.n=2: only 1 is supported"),
        (
            {**request("a", "Hi"), "url": "/v1/embeddings"},
            "unsupported_request",
            "only POST /v1/chat/completions",
        ),
        (request("a", "Hi", max_tokens=0), "invalid_request", "body.max_tokens=0 is out of range"),
        (request("a", "Hi", stop=["1", "2", "3", "4", "5"]), "invalid_request", "body.stop must be"),
        ({**request("a", "Hi"), "custom_id": 7}, "invalid_id", "'custom_id' must be a non-empty string"),
    ],
)
def test_a_request_the_runner_cannot_honour_is_a_bad_line(write_jsonl, line, code, message):
    source = write_jsonl([request("ok", "Hi"), line])
    conversations, [rejected] = read_conversations([source])
    assert [c.id for c in conversations] == ["ok"]
    assert (rejected.code, rejected.line) == (code, 2) and message in rejected.message
    assert str(rejected).startswith(f"{source}:2: ")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["continuous", "pipeline"])
def test_an_openai_batch_file_replays_and_exports_as_batch_results(write_jsonl, tmp_path, engine):
    requests = [
        request("first", "Count from 1 to 30, separated by commas.", max_tokens=6),
        request("second", "Count from 1 to 30, separated by commas.", max_completion_tokens=40, stop="\n3"),
        request("third", "Name a colour.", max_tokens=3),
    ]
    source = write_jsonl(requests, name="batch.jsonl")
    run_dir = tmp_path / "run"
    done = python("-m", "runner", f"input.path={source}", f"hydra.run.dir={run_dir}", f"engine={engine}")
    assert done.returncode == 0, done.stderr
    exported = python("-m", "runner.export", str(run_dir), "--format", "openai-batch")
    assert exported.returncode == 0, exported.stderr
    path = run_dir / "exports" / "openai-batch" / "results.jsonl"
    assert exported.stdout.strip() == str(path)
    results = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == ["first", "second", "third"]  # ids and order kept
    for result in results:
        assert result["error"] is None and result["response"]["status_code"] == 200
        body = result["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
        assert body["id"].startswith("chatcmpl-") and result["id"].startswith("batch_req_")
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    first, second, third = (r["response"]["body"] for r in results)
    # Each request's own max_tokens, not the run's 256.
    assert (first["usage"]["completion_tokens"], first["choices"][0]["finish_reason"]) == (6, "length")
    assert third["usage"]["completion_tokens"] <= 3
    # Its stop string ends the reply, which does not keep it (greedy: the same start as the first's).
    reply = second["choices"][0]["message"]["content"]
    assert second["choices"][0]["finish_reason"] == "stop" and "\n3" not in reply
    assert reply.startswith(first["choices"][0]["message"]["content"])
    assert second["usage"]["completion_tokens"] < 40


def mt_bench_questions(count: int) -> list[dict]:
    """MT-bench question lines (FastChat's question.jsonl shape)."""
    return [
        {
            "question_id": 81 + n,
            "category": "writing",
            "turns": [f"Write one line about the number {n}.", "Shorter."],
        }
        for n in range(count)
    ]


def fastchat_load_model_answers(answer_dir: Path) -> dict:
    """What FastChat's llm_judge/common.py `load_model_answers` does, as gen_judgment.py calls it."""
    model_answers = {}
    for filename in sorted(glob.glob(os.path.join(answer_dir, "*.jsonl"))):
        model_name = os.path.basename(filename)[:-6]
        answer = {}
        with open(filename) as fin:
            for line in fin:
                line = json.loads(line)
                answer[line["question_id"]] = line
        model_answers[model_name] = answer
    return model_answers


@pytest.mark.slow
def test_a_sweep_exports_fastchat_answers_batch_results_and_a_table_naming_each_job(write_jsonl, tmp_path):
    questions = mt_bench_questions(2)
    source = write_jsonl(questions, name="question.jsonl")
    sweep = tmp_path / "sweep"
    done = python(
        "-m",
        "runner",
        "-m",
        f"input.path={source}",
        "generation.max_new_tokens=3,4",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 0, done.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "summary.json").is_file())

    exported = python(
        "-m", "runner.export", str(sweep), "--format", "mt-bench", "--out", str(tmp_path / "model_answer")
    )
    assert exported.returncode == 0, exported.stderr
    answers = fastchat_load_model_answers(tmp_path / "model_answer")
    # Named by the model and what sets the job apart.
    assert sorted(answers) == [f"smollm2_135m_generation.max_new_tokens={n}" for n in (3, 4)]
    for model_id, by_question in answers.items():
        assert sorted(by_question) == [81, 82]  # int question ids, as in question.jsonl
        for question in questions:
            answer = by_question[question["question_id"]]
            assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "job"}
            assert answer["model_id"] == model_id and isinstance(answer["answer_id"], str)
            assert isinstance(answer["tstamp"], float) and answer["job"] in jobs
            [choice] = answer["choices"]
            assert choice["index"] == 0 and len(choice["turns"]) == len(question["turns"])
            assert all(isinstance(turn, str) and turn for turn in choice["turns"])

    batch = python("-m", "runner.export", str(sweep), "--format", "openai-batch")
    assert batch.returncode == 0, batch.stderr
    for job in jobs:
        lines = [
            json.loads(line)
            for line in (sweep / "exports" / "openai-batch" / f"{job}.jsonl").read_text().splitlines()
        ]
        assert [(line["custom_id"], line["job"]) for line in lines] == [(81, job), (82, job)]

    table = python("-m", "runner.export", str(sweep), "--format", "table")
    assert table.returncode == 0, table.stderr
    with (sweep / "exports" / "table" / "turns.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 * 2 * 2  # jobs x questions x turns
    assert sorted({row["job"] for row in rows}) == jobs
    assert {row["overrides"] for row in rows} == {
        f"input.path={source} generation.max_new_tokens=3",
        f"input.path={source} generation.max_new_tokens=4",
    }
    first = rows[0]
    assert (first["conversation_id"], first["turn"], first["prompt"]) == ("81", "0", questions[0]["turns"][0])
    assert first["reply"] and int(first["new_tokens"]) <= 4 and first["finish_reason"] in {"stop", "length"}
