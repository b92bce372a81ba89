"""The run's summary assembled from what each step produced, and its closing log lines."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runner.config.schema import RunConfig
from runner.loading import LoadedEngine
from runner.model import hardware
from runner.recording import Replayed, Tally
from runner.rundir.environment import environment, peak_rss_bytes
from runner.rundir.summary import BatchSize, LoadedInfo, ModelInfo, PeakMemory, Summary
from runner.workload import Workload

log = logging.getLogger(__name__)


def summarise(
    cfg: RunConfig,
    run_dir: Path,
    workload: Workload,
    loaded: LoadedEngine,
    replayed: Replayed,
    started: float,
) -> Summary:
    """summary.json: what was loaded and replayed, how it ended, how fast, and on what (`started`:
    the run's perf_counter at its start, for its wall time)."""
    tally = replayed.tally
    speed = tally.new_tokens / replayed.seconds if replayed.seconds else 0.0
    engine, described = loaded.engine, loaded.description
    counters = engine.counters()
    return Summary(
        status=replayed.status,
        error=f"{type(replayed.stop).__name__}: {replayed.stop}" if replayed.status == "failed" else None,
        model=ModelInfo(cfg.model.name, cfg.model.source.value, loaded.location, cfg.model.revision),
        precision=cfg.precision.dtype.value,
        quant=cfg.quant.method.value,
        device=cfg.device.kind.value,
        loaded=LoadedInfo(**{f.name: described[f.name] for f in dataclasses.fields(LoadedInfo)}),
        engine=loaded.kind.value,
        engine_version=described.get("engine_version"),
        batch_size=BatchSize(loaded.configured_batch_size, engine.batch_size),
        cache=_section(counters.cache),
        steps=_section(counters.steps),
        speculative=_section(counters.speculative),
        requests=_section(counters.requests),
        server=_section(counters.server),
        replay_mode=cfg.replay.mode.value,
        generation=dataclasses.asdict(cfg.generation),
        chat_template_sha256=engine.chat_template_sha256,
        system_folded=not engine.supports_system_role,
        input_files=[str(path) for path in workload.files],
        chat_files=[str(path.relative_to(run_dir)) for path in replayed.digests],
        conversations=len(workload.conversations),
        rejected=dict(Counter(reject.code for reject in workload.rejected)),
        records=tally.records,
        records_kept_from_before=replayed.kept,
        turns=tally.turns,
        errors=dict(tally.errors),
        prompt_tokens=tally.prompt_tokens,
        generated_tokens=tally.generated_tokens,
        finish_reasons=dict(tally.finish_reasons),
        load_seconds=round(loaded.seconds, 3),
        replay_seconds=round(replayed.seconds, 3),
        tokens_per_second=round(speed, 2),  # this session's new tokens over its replay time
        turn_seconds=_percentiles(tally.new_turn_seconds),
        first_token_seconds=_percentiles(tally.new_first_token_seconds),
        memory_plan=loaded.memory_plan.as_dict() if loaded.memory_plan else None,
        roofline=_roofline(cfg, loaded, tally, speed),
        peak_memory=PeakMemory(peak_rss_bytes(), hardware.accelerator_peak_bytes()),
        environment={**environment(), **hardware.accelerator_environment()},
        record_sha256={
            str(path.relative_to(run_dir)): digests for path, digests in replayed.digests.items() if digests
        },
        wall_seconds=round(time.perf_counter() - started, 3),
    )


def log_done(summary: Summary, replayed: Replayed, run_dir: Path) -> None:
    """The closing lines: the roofline, speculation, requests, counts by outcome, speed, a CPU
    quantization's speed note, where to read them."""
    if summary.roofline:
        roofline = summary.roofline
        log.info(
            "roofline: %.1f GB/s over %.1f MB read per token = %.1f tokens/s at batch 1; this run %.1f "
            "tokens/s, %.0f%% of it",
            roofline["memory_bandwidth_bytes_per_second"] / 1e9,
            roofline["bytes_per_token"] / 1e6,
            roofline["batch1_tokens_per_second"],
            summary.tokens_per_second,
            100 * roofline["fraction"],
        )
    if summary.speculative:
        speculative = summary.speculative
        log.info(
            "speculative decoding (%s): %.0f%% of %d drafted tokens accepted, %.2f tokens per forward pass",
            speculative["method"],
            100 * speculative["acceptance_rate"],
            speculative["drafted_tokens"],
            speculative["tokens_per_forward_pass"],
        )
    if summary.requests:
        requests = summary.requests
        log.info(
            "requests: %d sent, %d answered; retried: %s; given up: %s; %.1f s waited for rate limits",
            requests["sent"],
            requests["answered"],
            _counts(requests["retried"]),
            _counts(requests["failed"]),
            requests["rate_limit_wait_seconds"],
        )
    log.info(
        "done: %d conversation(s), %d turn(s) (finish reasons: %s), errors: %s, rejected lines: %s; "
        "%d new tokens in %.1f s (%.1f tokens/s)",
        summary.conversations,
        summary.turns,
        _counts(summary.finish_reasons),
        _counts(summary.errors),
        _counts(summary.rejected),
        replayed.tally.new_tokens,
        summary.replay_seconds,
        summary.tokens_per_second,
    )
    if summary.memory_plan and summary.memory_plan.get("speed_note"):
        log.info("%s; this run: %.1f tokens/s", summary.memory_plan["speed_note"], summary.tokens_per_second)
    log.info("outputs: %s", run_dir)
    log.info("read them: python -m runner.view %s", run_dir)


def _section(counters: Any) -> dict[str, Any] | None:
    """An engine's counters (a dataclass of its own) as a summary.json section."""
    return dataclasses.asdict(counters) if dataclasses.is_dataclass(counters) else counters


def _counts(counts: dict[str, int]) -> str:
    """'length 5, eos 4' (largest first), or 'none'."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{key} {count}" for key, count in ordered) or "none"


def _roofline(cfg: RunConfig, loaded: LoadedEngine, tally: Tally, speed: float) -> dict[str, float] | None:
    """Decoding reads the active weights (a mixture of experts reads the experts it routes to) and
    the whole KV cache once per step: at batch 1 that bounds the speed at bandwidth / bytes per
    token. The KV part uses the mean context over generated tokens. None for a model on a server."""
    architecture, described = loaded.architecture, loaded.description
    if architecture is None:
        return None
    active = (architecture.active_params or architecture.params) / architecture.params
    bandwidth = hardware.memory_bandwidth(described["device"], Path(cfg.cache_dir).expanduser())
    context = tally.new_context_tokens / tally.new_tokens if tally.new_tokens else 0
    per_token = active * described["weights_bytes"] + described["kv_bytes_per_token"] * context
    batch1 = bandwidth / per_token
    return {
        "memory_bandwidth_bytes_per_second": round(bandwidth),
        "bytes_per_token": round(per_token),
        "batch1_tokens_per_second": round(batch1, 2),
        "fraction": round(speed / batch1, 4),
    }


def _percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50 and p95 (nearest rank) of per-turn timings; None when there are no turns."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None}
    return {f"p{q}": round(ordered[math.ceil(q / 100 * len(ordered)) - 1], 4) for q in (50, 95)}
