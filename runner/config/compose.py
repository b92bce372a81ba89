"""The composed config (a DictConfig) into the typed RunConfig, once, running every cross-field check."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config.presets import model_preset
from runner.config.schema import RunConfig
from runner.errors import ConfigError


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Turn the composed config into typed objects, running every cross-field check."""
    try:
        run_config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:
        # to_object wraps exceptions raised in __post_init__; surface ours as they are.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"invalid configuration: {error}") from None
    assert isinstance(run_config, RunConfig)
    if run_config.generation.assistant_model:
        model_preset(run_config.generation.assistant_model)  # fail now, not after the main model loads
    return run_config
