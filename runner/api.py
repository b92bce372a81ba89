"""The Python API: `runner.run(overrides)` does what `python -m runner <overrides>` does, and
`runner.load_run(dir)` reads a run dir back (records, summary, one row per turn)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

from runner.config.compose import to_run_config
from runner.config.overrides import check_overrides
from runner.config.presets import CONF_DIR
from runner.config.schema import register_configs
from runner.errors import ConfigError, RunnerError
from runner.log_filters import OncePerRun
from runner.rundir.layout import register_resolvers
from runner.rundir.reader import Run

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as the CLI's (Hydra's) log


def run(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict[str, Any]:
    """Compose the config from `overrides` (as on the command line), validate it, replay into
    `run_dir` (default: a new timestamped dir under outputs/, as the CLI), and return the summary
    (what summary.json holds). Logs go to stderr and `<run_dir>/chat-runner.log`, as the CLI's.

    Raises the project's exceptions: ConfigError, InputError, ModelLoadError, RunInterrupted (a
    RunnerError: resume with `resume=true` and the same run_dir), RunnerError.
    """
    from runner.app import run as run_replay  # imports torch

    overrides = list(overrides)
    check_overrides(overrides)
    cfg, hydra_config = _compose(overrides)
    # Resolving Hydra's run dir claims (creates) a new outputs/<date>/<time>: only without run_dir.
    directory = Path(run_dir) if run_dir is not None else Path(str(hydra_config.run.dir))
    try:
        (directory / ".hydra").mkdir(parents=True, exist_ok=True)
        (directory / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
        (directory / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides), encoding="utf-8")
    except OSError as error:
        raise RunnerError(f"cannot write the run dir {directory}: {error.strerror or error}") from None
    with _logging_to(directory / "chat-runner.log"):
        return run_replay(to_run_config(cfg), directory)


def _compose(overrides: list[str]) -> tuple[Any, Any]:
    """The job config and Hydra's own config apart, from the same conf/ as the CLI."""
    register_configs()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="chat-runner"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except HydraException as error:
        raise ConfigError(str(error)) from None
    with open_dict(cfg):
        hydra_config = cfg.pop("hydra")
    return cfg, hydra_config


@contextmanager
def _logging_to(log_file: Path) -> Iterator[None]:
    """INFO and above from the runner to the run's log file, and to stderr unless the caller's
    logging already shows them."""
    logger = logging.getLogger("runner")
    handlers: list[logging.Handler] = [logging.FileHandler(log_file, encoding="utf-8")]
    if not logging.getLogger().handlers:
        handlers.append(logging.StreamHandler(sys.stderr))
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(OncePerRun())
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous_level)


def load_run(run_dir: str | Path) -> Run:
    """Read a run dir (or a merged one) back: `.summary` (runner.rundir.summary.Summary), `.config`,
    `.records` in input order, `.turns()` and `.to_pandas()` (runner.rundir.reader.Run)."""
    return Run.open(run_dir)
