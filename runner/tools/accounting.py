"""What an export accounts for: the jobs of a run or sweep dir, and each job's every input line in input
order, as its records, a rejected line, or (a run that did not finish) a conversation it never reached;
and the warnings a user must read about them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.rundir.layout import MANIFEST, safe_name
from runner.rundir.reader import Run, is_run_dir
from runner.tools.report import job_labels, job_rows

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


def status_of(run: Run) -> str:
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
        index, count = shard.get("index", 0), shard.get("count", 1)
        for conversation in (c for c in conversations or [] if c.ordinal % count == index):
            stem = conversation.source.stem
            if (stem, str(conversation.id)) not in grouped:
                message = f"{conversation.where}: not replayed: the run stopped before it ({status_of(run)})"
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


def warnings_of(job_account: Account, form: str) -> list[str]:
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
            f"{job.run.path} is not finished ({status_of(job.run)}): a PARTIAL export of the {held} "
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
