"""`python -m runner.view <run dir | sweep dir>`: write a self-contained index.html to read the chats.

One static file, no server and no network: the page's script and the run's data are inlined (the
data as JSON in a non-executed script element, every text string stored once), and the page puts
text on screen through `textContent` only, with a Content-Security-Policy that allows no other
script. A sweep shows each conversation side by side across its jobs, a row per message so turns
line up; the page filters (replies that differ from a baseline job, errors, max_new_tokens hit,
search) with counts, and shows each record's extra keys, raw JSON and the run's config.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.rundir.layout import LATEST_RUN
from runner.rundir.reader import Run, is_run_dir
from runner.tools.report import COLUMNS, job_labels, job_rows

TEMPLATE = Path(__file__).with_name("view.html")
ROLES = {"system": 0, "user": 1, "assistant": 2}


class _Strings:
    """A string table: in a sweep every job repeats the same prompts, so each text is kept once."""

    def __init__(self) -> None:
        self.table: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self._index:
            self._index[text] = len(self.table)
            self.table.append(text)
        return self._index[text]


def build(directory: Path) -> Path:
    """Write `directory`/index.html for a run dir or a sweep dir; return its path."""
    rows = None  # a run dir; a sweep dir has its report rows, one per job dir
    if not is_run_dir(directory):
        rows = job_rows(directory) if directory.is_dir() else []
        if not rows:
            raise RunnerError(
                f"{directory} is neither a run dir (chats/, summary.json) nor a sweep dir (job dirs)"
            )
    data = collect(directory, rows)
    page = directory / "index.html"
    page.write_text(render(data), encoding="utf-8")
    return page


def collect(directory: Path, rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The page's data: jobs, conversations matched across jobs by (file, id, sample), strings.

    `rows` are a sweep's report rows (one per job dir); None for a single run dir.
    """
    strings = _Strings()
    job_dirs = [directory] if rows is None else [directory / row["job"] for row in rows]
    labels = job_labels(rows) if rows else [directory.name]
    jobs, conversations, keys = [], [], {}
    for number, (job_dir, row) in enumerate(zip(job_dirs, rows or [{}], strict=True)):
        job = Run(job_dir)
        jobs.append(
            {
                "dir": job.name,
                "label": labels[number],
                "summary": _summary(job),
                "error": row.get("error") or None,
                "overrides": job.hydra_text("overrides"),
                "config": job.hydra_text("config"),
            }
        )
        for chat_file, records in job.records_by_file().items():
            for record in records:
                key = (chat_file.stem, str(record["id"]), record["replay"]["sample"])
                if key not in keys:
                    keys[key] = len(conversations)
                    conversations.append(
                        {"id": key[1], "file": key[0], "sample": key[2], "cells": [None] * len(job_dirs)}
                    )
                conversations[keys[key]]["cells"][number] = _cell(record, strings)
    for conversation in conversations:
        replays = [cell["r"]["replay"] for cell in conversation["cells"] if cell is not None]
        conversation["turns"] = max(len(replay["turns"]) for replay in replays)
        conversation["tokens"] = sum(turn["new_tokens"] for turn in replays[0]["turns"])
        conversation["errors"] = sum(replay["error"] is not None for replay in replays)
    return {
        "kind": "run" if rows is None else "sweep",
        "name": str(directory),
        "jobs": jobs,
        "conversations": conversations,
        "strings": strings.table,
        "report": None if rows is None else _report(directory, rows, labels),
    }


def _report(directory: Path, rows: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """The report table as the page shows it: jobs by their labels (the overrides that differ;
    those all share are said once), precision and device as they resolved (`fp32 (auto)`)."""
    shown = []
    for row, label in zip(rows, labels, strict=True):
        setup = Run(directory / row["job"]).resolved_setup() or {}
        resolved = {
            key: value if value == row[key] else f"{value} ({row[key]})" for key, value in setup.items()
        }
        shown.append({**row, "job": label, "dir": row["job"], **resolved, "setup": "/".join(setup.values())})
    overrides = [row["overrides"].split() for row in rows]
    common = [o for o in overrides[0] if all(o in job for job in overrides[1:])] if len(rows) > 1 else []
    return {
        "columns": [column for column in COLUMNS if column != "overrides"],
        "rows": shown,
        "shared": " ".join(common),
    }


def _cell(record: dict[str, Any], strings: _Strings) -> dict[str, Any]:
    """One job's record of a conversation: its messages as (role, string) pairs, and the rest of
    the record as it is (`messages` left as a placeholder that keeps the key's place)."""
    return {
        "m": [[ROLES.get(m["role"], 1), strings(m["content"])] for m in record["messages"]],
        "r": {**record, "messages": None},
    }


def _summary(job: Run) -> dict[str, Any] | None:
    """The figures the page shows of a run, from its summary.json (None while it has none)."""
    summary = job.summary
    if summary is None:
        return None
    peak = summary.peak_memory.bytes if summary.peak_memory else None
    # What the model ran with (fp32, cpu), and what the config asked for where that differs.
    asked = {"precision": summary.precision, "device": summary.device}
    setup = asked | (job.resolved_setup() or {})
    return {
        "model": summary.model.name if summary.model else None,
        **{key: value if value == asked[key] else f"{value} ({asked[key]})" for key, value in setup.items()},
        "quant": summary.quant,
        "engine": summary.engine,
        "status": summary.status,
        "conversations": summary.conversations,
        "turns": summary.turns,
        "generated_tokens": summary.generated_tokens,
        "tokens_per_second": summary.tokens_per_second,
        "peak_memory_gib": round(peak / 2**30, 3) if peak else None,
        "errors": summary.error_count,
        "speculative": summary.speculative["acceptance_rate"] if summary.speculative else None,
    }


def render(data: dict[str, Any]) -> str:
    """The page with `data` inlined as JSON that can never close its script element."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for character, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        payload = payload.replace(character, escape)
    payload = payload.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    page = TEMPLATE.read_text(encoding="utf-8")
    # The CSP allows exactly this page's own script (by hash): no injected handler could run.
    script = re.search(r"<script>(.*?)</script>", page, re.DOTALL)[1]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    page = page.replace("script-src 'unsafe-inline'", f"script-src 'sha256-{digest}'")
    return page.replace("__DATA__", payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.view", description=__doc__.splitlines()[0])
    parser.add_argument(
        "directory",
        type=Path,
        nargs="?",
        default=LATEST_RUN,
        help=f"a run dir (outputs/<date>/<time>) or a sweep dir (default: {LATEST_RUN}, the newest run)",
    )
    args = parser.parse_args(argv)
    try:
        print(build(args.directory))
    except RunnerError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
