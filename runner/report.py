"""The sweep report: one row per job of a multirun, as report.md, report.csv and report.png.

Written after every job of a multirun (a Hydra callback, so a sweep that stops early still has
one) and on demand: `python -m runner.report <sweep dir>`. A job without a summary (it failed)
is a row with its status and the last error of its log; it never stops the other rows.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

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
    jobs = sorted(
        (path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir()),
        key=lambda path: (
            int(path.name.split("_")[0]) if path.name.split("_")[0].isdigit() else 1 << 30,
            path.name,
        ),
    )
    return [_row(job) for job in jobs]


def _row(job: Path) -> dict[str, Any]:
    overrides = [
        override  # the user's overrides: the `resume=true` a requeued attempt adds is no choice of theirs
        for override in OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        if override.split("=", 1)[0].lstrip("+~") != "resume"
    ]
    config = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"))
    row = {
        "job": job.name,
        "overrides": " ".join(overrides),
        "model": config.get("model", {}).get("name"),
        "precision": config.get("precision", {}).get("dtype"),
        "quant": config.get("quant", {}).get("method"),
        "device": config.get("device", {}).get("kind"),
    }
    summary_path = job / "summary.json"
    if not summary_path.exists():
        return {**row, "status": "failed", "error": _last_error(job)}
    summary = json.loads(summary_path.read_text())
    peak_memory = summary.get("peak_memory")  # absent when a run was stopped before it loaded
    peak = peak_memory and (peak_memory["cuda_bytes"] or peak_memory["rss_bytes"])
    return {
        **row,
        "status": summary["status"],
        "conversations": summary.get("conversations"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "peak_memory_gib": round(peak / 2**30, 3) if peak else None,
        "wall_seconds": summary.get("wall_seconds"),
        "error": summary.get("error") or ("" if summary["status"] == "completed" else _last_error(job)),
    }


def _last_error(job: Path) -> str:
    log = job / "chat-runner.log"
    errors = [line for line in log.read_text().splitlines() if "[ERROR]" in line] if log.exists() else []
    return (
        errors[-1].split(" - ", 1)[-1]
        if errors
        else "no summary.json and no error in the log (still running?)"
    )


def write_report(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write report.csv, report.md and report.png into `sweep_dir`; return the rows."""
    rows = job_rows(sweep_dir)
    with (sweep_dir / "report.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Sweep report: {sweep_dir}",
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
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    labels = [row["job"] if len(row["job"]) <= 40 else row["job"][:37] + "..." for row in rows]
    figure, (speed, memory) = pyplot.subplots(2, 1, figsize=(max(6, 1.2 * len(rows) + 2), 7), sharex=True)
    positions = range(len(rows))
    speed.bar(positions, [row.get("tokens_per_second") or 0 for row in rows], color="tab:blue")
    speed.set_ylabel("generated tokens/s")
    memory.bar(positions, [row.get("peak_memory_gib") or 0 for row in rows], color="tab:orange")
    memory.set_ylabel("peak memory (GiB)")
    for position, row in zip(positions, rows, strict=True):
        if row["status"] != "completed":
            speed.annotate(row["status"], (position, 0), ha="center", va="bottom", color="tab:red")
    memory.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
    figure.suptitle("chat-runner sweep")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


class ReportCallback(Callback):
    """Rewrites the sweep report after each multirun job, so it is there however the sweep ends;
    at the sweep's end, prints a line per job, the report and the viewer command, and exits 1
    when a job did not complete."""

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
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir: outputs/multirun/<date>/<time>")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir} is not a directory")
    rows = write_report(args.sweep_dir)
    print(f"{len(rows)} job(s): {args.sweep_dir / 'report.md'}, report.csv, report.png")


if __name__ == "__main__":
    main()
