"""The replay written into the run dir: each record appended and flushed to its chats file as it
completes, progress shown, and SIGTERM, Ctrl-C or a failure ending it with what is complete kept."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config.schema import RunConfig
from runner.engines.protocol import Engine, Sampling
from runner.errors import Interrupted
from runner.progress import Progress
from runner.replay import Turn, replay_all
from runner.rundir.writer import ChatWriter
from runner.stop_signals import stop_signals_held
from runner.workload import Workload

log = logging.getLogger(__name__)


@dataclass
class Replayed:
    """What the replay step produced: per record its turns and error code (kept ones first)."""

    records: list[tuple[tuple[Turn, ...], str | None]]
    kept: int
    seconds: float = 0.0
    status: str = "completed"  # completed | interrupted | failed
    stop: BaseException | None = None
    digests: dict[Path, list[str]] = dataclasses.field(default_factory=dict)  # per chats file

    @property
    def new_turns(self) -> list[Turn]:
        return [turn for turns, _ in self.records[self.kept :] for turn in turns]


def record_replay(cfg: RunConfig, engine: Engine, workload: Workload, paths: dict[Path, Path]) -> Replayed:
    """Replay the workload into its chats files (`paths`: input file -> chats file), skipping the
    records an earlier session kept."""
    kept = workload.kept
    replayed = Replayed([_record_stats(record) for record in kept], len(kept))
    start = time.perf_counter()
    try:
        # Kept turns are progress's starting count: its rates and ETA are this session's alone.
        kept_turns = sum(len(turns) for turns, _ in replayed.records)
        with ChatWriter(paths) as writer, Progress(workload.planned_replies(cfg), kept_turns) as progress:
            replayed.digests = writer.digests
            source_of = {str(c.id): c.source for c in workload.conversations}
            for record in kept:
                writer.keep(paths[source_of[str(record["id"])]], record)
            results = replay_all(
                workload.conversations,
                engine,
                cfg.replay.mode,
                run_seed=cfg.generation.seed,
                samples=cfg.generation.num_samples,
                done={(str(record["id"]), record["replay"]["sample"]) for record in kept},
                on_turn=progress.update,
                sampling=Sampling.from_config(cfg.generation),
            )
            for result in results:
                with stop_signals_held():  # a record on disk is a record counted in the summary
                    writer.write(result.conversation.source, result.as_record(engine.chat_template_sha256))
                    replayed.records.append((result.turns, result.error.code if result.error else None))
                if result.error is not None:
                    where, conversation_id = result.conversation.where, result.conversation.id
                    log.warning("%s (id %r): %s", where, conversation_id, result.error.message)
    except (KeyboardInterrupt, Interrupted) as interruption:
        replayed.status, replayed.stop = "interrupted", interruption
    except Exception as error:  # the summary still says what is complete, and why the run ended
        replayed.status, replayed.stop = "failed", error
    replayed.seconds = time.perf_counter() - start
    return replayed


def _record_stats(record: dict[str, Any]) -> tuple[tuple[Turn, ...], str | None]:
    """The turns and error code of a record written by an earlier session of this run."""
    replay = record["replay"]
    fields = Turn.__dataclass_fields__
    turns = tuple(Turn(**{key: turn[key] for key in fields if key in turn}) for turn in replay["turns"])
    return turns, replay["error"]["code"] if replay["error"] else None
