"""Command-line overrides checked before Hydra composes: an unknown key is refused naming the closest
one (Hydra would only suggest `+key=...`, which then runs without it)."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Sequence
from typing import Any

from runner.config.presets import CONF_DIR
from runner.config.schema import ENGINE_SCHEMAS, RunConfig
from runner.config.secrets import refuse_secrets
from runner.errors import ConfigError


def config_keys(schema: type | None = None, prefix: str = "") -> dict[str, bool]:
    """Every key of the run config, dotted -> whether it is open (a dict or Any: any key below it
    is the user's own, e.g. device.max_memory.0)."""
    keys: dict[str, bool] = {}
    hints = typing.get_type_hints(schema or RunConfig)
    for item in dataclasses.fields(schema or RunConfig):
        key, kind = f"{prefix}{item.name}", hints[item.name]
        if dataclasses.is_dataclass(kind):
            keys[key] = False
            # An engine's own schema adds keys that only its YAML composes (engine=vllm's).
            for variant in (kind, *(s for s in ENGINE_SCHEMAS.values() if issubclass(s, kind))):
                keys.update(config_keys(variant, f"{key}."))
        else:
            keys[key] = kind is Any or typing.get_origin(kind) is dict
    return keys


def check_overrides(arguments: Sequence[str]) -> None:
    """What the CLI and `runner.run` both check of their overrides before Hydra composes (and saves
    them in the run dir): no secrets, no unknown keys."""
    refuse_secrets(arguments)
    check_override_keys(arguments)


def check_override_keys(arguments: Sequence[str]) -> None:
    """Refuse an override of a key the config does not have, with or without `+`, naming the
    closest existing key: Hydra would only suggest `+key=...`, which then runs without it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    candidates = [a for a in arguments if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return  # Hydra reports a malformed override itself
    keys = config_keys()
    groups = {path.name for path in CONF_DIR.iterdir() if path.is_dir()}
    for override in overrides:
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or key in groups or key in keys:
            continue
        if any(key.startswith(f"{known}.") for known, is_open in keys.items() if is_open):
            continue
        close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}?" if close else " (python -m runner --cfg job lists the keys)"
        raise ConfigError(f"unknown config key {key!r} in {override.input_line!r}{hint}")
