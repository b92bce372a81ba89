"""`python -m runner.export <run or sweep dir> --format openai-batch|mt-bench|table [--out DIR] [--partial]`:
a run's chats in the formats other tools read.

- `openai-batch`: OpenAI Batch API result lines, one file per job: `{"id", "custom_id",
  "response": {"status_code": 200, "request_id", "body": <chat.completion>}, "error": null}`, or
  `"response": null` and `"error": {"code", "message"}` for a conversation that ended in an error and
  for a rejected input line, in input order. The completion is the conversation's last reply, its
  usage that turn's tokens; samples are its choices.
- `mt-bench`: FastChat answer files (`model_answer/<model_id>.jsonl`, what `gen_judgment.py`
  reads): one line per question, `{"question_id", "answer_id", "model_id", "choices": [{"index",
  "turns": [reply, ...]}], "tstamp"}`; one file per job, named by its model and the overrides that
  set it apart. A sample that ended in an error has `"error": {"code", "message"}` on its choice; a
  rejected question is a line with no choices and the `error`.
- `table`: one row per generated turn as `turns.csv` (cells a spreadsheet would run as a formula
  start with `'`), and `turns.parquet` (exact) when pyarrow is installed; a conversation with no
  generated turn, and a rejected line, is a row with no turn and its error code.

Every input line of a job is accounted for: a result, or an error. Written into
`<dir>/exports/<format>/` unless `--out` says where; the paths are printed, and a warning on stderr
counts the lines that are errors. In a sweep, every result line, answer line and table row names its
job. A run that did not finish (interrupted, failed, or without summary.json) is refused unless
`--partial` is given: then every line of it carries `"partial": true` (the table: its `status`), and
the conversations it did not reach are errors `not_run` where its input can still be read.

An export writes all its files or none, and never replaces a file exported from another run (an
export dir's `.chat-runner-exports.json` says which run each of its files came from).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config.schema import InputFormat
from runner.errors import RunnerError
from runner.rundir.layout import MANIFEST, SUMMARY, safe_name
from runner.rundir.reader import Run, is_run_dir, turn_rows
from runner.tools.report import job_labels, job_rows, spreadsheet_safe

FORMATS = ("openai-batch", "mt-bench", "table")
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
OWNERS = ".chat-runner-exports.json"  # in an export dir: the run each of its files was exported from
# Overrides that do not set a run's model apart, left out of a single run's model_id: where its input
# came from and its output went, how it was scheduled, and the length limits (which cut answers
# short but make no other model). Two runs that differ only in these share a model_id, and the
# second export into the same --out is refused rather than replacing the first's file.
NOT_IDENTITY = (
    "input",
    "hydra",
    "resume",
    "shard",
    "plan",
    "plan_gpus",
    "cache_dir",
    "generation.max_new_tokens",
    "generation.min_new_tokens",
)
# A batch result for a conversation of which no reply was generated, and none failed.
NO_TURN = {
    "code": "no_turn",
    "message": "no reply was generated: each user message has its reply in the input (gold_history)",
}
# The keys of a record replayed from an OpenAI Batch request line (the request refuses any other).
REQUEST_RECORD_KEYS = {"id", "method", "url", "body", "messages", "replay"}


@dataclass(frozen=True)
class Job:
    """One run of a sweep (or the run itself): its name, the user's overrides, what sets it apart
    (from the sweep's other jobs, or for a single run its overrides that are not NOT_IDENTITY), and
    its run read back."""

    name: str | None  # None for a single run
    overrides: list[str]
    label: str
    run: Run

    @property
    def model_id(self) -> str:
        """FastChat's model_id: the model's name, then what sets the job apart."""
        model = self.run.model_name or "model"
        return safe_name("_".join([model, *(o for o in self.label.split() if not o.startswith("model="))]))

    @property
    def partial(self) -> bool:
        return not self.run.finished


@dataclass(frozen=True)
class Entry:
    """One input line of a job as an export accounts for it: the records replayed from it (one per
    sample) or, where there are none, why (`error`: a rejected line's code and message, or not_run)."""

    id: Any
    stem: str  # its input file's stem, which is its chats file's
    line: int | None  # in its input file (None in records of runs before `replay.line`)
    records: tuple[dict[str, Any], ...] = ()
    error: dict[str, str] | None = None
    kind: str = "replayed"  # replayed | rejected | not_run


@dataclass(frozen=True)
class Account:
    """A job's every input line, in input order; `unreached_known` is False for an unfinished run
    whose input cannot be read again, so that the conversations it did not reach are not listed."""

    job: Job
    entries: list[Entry]
    unreached_known: bool = True


def _identity(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return not any(key == prefix or key.startswith(f"{prefix}.") for prefix in NOT_IDENTITY)


def jobs_of(directory: Path) -> list[Job]:
    """The run dir itself, or each job of a sweep dir (in job order)."""
    if is_run_dir(directory) or (directory / MANIFEST).is_file():
        run = Run(directory)
        overrides = run.user_overrides()
        return [Job(None, overrides, " ".join(o for o in overrides if _identity(o)), run)]
    rows = job_rows(directory) if directory.is_dir() else []
    if not rows:
        raise RunnerError(
            f"{directory} is neither a run dir (summary.json, chats/) nor a sweep dir (job dirs with .hydra/)"
        )
    return [
        Job(row["job"], row["overrides"].split(), label, Run(directory / row["job"]))
        for row, label in zip(rows, job_labels(rows), strict=True)
    ]


def export(
    directory: Path,
    form: str,
    out: Path | None = None,
    *,
    partial: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write `directory`'s chats in `form` into `out` (default `<directory>/exports/<form>`): all
    files or none. An unfinished run is refused unless `partial`; `warn` gets a line for each
    unfinished job exported and each job whose export holds errors (default: stderr)."""
    jobs = jobs_of(directory)
    _check_finished(directory, jobs, partial)
    accounts = [account(job) for job in jobs]
    default = out is None
    out = directory / "exports" / form if out is None else out
    files: dict[Path, tuple[bytes, Path]] = {}  # path -> (content, the dir it is exported from)
    if form == "table":
        for name, data in _table(accounts).items():
            files[out / name] = (data, directory)
    else:
        for job_account in accounts:
            job = job_account.job
            if form == "openai-batch":
                name = f"{safe_name(job.name) if job.name else 'results'}.jsonl"
                lines = batch_results(job, job_account)
            else:
                name = f"{job.model_id}.jsonl"
                lines = mt_bench_answers(job, job_account)
            if out / name in files:
                raise RunnerError(
                    f"{out / name}: two jobs, {files[out / name][1]} and {job.run.path}, would both be "
                    "written to it: export them separately"
                )
            files[out / name] = (_jsonl(lines), job.run.path)
    owners = _claim(files, out, default)
    _commit({**{path: data for path, (data, _) in files.items()}, out / OWNERS: owners}, out)
    for job_account in accounts:
        for line in _warnings(job_account, form):
            (warn or _stderr)(line)
    return list(files)


def _stderr(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def _check_finished(directory: Path, jobs: list[Job], partial: bool) -> None:
    """Refuse unfinished runs unless the user asked for a partial export."""
    unfinished = [job for job in jobs if job.partial]
    if not unfinished or partial:
        return
    if len(jobs) == 1:
        raise RunnerError(
            f"{jobs[0].run.path} is not finished ({_status(jobs[0].run)}): resume it, or pass --partial "
            "to export what it holds"
        )
    listed = ", ".join(f"{job.run.path} ({_status(job.run)})" for job in unfinished)
    raise RunnerError(
        f"{len(unfinished)} job(s) of {directory} are not finished: {listed}: resume them, or pass "
        "--partial to export what they hold"
    )


def _status(run: Run) -> str:
    if run.summary is None:
        return "no summary.json: still running, or killed"
    return f"status {run.status}"


def account(job: Job) -> Account:
    """Every input line of the job, in input order: its records, a rejected line, or (a run that did
    not finish) a conversation it did not reach."""
    run = job.run
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path, records in run.records_by_file().items():
        for record in records:
            grouped.setdefault((path.stem, str(record["id"])), []).append(record)
    entries = [
        Entry(records[0]["id"], stem, records[0]["replay"].get("line"), tuple(records))
        for (stem, _), records in grouped.items()
    ]
    for reject in run.rejects():
        where = f"{reject['file']}:{reject['line']}"
        error = {"code": reject["code"], "message": f"{where}: {reject['message']}"}
        entries.append(
            Entry(reject.get("id"), Path(reject["file"]).stem, reject["line"], (), error, "rejected")
        )
    known = True
    if job.partial:
        conversations = run.input_conversations()
        known = conversations is not None
        shard = run.config.get("shard") or {}
        for conversation in (conversations or [])[shard.get("index", 0) :: shard.get("count", 1)]:
            stem = conversation.source.stem
            if (stem, str(conversation.id)) not in grouped:
                message = f"{conversation.where}: not replayed: the run stopped before it ({_status(run)})"
                error = {"code": "not_run", "message": message}
                entries.append(Entry(conversation.id, stem, conversation.line, (), error, "not_run"))
    ranks = _file_ranks(run)
    entries.sort(key=lambda entry: (ranks.get(entry.stem, len(ranks)), entry.line or 0))
    return Account(job, entries, known)


def _file_ranks(run: Run) -> dict[str, int]:
    """Each input file's place among the run's inputs, by its stem (its chats file's stem)."""
    if run.summary is not None and run.summary.input_files:
        names = run.summary.input_files
    elif run.manifest is not None:
        names = [entry["path"] for entry in run.manifest.get("inputs", [])]
    else:
        names = [str(path) for path in run.chat_files]
    return {Path(name).stem: rank for rank, name in reversed(list(enumerate(names)))}


def _warnings(job_account: Account, form: str) -> list[str]:
    """What the user must know of a job's export: it is partial; some of its lines are errors (or,
    rejected lines that were no requests, not in an openai-batch export)."""
    job, entries = job_account.job, job_account.entries
    lines = []
    if job.partial:
        unreached = sum(1 for entry in entries if entry.kind == "not_run")
        held = sum(1 for entry in entries if entry.records)
        rest = (
            f"the {unreached} conversation(s) it did not reach are errors (not_run)"
            if job_account.unreached_known
            else "the conversations it did not reach are not listed (its input is not found from here, or "
            "changed since it ran)"
        )
        lines.append(
            f"{job.run.path} is not finished ({_status(job.run)}): a PARTIAL export of the {held} "
            f"conversation(s) it holds, each line marked partial (the table: its status); {rest}"
        )
    ended = Counter(
        next(r["replay"]["error"]["code"] for r in entry.records if r["replay"]["error"])
        for entry in entries
        if any(record["replay"]["error"] for record in entry.records)
    )
    shown = Counter(entry.error["code"] for entry in entries if entry.kind == "rejected")
    parts = [
        f"{sum(counts.values())} {what} ({', '.join(f'{code}: {count}' for code, count in counts.items())})"
        for counts, what in (
            (ended, "ended in an error"),
            (shown, "rejected input line(s)"),
        )
        if counts
    ]
    if parts:
        errors = sum(ended.values()) + sum(shown.values())
        lines.append(
            f"{job.run.path}: {errors} of {len(entries)} input line(s) are errors in the export: "
            f"{', '.join(parts)}"
        )
    return lines


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


def _table(accounts: list[Account]) -> dict[str, bytes]:
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


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


def _written_at(run: Run) -> float:
    """When the run last wrote: its summary.json, else its newest chats file, else the dir."""
    candidates = [run.path / SUMMARY] if run.summary is not None else [*run.chat_files, run.path]
    return max(path.stat().st_mtime for path in candidates if path.exists())


def _digest(job: Job, entry: Entry) -> str:
    """A stable id for a job's answer to an input line."""
    key = entry.id if entry.id is not None else f"{entry.stem}:{entry.line}"
    return hashlib.sha256(f"{job.run.path.resolve()}\0{key}".encode()).hexdigest()[:24]


def _claim(files: dict[Path, tuple[bytes, Path]], out: Path, default: bool) -> bytes:
    """Refuse to replace a file exported from another run (or not by an export at all, outside a
    run's own exports/ dir); return the export dir's record of owners with these files in it."""
    try:
        owners = json.loads((out / OWNERS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        owners = {}
    owners = owners if isinstance(owners, dict) else {}
    for path, (_, source) in files.items():
        mine, owner = str(source.resolve()), owners.get(path.name)
        if path.exists() and owner != mine and not (owner is None and default):
            whose = f"the export of another run, {owner}" if owner else f"a file not exported from {source}"
            raise RunnerError(
                f"{path}: already holds {whose}: export {source} into another --out, or remove it first"
            )
        owners[path.name] = mine
    return (json.dumps(owners, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _commit(files: dict[Path, bytes], out: Path) -> None:
    """Write every file or none: each to a temp file first (fsynced), then all renamed into place;
    on a failure the temp files and the directories made for them are removed again."""
    if out.exists() and not out.is_dir():
        raise RunnerError(f"{out}: exists and is not a directory")
    made: list[Path] = []
    scratch: dict[Path, Path] = {}
    current = out
    try:
        for current in reversed([path for path in (out, *out.parents) if not path.exists()]):
            current.mkdir()
            made.append(current)
        for current, data in files.items():
            scratch[current] = current.with_name(f".{current.name}.{os.getpid()}.tmp")
            with scratch[current].open("wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        for current, temporary in scratch.items():
            os.replace(temporary, current)
    except OSError as error:
        for temporary in scratch.values():
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise RunnerError(f"{current}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.export", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a run dir or a sweep dir")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="form")
    parser.add_argument("--out", type=Path, help="where to write (default: <directory>/exports/<format>)")
    parser.add_argument(
        "--partial",
        action="store_true",
        help="export a run that did not finish (interrupted, failed, or without summary.json) as far as "
        "it got, every line marked partial",
    )
    args = parser.parse_args(argv)
    try:
        written = export(args.directory, args.form, args.out, partial=args.partial)
    except RunnerError as error:
        sys.exit(f"error: {error}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
