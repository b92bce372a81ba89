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
import sys
from collections.abc import Callable
from pathlib import Path

from runner.errors import RunnerError
from runner.rundir.layout import safe_name
from runner.tools.accounting import Job, account, jobs_of, status_of, warnings_of
from runner.tools.export_files import OWNERS, claim_files, commit_files
from runner.tools.export_formats import batch_results, jsonl_bytes, mt_bench_answers, table_files

FORMATS = ("openai-batch", "mt-bench", "table")


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
        for name, data in table_files(accounts).items():
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
            files[out / name] = (jsonl_bytes(lines), job.run.path)
    owners = claim_files(files, out, default)
    commit_files({**{path: data for path, (data, _) in files.items()}, out / OWNERS: owners}, out)
    for job_account in accounts:
        for line in warnings_of(job_account, form):
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
            f"{jobs[0].run.path} is not finished ({status_of(jobs[0].run)}): resume it, or pass --partial "
            "to export what it holds"
        )
    listed = ", ".join(f"{job.run.path} ({status_of(job.run)})" for job in unfinished)
    raise RunnerError(
        f"{len(unfinished)} job(s) of {directory} are not finished: {listed}: resume them, or pass "
        "--partial to export what they hold"
    )


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
