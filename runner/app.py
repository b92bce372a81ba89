"""The run as a recipe: read and check the input, open the run dir, load the engine, replay into the
run dir, summarise. Each step is a function of its own; this module only orders them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from runner.config.schema import RunConfig, config_record
from runner.errors import Interrupted, RunInterrupted, RunnerError
from runner.loading import LoadedEngine, load_engine, print_plan
from runner.recording import record_replay
from runner.rundir.layout import LATEST_RUN, MANIFEST, REJECTED, SUMMARY, chat_paths, point_latest
from runner.rundir.resume import manifest, previous_records
from runner.rundir.summary import Summary
from runner.rundir.writer import RunDirLock, write_json_atomically, write_jsonl_atomically
from runner.stop_signals import stop_signals_raise
from runner.summarise import log_done, summarise
from runner.workload import Workload, read_workload

log = logging.getLogger(__name__)


def run(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Replay every input conversation through the configured model into `run_dir`; return the
    summary (what summary.json holds).

    The run dir is locked and its manifest written right after the input is read, before anything
    slow: a run stopped at any moment later can be resumed. SIGTERM and Ctrl-C at any moment end it
    with an interrupted summary and the command to resume.
    """
    started = time.perf_counter()
    with stop_signals_raise():
        try:
            workload = read_workload(cfg)
            if cfg.plan:
                return print_plan(cfg, run_dir, workload)
            with RunDirLock(run_dir):
                try:
                    paths = open_run_dir(cfg, run_dir, workload)
                    return _replay_locked(cfg, run_dir, workload, paths, started)
                except (KeyboardInterrupt, Interrupted) as stop:  # with the dir held, before the replay
                    kept = workload.kept_records
                    summary = Summary("interrupted", records=kept, records_kept_from_before=kept)
                    write_json_atomically(run_dir / SUMMARY, summary.to_json())
                    raise _interrupted(stop, kept, run_dir) from None
        except (KeyboardInterrupt, Interrupted) as stop:  # before the run dir was opened
            raise _interrupted(stop, 0, run_dir) from None


def open_run_dir(cfg: RunConfig, run_dir: Path, workload: Workload) -> dict[Path, Path]:
    """The chats file of each input file; what an earlier session of this run left (on resume) is
    kept in the workload; the manifest written; a workload that is all rejects refused."""
    paths = chat_paths(run_dir, workload.files)
    run_manifest = manifest(config_record(cfg), workload.files)
    samples = cfg.generation.num_samples

    def order() -> dict[tuple[str, int], int]:
        ids = workload.conversations.ids
        return {(key, s): i * samples + s for i, key in enumerate(ids) for s in range(samples)}

    workload.kept = previous_records(run_dir, paths, run_manifest, order, resume=cfg.resume)
    write_json_atomically(run_dir / MANIFEST, run_manifest)
    point_latest(LATEST_RUN, run_dir)
    if workload.rejected and not workload.conversations and cfg.shard.count == 1:
        _write_rejects(run_dir, workload)
        raise RunnerError(
            f"every line of the input was rejected ({len(workload.rejected)}), listed in "
            f"{run_dir / REJECTED}: nothing to replay"
        )
    return paths


def _replay_locked(
    cfg: RunConfig, run_dir: Path, workload: Workload, paths: dict[Path, Path], started: float
) -> dict[str, Any]:
    """The run once its dir is held: load the engine, replay, summarise."""
    loaded = load_engine(cfg, workload, run_dir)
    try:
        return _replay_loaded(cfg, run_dir, workload, paths, started, loaded)
    finally:
        loaded.engine.close()


def _replay_loaded(
    cfg: RunConfig,
    run_dir: Path,
    workload: Workload,
    paths: dict[Path, Path],
    started: float,
    loaded: LoadedEngine,
) -> dict[str, Any]:
    if workload.rejected:
        _write_rejects(run_dir, workload)
    log.info(
        "%d conversation(s) from %d file(s): %d replies to generate%s",
        len(workload.conversations),
        len(workload.files),
        workload.planned_replies(cfg),
        f"; resuming with {workload.kept_records} record(s) kept" if cfg.resume else "",
    )
    rejects = len(workload.rejected)
    replayed = record_replay(cfg, loaded.engine, workload, paths)
    if len(workload.rejected) > rejects:  # refused by the chat template as the replay reached them
        _write_rejects(run_dir, workload)
    summary = summarise(cfg, run_dir, workload, loaded, replayed, started)
    write_json_atomically(run_dir / SUMMARY, summary.to_json())
    if replayed.status == "failed":
        raise replayed.stop
    if replayed.stop is not None:
        raise _interrupted(replayed.stop, replayed.tally.records, run_dir)
    log_done(summary, replayed, run_dir)
    return summary.to_json()


def _write_rejects(run_dir: Path, workload: Workload) -> None:
    write_jsonl_atomically(run_dir / REJECTED, [reject.as_dict() for reject in workload.rejected])
    log.warning("%d bad line(s) skipped, listed in %s", len(workload.rejected), run_dir / REJECTED)


def _interrupted(stop: BaseException, records: int, run_dir: Path) -> RunInterrupted:
    return RunInterrupted(
        f"interrupted ({type(stop).__name__}): {records} record(s) complete in {run_dir}; "
        f"continue with the same command plus hydra.run.dir={run_dir} resume=true"
    )
