"""The sweep report: one row per job of a multirun, as report.md, report.csv and report.png.

Written after every job of a multirun (a Hydra callback, so a sweep that stops early still has
one) and on demand: `python -m runner.report <sweep dir>`. A job without a summary (it failed)
is a row with its status and the last error of its log; it never stops the other rows.
"""

from __future__ import annotations

import argparse
import csv
import sys
import textwrap
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from runner.rundir.layout import LATEST_SWEEP, point_latest
from runner.rundir.reader import Run, sweep_jobs

COLUMNS = (
    "job",
    "overrides",
    "model",
    "precision",
    "quant",
    "device",
    "status",
    "conversations",
    "tokens_per_second",
    "peak_memory_gib",
    "wall_seconds",
    "error",
)


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """A row per job dir (a dir with .hydra/) of the sweep, in job order."""
    return [_row(job) for job in sweep_jobs(sweep_dir)]


def _row(job: Run) -> dict[str, Any]:
    config = job.hydra_config
    row = {
        "job": job.name,
        "overrides": " ".join(job.user_overrides()),
        "model": config.get("model", {}).get("name"),
        "precision": config.get("precision", {}).get("dtype"),
        "quant": config.get("quant", {}).get("method"),
        "device": config.get("device", {}).get("kind"),
    }
    summary = job.summary
    if summary is None:
        return {**row, "status": "failed", "error": _last_error(job)}
    peak = summary.peak_memory.bytes if summary.peak_memory else None  # None: stopped before loading
    return {
        **row,
        "status": summary.status,
        "conversations": summary.conversations,
        "tokens_per_second": summary.tokens_per_second,
        "peak_memory_gib": round(peak / 2**30, 3) if peak else None,
        "wall_seconds": summary.wall_seconds,
        "error": summary.error or ("" if summary.status == "completed" else _last_error(job)),
    }


def _last_error(job: Run) -> str:
    return job.last_logged_error() or "no summary.json and no error in the log (still running?)"


def write_report(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write report.csv, report.md and report.png into `sweep_dir`; return the rows."""
    rows = job_rows(sweep_dir)
    with (sweep_dir / "report.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
    lines = [
        f"# Sweep report: {_cell(sweep_dir)}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(_cell(row.get(column)) for column in COLUMNS) + " |" for row in rows),
        "",
        "![tokens/s and peak memory per job](report.png)",
        "",
    ]
    (sweep_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    _chart(rows, sweep_dir / "report.png")
    return rows


def _cell(value: Any) -> str:
    """A Markdown table cell that shows its text as text: no HTML (an input path or an override may
    hold `<img onerror=...>`), no column break, no line break."""
    text = "" if value is None else str(value)
    for character, escape in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|")):
        text = text.replace(character, escape)
    return text.replace("\r", " ").replace("\n", " ")


# A cell a spreadsheet reads as a formula (or as one after a tab or CR): `=HYPERLINK(...)`.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs: text starting like a formula gets a leading `'` (OWASP's
    advice for CSV injection); other values are left as they are."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def job_labels(rows: list[dict[str, Any]]) -> list[str]:
    """What tells each job apart: its overrides less those every job shares (the input path, say),
    or the job dir's name where that leaves nothing. The chart and the viewer label jobs so."""
    overrides = [row["overrides"].split() for row in rows]
    shared = set.intersection(*map(set, overrides)) if len(overrides) > 1 else set()
    return [
        " ".join(o for o in job if o not in shared) or row["job"]
        for job, row in zip(overrides, rows, strict=True)
    ]


def chart_labels(rows: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """A bar's label: the job's label (wrapped, never cut) over its resolved precision/device."""
    labels = []
    for label, row in zip(job_labels(rows), rows, strict=True):
        setup = Run(sweep_dir / row["job"]).resolved_setup()
        lines = textwrap.wrap(label, 40, break_long_words=False, break_on_hyphens=False)
        labels.append("\n".join(lines + ([f"{setup['precision']}/{setup['device']}"] if setup else [])))
    return labels


def _chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    labels = chart_labels(rows, path.parent)
    lines = sum(label.count("\n") + 1 for label in labels)
    # Horizontal bars: a label of any length reads level, one job a row, in the table's order.
    figure, (speed, memory) = pyplot.subplots(
        1, 2, figsize=(11, 1.4 + 0.32 * lines + 0.25 * len(rows)), sharey=True
    )
    positions = list(range(len(rows)))
    for axes, key, color, unit in (
        (speed, "tokens_per_second", "tab:blue", "generated tokens/s"),
        (memory, "peak_memory_gib", "tab:orange", "peak memory (GiB)"),
    ):
        values = [row.get(key) for row in rows]
        bars = axes.barh(positions, [value or 0 for value in values], color=color, height=0.6)
        axes.bar_label(bars, ["" if v is None else f"{v:,.2f}" for v in values], padding=3, fontsize=8)
        axes.set_xlabel(unit)
        axes.margins(x=0.15)  # room for the values
        axes.grid(axis="x", alpha=0.3)
    for position, row in zip(positions, rows, strict=True):
        if row["status"] != "completed":
            speed.annotate(
                row["status"],
                (0, position),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                color="tab:red",
            )
    speed.set_yticks(positions, labels, fontsize=9)
    speed.invert_yaxis()  # the first job on top, as in the table
    figure.suptitle("chat-runner sweep: tokens/s and peak memory per job")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


class ReportCallback(Callback):
    """Rewrites the sweep report after each multirun job, so it is there however the sweep ends;
    at the sweep's end, prints a line per job, the report and the viewer command, and exits 1
    when a job did not complete."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        point_latest(LATEST_SWEEP, Path(str(config.hydra.sweep.dir)))

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if HydraConfig.get().mode is RunMode.MULTIRUN:
            write_report(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = write_report(sweep_dir)
        for row in rows:
            speed = "-" if row.get("tokens_per_second") is None else f"{row['tokens_per_second']} tokens/s"
            error = f": {row['error']}" if row["error"] else ""
            print(f"{row['status']:>11}  {speed:>16}  {sweep_dir / row['job']}{error}", file=sys.stderr)
        print(f"report: {sweep_dir / 'report.md'}", file=sys.stderr)
        print(f"read them: python -m runner.view {sweep_dir}", file=sys.stderr)
        if any(row["status"] != "completed" for row in rows):
            sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dir",
        type=Path,
        nargs="?",
        default=LATEST_SWEEP,
        help=f"a multirun dir: outputs/multirun/<date>/<time> (default: {LATEST_SWEEP}, the newest)",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir} is not a directory")
    rows = write_report(args.sweep_dir)
    print(f"{len(rows)} job(s): {args.sweep_dir / 'report.md'}, report.csv, report.png")


if __name__ == "__main__":
    main()
