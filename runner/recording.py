"""The replay written into the run dir: each record appended and flushed to its chats file as it
completes, progress shown, and SIGTERM, Ctrl-C or a failure ending it with what is complete kept."""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from collections import Counter
from collections.abc import Sequence
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
class Tally:
    """What the summary counts of the records, gathered as each is written: a run of a million
    conversations holds these figures, not its records. `new_*` count this session's turns alone."""

    records: int = 0
    turns: int = 0
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reasons: Counter[str] = dataclasses.field(default_factory=Counter)
    new_tokens: int = 0
    new_turn_seconds: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    new_first_token_seconds: array[float] = dataclasses.field(default_factory=lambda: array("d"))
    new_context_tokens: float = 0.0  # over new tokens: sum of new_tokens * (prompt + new_tokens / 2)

    def add(self, turns: Sequence[Turn], error_code: str | None, *, new: bool) -> None:
        self.records += 1
        self.turns += len(turns)
        if error_code is not None:
            self.errors[error_code] += 1
        for turn in turns:
            self.prompt_tokens += turn.prompt_tokens
            self.generated_tokens += turn.new_tokens
            self.finish_reasons[turn.finish_reason] += 1
            if new:
                self.new_tokens += turn.new_tokens
                self.new_turn_seconds.append(turn.seconds)
                self.new_first_token_seconds.append(turn.first_token_seconds)
                self.new_context_tokens += turn.new_tokens * (turn.prompt_tokens + turn.new_tokens / 2)


@dataclass
class Replayed:
    """What the replay step produced: the records' figures (kept ones included), how it ended."""

    tally: Tally
    kept: int
    seconds: float = 0.0
    status: str = "completed"  # completed | interrupted | failed
    stop: BaseException | None = None
    digests: dict[Path, list[str]] = dataclasses.field(default_factory=dict)  # per chats file


def record_replay(cfg: RunConfig, engine: Engine, workload: Workload, paths: dict[Path, Path]) -> Replayed:
    """Replay the workload into its chats files (`paths`: input file -> chats file), skipping the
    records an earlier session kept."""
    replayed = Replayed(Tally(), workload.kept_records)
    start = time.perf_counter()
    try:
        with ChatWriter(paths) as writer:
            done = set()
            for kept in workload.kept:  # read one record at a time
                for record in kept:
                    writer.keep(kept.path, record)
                    replayed.tally.add(*_record_stats(record), new=False)
                    done.add((str(record["id"]), record["replay"]["sample"]))
            replayed.digests = writer.digests
            # Kept turns are progress's starting count: its rates and ETA are this session's alone.
            progress = Progress(workload.planned_replies(cfg), replayed.tally.turns)
            _replay_into(cfg, engine, workload, writer, progress, replayed, done)
    except (KeyboardInterrupt, Interrupted) as interruption:
        replayed.status, replayed.stop = "interrupted", interruption
    except Exception as error:  # the summary still says what is complete, and why the run ended
        replayed.status, replayed.stop = "failed", error
    replayed.seconds = time.perf_counter() - start
    return replayed


def _replay_into(
    cfg: RunConfig,
    engine: Engine,
    workload: Workload,
    writer: ChatWriter,
    progress: Progress,
    replayed: Replayed,
    done: set[tuple[str, int]],
) -> None:
    """Each finished conversation written, counted and logged as it comes, in input order."""
    with progress:
        results = replay_all(
            workload.replayed(),
            engine,
            cfg.replay.mode,
            run_seed=cfg.generation.seed,
            samples=cfg.generation.num_samples,
            done=done,
            on_turn=progress.update,
            sampling=Sampling.from_config(cfg.generation),
        )
        for result in results:
            with stop_signals_held():  # a record on disk is a record counted in the summary
                writer.write(result.conversation.source, result.as_record(engine.chat_template_sha256))
                replayed.tally.add(result.turns, result.error.code if result.error else None, new=True)
            if result.error is not None:
                where, conversation_id = result.conversation.where, result.conversation.id
                log.warning("%s (id %r): %s", where, conversation_id, result.error.message)


def _record_stats(record: dict[str, Any]) -> tuple[tuple[Turn, ...], str | None]:
    """The turns and error code of a record written by an earlier session of this run."""
    replay = record["replay"]
    fields = Turn.__dataclass_fields__
    turns = tuple(Turn(**{key: turn[key] for key in fields if key in turn}) for turn in replay["turns"])
    return turns, replay["error"]["code"] if replay["error"] else None
