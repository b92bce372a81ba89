"""Which engine runs a config, with how many turns in flight, and building it: one function picks the
engine from the engines' declared capabilities, or refuses the config in one line."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from runner.config.schema import ArchitectureConfig, DeviceKind, EngineKind, GenerationConfig, RunConfig
from runner.engines.protocol import SAMPLING_KNOBS, Capabilities, Engine
from runner.errors import ConfigError
from runner.model.hardware import Hardware

log = logging.getLogger(__name__)

# engine.batch_size=auto: the best batch measured by benchmarks/throughput.py on a 2-core CPU; on a
# GPU a larger start, which the continuous engine halves on out-of-memory.
AUTO_BATCH_SIZE = {"cpu": 32, "cuda": 64}


@dataclass(frozen=True)
class EngineChoice:
    """The engine that runs (what summary.json names) and its batch size before the memory plan."""

    kind: EngineKind
    batch_size: int


@dataclass(frozen=True)
class EngineSetup:
    """What the app has ready before any engine exists: the machine, the translated load arguments,
    the tokenizer (the chat template already checked every conversation), the batch the memory
    plan allows, the model's architecture figures, and the KV budget and context per row the plan
    resolved."""

    hardware: Hardware
    arguments: Any  # runner.model.arguments.TransformersArguments
    tokenizer: Any
    batch_rows: int
    architecture: ArchitectureConfig | None = None
    kv_budget_bytes: int | None = None  # engine.kv_cache_gb as the plan resolved it (None: no limit)
    context_tokens: int = 0  # the plan's context per row (0: not known)


@dataclass(frozen=True)
class RemoteSetup:
    """What an engine on a server is built from: the model name the server knows, and the run dir
    (where a server the run starts writes its log)."""

    model: str
    run_dir: Path | None = None


def engine_module(kind: EngineKind) -> ModuleType:
    """runner/engines/<kind>: its CAPABILITIES and build()."""
    return importlib.import_module(f"runner.engines.{kind.value}")


def capabilities(kind: EngineKind) -> Capabilities:
    return engine_module(kind).CAPABILITIES


def choose_engine(cfg: RunConfig, hardware: Hardware) -> EngineChoice:
    """engine.kind, or the engine that can do what the config asks (speculative decoding), with its
    batch size: engine.batch_size within the engine's limit, `auto` by the hardware."""
    kind = cfg.engine.kind
    speculation = cfg.generation.speculation
    if speculation and not capabilities(kind).speculation:
        kind = next(other for other in EngineKind if capabilities(other).speculation)
        log.warning(
            "speculative decoding (%s): transformers drafts for one sequence at a time, so this run goes "
            "through engine=%s and uses batch size %d (engine.batch_size=%s)",
            speculation,
            kind.value,
            capabilities(kind).batch_limit,
            cfg.engine.batch_size,
        )
    able = capabilities(kind)
    _check_sampling(cfg, kind, able)
    configured = cfg.engine.batch_size
    if configured == "auto":
        on_gpu = hardware.cuda_devices > 0 and cfg.device.kind is not DeviceKind.cpu
        configured = AUTO_BATCH_SIZE["cuda" if on_gpu else "cpu"]
    elif able.batch_limit is not None and configured > able.batch_limit and kind is cfg.engine.kind:
        raise ConfigError(
            f"engine={kind.value} runs {able.batch_limit} turn(s) per call: use engine=continuous for "
            f"batch_size > {able.batch_limit}"
        )
    limit = able.batch_limit or configured
    return EngineChoice(kind, min(configured, limit))


def _check_sampling(cfg: RunConfig, kind: EngineKind, able: Capabilities) -> None:
    """Refuse a decoding knob set away from its default that the engine would ignore."""
    defaults = GenerationConfig()
    ignored = [
        knob
        for knob in SAMPLING_KNOBS
        if knob not in able.sampling_knobs and getattr(cfg.generation, knob) != getattr(defaults, knob)
    ]
    if ignored:
        raise ConfigError(f"engine={kind.value} cannot honour generation.{', generation.'.join(ignored)}")


def build_engine(cfg: RunConfig, kind: EngineKind, setup: EngineSetup | RemoteSetup) -> Engine:
    """The engine `kind` (from choose_engine), with its model loaded (or its server reached)."""
    return engine_module(kind).build(cfg, setup)
