"""A Hydra callback that checks the run (or sweep) dir can be written before Hydra writes to it.

Without it, an unwritable dir or a full disk is a Hydra traceback from deep in its job set-up;
with it, one line naming the dir and the reason, and exit 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


class WritableOutputDir(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config, "sweep")


def _check_writable(config: DictConfig, kind: str) -> None:
    """Create the dir and write (and fsync, then remove) a small file in it; exit with one clear
    line if either fails."""
    directory = OmegaConf.to_container(config.hydra[kind], resolve=False)["dir"]
    try:
        directory = str(config.hydra[kind].dir)  # resolving it may create it (unique_dir)
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe = Path(directory) / f".write-check-{os.getpid()}"
        try:
            with probe.open("wb") as stream:
                stream.write(b"\0" * 4096)
                stream.flush()
                os.fsync(stream.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except Exception as error:  # an OSError, or OmegaConf's wrapping of one a resolver raised
        cause: BaseException = error
        while cause.__cause__ is not None and not isinstance(cause, OSError):
            cause = cause.__cause__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        sys.exit(f"error: cannot write the {kind} dir {directory} (hydra.{kind}.dir): {reason}")
