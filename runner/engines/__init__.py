"""Engines: the one place that knows how tokens are produced.

`engine=<name>` picks the module runner/engines/<name>.py, whose `build(cfg, setup)` loads what it
needs and returns an object that follows runner/engines/protocol.py's `Engine`. A new engine is a
new module, its conf/engine/<name>.yaml and its `EngineKind` value; nothing in the app changes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from runner.config.schema import RunConfig
from runner.engines.protocol import Engine


@dataclass(frozen=True)
class EngineSetup:
    """What the app has ready before any engine exists: the machine, the translated load and
    generate arguments, the tokenizer (the chat template already checked every conversation), and
    the batch the memory plan allows."""

    hardware: Any  # runner.model.hardware.Hardware
    arguments: Any  # runner.model.arguments.TransformersArguments
    tokenizer: Any
    batch_rows: int


def build_engine(cfg: RunConfig, setup: EngineSetup) -> Engine:
    """The engine that `engine.kind` names, with its model loaded."""
    module = importlib.import_module(f"runner.engines.{cfg.engine.kind.value}")
    return module.build(cfg, setup)
