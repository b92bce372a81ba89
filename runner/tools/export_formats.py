"""The export formats, each built in memory from a job's account: OpenAI Batch result lines, FastChat
answer lines, and the per-turn table (CSV and Parquet)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import Any

from runner.config.schema import InputFormat
from runner.rundir.layout import SUMMARY
from runner.rundir.reader import Run, turn_rows
from runner.tools.accounting import Account, Entry, Job, account
from runner.tools.report import spreadsheet_safe

TABLE_COLUMNS = (
    "run",
    "job",
    "overrides",
    "status",
    "conversation_id",
    "sample",
    "turn",
    "prompt",
    "reply",
    "reference",
    "prompt_tokens",
    "new_tokens",
    "seconds",
    "first_token_seconds",
    "finish_reason",
    "error",
)


# A batch result for a conversation of which no reply was generated, and none failed.
NO_TURN = {
    "code": "no_turn",
    "message": "no reply was generated: each user message has its reply in the input (gold_history)",
}


# The keys of a record replayed from an OpenAI Batch request line (the request refuses any other).
REQUEST_RECORD_KEYS = {"id", "method", "url", "body", "messages", "replay"}


def batch_results(job: Job, job_account: Account | None = None) -> list[dict[str, Any]]:
    """OpenAI Batch result lines, one per input line (a conversation's samples are its choices; a
    conversation that ended in an error, or a rejected line, is an error line)."""
    job_account = job_account or account(job)
    created = int(_written_at(job.run))
    request_body = _RequestBodies(job.run)
    lines = []
    for entry in job_account.entries:
        records = entry.records
        digest = _digest(job, entry)
        line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": entry.id}
        errors = [r["replay"]["error"] for r in records if r["replay"]["error"]]
        if not errors and any(not r["replay"]["turns"] for r in records):
            errors = [NO_TURN]
        if entry.error or errors:
            error = entry.error or errors[0]
            line.update(response=None, error={"code": error["code"], "message": error["message"]})
        else:
            last = [r["replay"]["turns"][-1] for r in records]
            body = {
                "id": f"chatcmpl-{digest}",
                "object": "chat.completion",
                "created": created,
                "model": (request_body(records[0], entry.stem) or {}).get("model") or job.run.model_name,
                "choices": [
                    {
                        "index": r["replay"]["sample"],
                        "message": {
                            "role": "assistant",
                            "content": r["messages"][t["message_index"]]["content"],
                        },
                        "finish_reason": t["finish_reason"],
                    }
                    for r, t in zip(records, last, strict=True)
                ],
                "usage": {
                    "prompt_tokens": last[0]["prompt_tokens"],
                    "completion_tokens": sum(t["new_tokens"] for t in last),
                    "total_tokens": last[0]["prompt_tokens"] + sum(t["new_tokens"] for t in last),
                },
            }
            line.update(
                response={"status_code": 200, "request_id": f"req_{digest}", "body": body}, error=None
            )
        lines.append(_marked(line, job))
    return lines


class _RequestBodies:
    """A record's OpenAI Batch request body: only a record replayed from a request line has one, and
    it is an object (any other line may carry a key `body` of its own, of any type)."""

    def __init__(self, run: Run):
        self.run = run
        self.form = (run.config.get("input") or {}).get("format", InputFormat.auto.value)
        self._lines: set[tuple[str, int]] | None = None
        self._read = False

    def __call__(self, record: dict[str, Any], stem: str) -> dict[str, Any] | None:
        body = record.get("body")
        if not isinstance(body, dict) or self.form not in ("auto", "openai_batch"):
            return None
        if self.form == "openai_batch":
            return body
        lines = self.request_lines()
        line = record["replay"].get("line")
        if lines is not None and line is not None:
            return body if (stem, line) in lines else None
        # The input cannot tell: a request's record has its keys only, a string id, no body.messages.
        shaped = set(record) <= REQUEST_RECORD_KEYS and isinstance(record["id"], str)
        return body if shaped and "messages" not in body else None

    def request_lines(self) -> set[tuple[str, int]] | None:
        """(input stem, line) of each input line that is a valid request (what input.format=auto
        reads as one), or None when the input cannot be read again."""
        if not self._read:
            self._read = True
            requests = self.run.input_conversations(InputFormat.openai_batch)
            if requests is not None:
                self._lines = {(c.source.stem, c.line) for c in requests}
        return self._lines


def mt_bench_answers(job: Job, job_account: Account | None = None) -> list[dict[str, Any]]:
    """FastChat answer lines: one per question, its samples as choices, each with every turn's reply
    (and its error, where it ended in one); a rejected question has no choices and the error."""
    job_account = job_account or account(job)
    tstamp = _written_at(job.run)
    lines = []
    for entry in job_account.entries:
        line: dict[str, Any] = {
            "question_id": entry.id,
            "answer_id": _digest(job, entry),
            "model_id": job.model_id,
            "choices": [_choice(record) for record in entry.records],
            "tstamp": tstamp,
        }
        if entry.error:
            line["error"] = entry.error
        lines.append(_marked(line, job))
    return lines


def _choice(record: dict[str, Any]) -> dict[str, Any]:
    replay = record["replay"]
    choice: dict[str, Any] = {
        "index": replay["sample"],
        "turns": [record["messages"][t["message_index"]]["content"] for t in replay["turns"]],
    }
    if replay["error"]:
        choice["error"] = {"code": replay["error"]["code"], "message": replay["error"]["message"]}
    return choice


def _marked(line: dict[str, Any], job: Job) -> dict[str, Any]:
    if job.name is not None:
        line["job"] = job.name
    if job.partial:
        line["partial"] = True
    return line


def table_files(accounts: list[Account]) -> dict[str, bytes]:
    """turns.csv (spreadsheet-safe) and, with pyarrow, turns.parquet (exact): a row per generated
    turn, and one for each input line without any (an error, a rejected line, not run)."""
    rows = []
    for job_account in accounts:
        job = job_account.job
        fixed = {
            "run": str(job.run.path),
            "job": job.name or "",
            "overrides": " ".join(job.overrides),
            "status": job.run.status,
        }
        empty = dict.fromkeys(TABLE_COLUMNS) | fixed
        for entry in job_account.entries:
            if entry.error:
                rows.append({**empty, "conversation_id": entry.id, "error": entry.error["code"]})
            for record in entry.records:
                replay = record["replay"]
                turns = turn_rows(record) or [
                    {
                        "conversation_id": record["id"],
                        "sample": replay["sample"],
                        "error": replay["error"]["code"] if replay["error"] else None,
                    }
                ]
                rows += [{**empty, **row} for row in turns]
    for row in rows:
        row["conversation_id"] = None if row["conversation_id"] is None else str(row["conversation_id"])
    stream = io.StringIO(newline="")
    writer = csv.DictWriter(stream, fieldnames=TABLE_COLUMNS)
    writer.writeheader()
    writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    files = {"turns.csv": stream.getvalue().encode("utf-8")}
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return files
    sink = pyarrow.BufferOutputStream()
    pyarrow.parquet.write_table(
        pyarrow.table({name: [row[name] for row in rows] for name in TABLE_COLUMNS}), sink
    )
    files["turns.parquet"] = sink.getvalue().to_pybytes()
    return files


def jsonl_bytes(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


def _written_at(run: Run) -> float:
    """When the run last wrote: its summary.json, else its newest chats file, else the dir."""
    candidates = [run.path / SUMMARY] if run.summary is not None else [*run.chat_files, run.path]
    return max(path.stat().st_mtime for path in candidates if path.exists())


def _digest(job: Job, entry: Entry) -> str:
    """A stable id for a job's answer to an input line."""
    key = entry.id if entry.id is not None else f"{entry.stem}:{entry.line}"
    return hashlib.sha256(f"{job.run.path.resolve()}\0{key}".encode()).hexdigest()[:24]
