"""From a checked config and workload to a ready engine, shared by the app, the Python API and the
benchmark: the hardware, the engine that can run the config, the model's sources and tokenizer, the
chat template measured on every conversation, the memory plan (refusing a run that cannot fit),
then the engine built with its model loaded. `plan=true` stops after the plan. An engine on a server
(engine=openai) skips all of it but the engine: there are no weights, tokenizer or plan here."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config.schema import ArchitectureConfig, EngineKind, ModelSource, RunConfig
from runner.engines.protocol import Engine
from runner.engines.registry import (
    EngineChoice,
    EngineSetup,
    RemoteSetup,
    build_engine,
    capabilities,
    choose_engine,
)
from runner.errors import RunnerError
from runner.model import sources
from runner.model.arguments import TransformersArguments
from runner.model.embedded import embedded_dir
from runner.model.hardware import Hardware, run_hardware
from runner.model.loading import load_tokenizer, model_arguments
from runner.planning.figures import architecture
from runner.planning.plan import MemoryPlan
from runner.planning.run_plan import memory_plan
from runner.rundir.writer import write_json_atomically
from runner.workload import Workload, estimate_without_template, measure_with_template

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSetup:
    """What is known of the model before its weights load."""

    hardware: Hardware
    arguments: TransformersArguments
    choice: EngineChoice
    architecture: ArchitectureConfig

    @property
    def location(self) -> str:
        """The checkpoint directory or hub id."""
        return self.arguments.load["model"]


@dataclass(frozen=True)
class LoadedEngine:
    """The engine with its model loaded, and what the summary says of the loading."""

    engine: Engine
    kind: EngineKind
    location: str  # the checkpoint directory or hub id; for a server, the model name it knows
    architecture: ArchitectureConfig | None  # None: the model runs on a server
    memory_plan: MemoryPlan | None  # None: nothing to plan here
    seconds: float  # from model preparation to a ready engine
    description: dict[str, Any]  # engine.describe()
    configured_batch_size: int


def prepare_model(cfg: RunConfig, *, check_hub: bool = False) -> ModelSetup:
    """The hardware, the engine that runs the config (or a ConfigError), and the model's load
    arguments and architecture figures; an embedded model is converted once into the cache. A local
    checkpoint is checked before anything reads it, and with `check_hub` a hub model's reachability
    (a hub that does not answer costs seconds, not a minute of retries)."""
    hardware = run_hardware(cfg.plan_gpus)
    choice = choose_engine(cfg, hardware)
    arguments = model_arguments(cfg, hardware)
    if cfg.model.source is ModelSource.local:
        sources.check_local_checkpoint(Path(arguments.load["model"]))
    elif cfg.model.source is ModelSource.hub and check_hub:
        sources.check_hub(arguments.load["model"], arguments.load.get("revision"))
    return ModelSetup(hardware, arguments, choice, architecture(cfg, arguments.load))


def load_engine(cfg: RunConfig, workload: Workload, run_dir: Path | None = None) -> LoadedEngine:
    """Check the model's sources, measure the workload with its chat template, plan the memory,
    then build the engine with its model loaded (a server's engine: see `connect_engine`)."""
    started = time.perf_counter()
    if capabilities(cfg.engine.kind).remote:
        return connect_engine(cfg, run_dir, started)
    setup = prepare_model(cfg, check_hub=True)
    tokenizer = load_tokenizer(setup.arguments.load)
    measure_with_template(workload, tokenizer, cfg)
    plan = check_memory(cfg, setup, workload)
    log.info("loading %s (%s) for engine=%s", cfg.model.name, setup.location, setup.choice.kind.value)
    ready = EngineSetup(
        setup.hardware,
        setup.arguments,
        tokenizer,
        plan.batch_rows,
        setup.architecture,
        plan.kv_budget_bytes,
        plan.context_tokens,
    )
    engine = build_engine(cfg, setup.choice.kind, ready)
    loaded = LoadedEngine(
        engine,
        setup.choice.kind,
        setup.location,
        setup.architecture,
        plan,
        time.perf_counter() - started,
        engine.describe(),
        engine.batch_size,
    )
    log.info(
        "loaded in %.1f s: %s, %s",
        loaded.seconds,
        loaded.description["dtype"],
        loaded.description["device_map"],
    )
    if not engine.supports_system_role and workload.has_system:
        log.warning(
            "%s's chat template has no system role: system messages are folded into the first "
            "user turn (system text, a blank line, then the user text)",
            cfg.model.name,
        )
    return loaded


def connect_engine(cfg: RunConfig, run_dir: Path | None, started: float) -> LoadedEngine:
    """A server's engine (engine=openai): no weights, tokenizer or memory plan here; the server is
    started if the config asks, and checked to answer and offer the model."""
    model = served_model(cfg)
    log.info(
        "engine=%s: model '%s' on %s", cfg.engine.kind.value, model, cfg.engine.base_url or "its own server"
    )
    engine = build_engine(cfg, cfg.engine.kind, RemoteSetup(model, run_dir))
    seconds = time.perf_counter() - started
    return LoadedEngine(
        engine, cfg.engine.kind, model, None, None, seconds, engine.describe(), engine.batch_size
    )


def served_model(cfg: RunConfig) -> str:
    """The model name a server knows: model.id (hub and server presets), else the checkpoint
    directory that `vllm serve <dir>` or `transformers serve <dir>` names it by."""
    if cfg.model.id:
        return cfg.model.id
    location = embedded_dir(cfg) or Path(cfg.model.path).expanduser()
    return str(location)


def check_memory(cfg: RunConfig, setup: ModelSetup, workload: Workload) -> MemoryPlan:
    """The memory plan, before any weights load: refuse a run that cannot fit, shrink an auto batch
    that would not, and warn of CPU offload."""
    plan = _plan(cfg, setup, workload)
    if plan.fitting_batch is not None and cfg.engine.batch_size == "auto":
        log.info(
            "engine.batch_size=auto: %d rows would not fit, using %d", plan.batch_rows, plan.fitting_batch
        )
        plan = _plan(cfg, setup, workload, plan.fitting_batch)
    for line in plan.lines():
        log.info("%s", line)
    if not plan.fits:
        raise RunnerError(plan.refusal())
    if plan.verdict == "fits_with_offload":
        log.warning("%s", plan.verdict_text())
    return plan


def print_plan(cfg: RunConfig, run_dir: Path, workload: Workload) -> dict[str, Any]:
    """plan=true: print the memory plan (and write plan.json); load no weights, generate nothing."""
    if capabilities(cfg.engine.kind).remote:
        plan = {"engine": cfg.engine.kind.value, "verdict": "nothing_to_plan"}
        print(
            f"engine={cfg.engine.kind.value}: the model runs on a server, which holds its weights and KV "
            "cache; nothing to plan on this machine"
        )
        write_json_atomically(run_dir / "plan.json", plan)
        return plan
    setup = prepare_model(cfg)
    try:  # the tokenizer measures the conversations; a hub model's is used only if already cached
        tokenizer = load_tokenizer(setup.arguments.load, local_files_only=cfg.model.source is ModelSource.hub)
    except RunnerError:
        estimate_without_template(workload, cfg)
    else:
        measure_with_template(workload, tokenizer, cfg)
    plan = _plan(cfg, setup, workload)
    print("\n".join(plan.lines()))
    write_json_atomically(run_dir / "plan.json", plan.as_dict())
    return plan.as_dict()


def _plan(cfg: RunConfig, setup: ModelSetup, workload: Workload, rows: int | None = None) -> MemoryPlan:
    """The plan for `rows` rows (default: the chosen batch, at most one row per conversation sample)."""
    rows = rows or max(1, min(setup.choice.batch_size, workload.streams(cfg)))
    return memory_plan(
        cfg, setup.hardware, setup.architecture, rows, workload.context_tokens, workload.context_from
    )
