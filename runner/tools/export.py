"""`python -m runner.export <run or sweep dir> --format openai-batch|mt-bench|table [--out DIR]`:
a run's chats in the formats other tools read.

- `openai-batch`: OpenAI Batch API result lines, one file per job: `{"id", "custom_id",
  "response": {"status_code": 200, "request_id", "body": <chat.completion>}, "error": null}`, or
  `"response": null` and `"error": {"code", "message"}` for a conversation that ended in an error.
  The completion is the conversation's last reply, its usage that turn's tokens; samples are its
  choices.
- `mt-bench`: FastChat answer files (`model_answer/<model_id>.jsonl`, what `gen_judgment.py`
  reads): one line per question, `{"question_id", "answer_id", "model_id", "choices": [{"index",
  "turns": [reply, ...]}], "tstamp"}`; one file per job, named by its model and the overrides that
  set the jobs apart.
- `table`: one row per generated turn as `turns.csv`, and `turns.parquet` when pyarrow is installed.

Written into `<dir>/exports/<format>/` unless `--out` says where; the paths are printed. In a
sweep, every result line, answer line and table row names its job.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.rundir.layout import SUMMARY, safe_name
from runner.rundir.reader import Run, turn_rows
from runner.rundir.writer import write_jsonl_atomically
from runner.tools.report import job_labels, job_rows

FORMATS = ("openai-batch", "mt-bench", "table")
TABLE_COLUMNS = (
    "run",
    "job",
    "overrides",
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


@dataclass(frozen=True)
class Job:
    """One run of a sweep (or the run itself): its name, the user's overrides, what sets it apart
    from the sweep's other jobs (the report's label), and its run read back."""

    name: str | None  # None for a single run
    overrides: list[str]
    label: str
    run: Run

    @property
    def model_id(self) -> str:
        """FastChat's model_id: the model's name, then what sets the job apart."""
        model = self.run.model_name
        return safe_name("_".join([model, *(o for o in self.label.split() if not o.startswith("model="))]))


def jobs_of(directory: Path) -> list[Job]:
    """The run dir itself, or each finished job of a sweep dir (in job order)."""
    if (directory / SUMMARY).is_file():
        run = Run.open(directory)
        return [Job(None, run.user_overrides(), "", run)]
    rows = [row for row in job_rows(directory) if (directory / row["job"] / SUMMARY).is_file()]
    if not rows:
        raise RunnerError(f"{directory} is neither a run dir nor a sweep dir with finished jobs")
    return [
        Job(row["job"], row["overrides"].split(), label, Run.open(directory / row["job"]))
        for row, label in zip(rows, job_labels(rows), strict=True)
    ]


def export(directory: Path, form: str, out: Path | None = None) -> list[Path]:
    """Write `directory`'s chats in `form` into `out` (default `<directory>/exports/<form>`)."""
    jobs = jobs_of(directory)
    out = out or directory / "exports" / form
    out.mkdir(parents=True, exist_ok=True)
    if form == "table":
        return _table(jobs, out)
    written = []
    for job in jobs:
        if form == "openai-batch":
            path = out / f"{safe_name(job.name) if job.name else 'results'}.jsonl"
            write_jsonl_atomically(path, batch_results(job))
        else:
            path = out / f"{job.model_id}.jsonl"
            write_jsonl_atomically(path, mt_bench_answers(job))
        written.append(path)
    return written


def batch_results(job: Job) -> list[dict[str, Any]]:
    """OpenAI Batch result lines, one per conversation (its samples are the choices)."""
    lines = []
    created = int(Path(job.run.path / "summary.json").stat().st_mtime)
    for conversation_id, records in _by_conversation(job.run.records).items():
        digest = _digest(job, conversation_id)
        errors = [r["replay"]["error"] for r in records if r["replay"]["error"]]
        line: dict[str, Any] = {"id": f"batch_req_{digest}", "custom_id": conversation_id}
        if errors:
            line.update(response=None, error={"code": errors[0]["code"], "message": errors[0]["message"]})
        else:
            last = [r["replay"]["turns"][-1] for r in records]
            body = {
                "id": f"chatcmpl-{digest}",
                "object": "chat.completion",
                "created": created,
                "model": records[0].get("body", {}).get("model") or job.run.model_name,
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
        if job.name is not None:
            line["job"] = job.name
        lines.append(line)
    return lines


def mt_bench_answers(job: Job) -> list[dict[str, Any]]:
    """FastChat answer lines: one per question, its samples as choices, each with every turn's reply."""
    tstamp = Path(job.run.path / "summary.json").stat().st_mtime
    lines = []
    for conversation_id, records in _by_conversation(job.run.records).items():
        line = {
            "question_id": conversation_id,
            "answer_id": _digest(job, conversation_id),
            "model_id": job.model_id,
            "choices": [
                {
                    "index": r["replay"]["sample"],
                    "turns": [r["messages"][t["message_index"]]["content"] for t in r["replay"]["turns"]],
                }
                for r in records
            ],
            "tstamp": tstamp,
        }
        if job.name is not None:
            line["job"] = job.name
        lines.append(line)
    return lines


def _table(jobs: list[Job], out: Path) -> list[Path]:
    rows = [
        {"run": str(job.run.path), "job": job.name or "", "overrides": " ".join(job.overrides), **row}
        for job in jobs
        for record in job.run.records
        for row in turn_rows(record)
    ]
    written = [out / "turns.csv"]
    with written[0].open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows({**row, "conversation_id": str(row["conversation_id"])} for row in rows)
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return written
    columns = {name: [row[name] for row in rows] for name in TABLE_COLUMNS}
    columns["conversation_id"] = [str(value) for value in columns["conversation_id"]]
    pyarrow.parquet.write_table(pyarrow.table(columns), out / "turns.parquet")
    return [*written, out / "turns.parquet"]


def _by_conversation(records: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        grouped[record["id"]].append(record)
    return grouped


def _digest(job: Job, conversation_id: Any) -> str:
    """A stable id for a job's answer to a conversation."""
    key = f"{job.run.path.resolve()}\0{conversation_id}".encode()
    return hashlib.sha256(key).hexdigest()[:24]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.export", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a run dir or a sweep dir")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="form")
    parser.add_argument("--out", type=Path, help="where to write (default: <directory>/exports/<format>)")
    args = parser.parse_args(argv)
    try:
        for path in export(args.directory, args.form, args.out):
            print(path)
    except RunnerError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
