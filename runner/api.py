"""The Python API: `runner.run(overrides)` does what `python -m runner <overrides>` does, and
`runner.load_run(dir)` reads a run dir back (records, summary, one row per turn)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict

from runner.config.schema import (
    CONF_DIR,
    check_override_keys,
    refuse_secrets,
    register_configs,
    to_run_config,
)
from runner.errors import ConfigError, RunnerError
from runner.log_filters import OncePerRun
from runner.rundir.layout import MANIFEST, register_resolvers
from runner.rundir.reader import read_records

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
    refuse_secrets(overrides)
    check_override_keys(overrides)
    cfg, directory = _compose(overrides)
    directory = Path(run_dir) if run_dir is not None else directory
    try:
        (directory / ".hydra").mkdir(parents=True, exist_ok=True)
        (directory / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
        (directory / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides), encoding="utf-8")
    except OSError as error:
        raise RunnerError(f"cannot write the run dir {directory}: {error.strerror or error}") from None
    with _logging_to(directory / "chat-runner.log"):
        return run_replay(to_run_config(cfg), directory)


def _compose(overrides: list[str]) -> tuple[Any, Path]:
    """The job config and the run dir Hydra would pick, from the same conf/ as the CLI."""
    register_configs()
    register_resolvers()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="chat-runner"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except HydraException as error:
        raise ConfigError(str(error)) from None
    with open_dict(cfg):
        hydra_config = cfg.pop("hydra")
    return cfg, Path(str(hydra_config.run.dir))


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


@dataclass(frozen=True)
class Run:
    """A run dir read back: its summary, the config it ran, and its records in input order."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    records: list[dict[str, Any]]

    def turns(self) -> list[dict[str, Any]]:
        """One row per generated turn: conversation, sample, turn, prompt, reply, reference,
        tokens, seconds, finish reason (and the conversation's error code, if it ended in one)."""
        return [row for record in self.records for row in turn_rows(record)]

    def to_pandas(self) -> Any:
        """`turns()` as a pandas DataFrame (pandas is not a dependency: install it to use this)."""
        try:
            import pandas
        except ImportError:
            raise ImportError("Run.to_pandas() needs pandas: pip install pandas") from None
        return pandas.DataFrame(self.turns())


def turn_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A record's generated turns as flat rows."""
    messages, replay = record["messages"], record["replay"]
    error = replay["error"]["code"] if replay["error"] else None
    return [
        {
            "conversation_id": record["id"],
            "sample": replay["sample"],
            "turn": number,
            "prompt": messages[turn["message_index"] - 1]["content"],
            "reply": messages[turn["message_index"]]["content"],
            "reference": turn["reference"],
            "prompt_tokens": turn["prompt_tokens"],
            "new_tokens": turn["new_tokens"],
            "seconds": turn["seconds"],
            "first_token_seconds": turn["first_token_seconds"],
            "finish_reason": turn["finish_reason"],
            "error": error,
        }
        for number, turn in enumerate(replay["turns"])
    ]


def load_run(run_dir: str | Path) -> Run:
    """Read a run dir (or a merged one) back: summary.json, the manifest's config, and every
    chats file's records, in the order summary.json lists the files."""
    path = Path(run_dir)
    if not (path / "summary.json").is_file():
        raise RunnerError(f"{path} holds no summary.json: not a run dir (or the run never started)")
    summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    manifest = path / MANIFEST
    config = json.loads(manifest.read_text(encoding="utf-8"))["config"] if manifest.is_file() else {}
    files = [path / name for name in summary.get("chat_files", [])]
    records = [record for file in files if file.is_file() for record in read_records(file)]
    return Run(path, summary, config, records)
