"""The one orchestration of a run: validate input, load the model, replay, write, summarise."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from runner import engine, model
from runner.conversations import load_conversations, resolve_input_files
from runner.errors import RunnerError
from runner.outputs import (
    ChatWriter,
    chat_paths,
    chat_record,
    environment,
    peak_rss_bytes,
    write_json_atomically,
)
from runner.replay import replay_all, replies_to_generate
from runner.schema import ModelSource, RunConfig

log = logging.getLogger(__name__)


def run(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Replay every input conversation through the configured model into `run_dir`."""
    started = time.perf_counter()
    files = resolve_input_files(cfg.input.path)
    conversations = load_conversations(files, cfg.input.format)
    paths = chat_paths(run_dir, files)
    if any(path.exists() for path in paths.values()):
        raise RunnerError(f"{run_dir} already holds chats from an earlier run: pick a new hydra.run.dir")
    samples = cfg.generation.num_samples
    planned = samples * sum(replies_to_generate(c, cfg.replay.mode) for c in conversations)
    log.info(
        "%d conversation(s) from %d file(s): %d replies to generate", len(conversations), len(files), planned
    )

    load_start = time.perf_counter()
    chat_engine, location = _load_engine(cfg)
    load_seconds = time.perf_counter() - load_start
    loaded = chat_engine.describe()
    log.info("loaded in %.1f s: %s, %s", load_seconds, loaded["dtype"], loaded["device_map"])
    if not chat_engine.supports_system_role and any(c.messages[0].role == "system" for c in conversations):
        log.warning(
            "%s's chat template has no system role: system messages are folded into the first "
            "user turn (system text, a blank line, then the user text)",
            cfg.model.name,
        )
    configured_batch_size = chat_engine.batch_size

    replay_start = time.perf_counter()
    records, turns, errors = 0, [], Counter()  # aggregates only: memory must not grow with the input
    with ChatWriter(paths) as writer, tqdm(total=planned, unit="turn", disable=None) as progress:
        for result in replay_all(
            conversations,
            chat_engine,
            cfg.replay.mode,
            run_seed=cfg.generation.seed,
            samples=samples,
            on_turn=lambda _turn: progress.update(),
        ):
            writer.write(result.conversation.source, chat_record(result, chat_engine.chat_template_sha256))
            records += 1
            turns.extend(result.turns)
            if result.error is not None:
                errors[result.error.code] += 1
                log.warning(
                    "%s (id %r): %s", result.conversation.where, result.conversation.id, result.error.message
                )
    replay_seconds = time.perf_counter() - replay_start

    generated = sum(turn.new_tokens for turn in turns)
    summary = {
        "status": "completed",
        "model": {
            "name": cfg.model.name,
            "source": cfg.model.source.value,
            "location": location,
            "revision": cfg.model.revision,
        },
        "precision": cfg.precision.dtype.value,
        "quant": cfg.quant.method.value,
        "device": cfg.device.kind.value,
        "loaded": loaded,
        "engine": cfg.engine.kind.value,
        "batch_size": {"configured": configured_batch_size, "final": chat_engine.batch_size},
        "cache": chat_engine.stats,
        "replay_mode": cfg.replay.mode.value,
        "generation": dataclasses.asdict(cfg.generation),
        "chat_template_sha256": chat_engine.chat_template_sha256,
        "system_folded": not chat_engine.supports_system_role,
        "input_files": [str(path) for path in files],
        "chat_files": [str(path.relative_to(run_dir)) for path in dict.fromkeys(paths.values())],
        "conversations": len(conversations),
        "records": records,
        "turns": len(turns),
        "errors": dict(errors),
        "prompt_tokens": sum(turn.prompt_tokens for turn in turns),
        "generated_tokens": generated,
        "finish_reasons": dict(Counter(turn.finish_reason for turn in turns)),
        "load_seconds": round(load_seconds, 3),
        "replay_seconds": round(replay_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "tokens_per_second": round(generated / replay_seconds, 2) if replay_seconds else 0.0,
        "turn_seconds": _percentiles(turn.seconds for turn in turns),
        "first_token_seconds": _percentiles(turn.first_token_seconds for turn in turns),
        "peak_memory": {"rss_bytes": peak_rss_bytes(), "cuda_bytes": engine.accelerator_peak_bytes()},
        "environment": {**environment(), "gpus": engine.accelerator_names()},
    }
    write_json_atomically(run_dir / "summary.json", summary)
    log.info(
        "done: %d conversation(s), %d turn(s), %d tokens in %.1f s (%.1f tokens/s); outputs in %s",
        len(conversations),
        len(turns),
        generated,
        replay_seconds,
        summary["tokens_per_second"],
        run_dir,
    )
    return summary


def _load_engine(cfg: RunConfig) -> tuple[Any, str]:
    """Convert the embedded model if needed, load the pipeline, and wrap it in the chosen engine."""
    hardware = model.detect_hardware()
    embedded_dir = None
    if cfg.model.source is ModelSource.embedded:
        embedded_dir = model.embedded_checkpoint(cfg.model.package, Path(cfg.cache_dir).expanduser())
    arguments = model.transformers_arguments(cfg, hardware, embedded_dir)
    log.info("loading %s (%s)", cfg.model.name, arguments.load["model"])
    pipe = model.load_pipeline(arguments.load, engine.ChatReplayPipeline)
    batch_size = model.resolve_batch_size(cfg, hardware)
    return engine.create_engine(cfg, pipe, arguments.generate, batch_size), arguments.load["model"]


def _percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50 and p95 (nearest rank) of per-turn timings; None when there are no turns."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None}
    return {f"p{q}": round(ordered[math.ceil(q / 100 * len(ordered)) - 1], 4) for q in (50, 95)}
