"""Where the config groups live (conf/ in a checkout, runner/conf in a wheel) and a model preset read
as a typed config outside Hydra's composition (for generation.assistant_model)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.config.schema import ModelConfig
from runner.errors import ConfigError


def _conf_dir() -> Path:
    """The config groups: the repo's conf/ in a checkout (their one source), or the copy a wheel
    installs as runner/conf (pyproject.toml maps conf/ there)."""
    package = Path(__file__).resolve().parent.parent
    checkout = package.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else package / "conf"


CONF_DIR = _conf_dir()


def model_preset(name: str) -> ModelConfig:
    """The model preset conf/model/<name>.yaml as a typed config (for generation.assistant_model)."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"no model preset {name!r} (conf/model/{name}.yaml); presets: {presets}")
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    try:
        preset = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), node))
    except OmegaConfBaseException as error:
        raise ConfigError(f"model preset {path}: {error}") from None
    assert isinstance(preset, ModelConfig)
    return preset
