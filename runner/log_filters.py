"""Logging filters for the run's console and log file."""

from __future__ import annotations

import logging


class OncePerRun(logging.Filter):
    """Each distinct warning from a third-party library once per run: bitsandbytes' int8 matmul,
    for one, warns at every forward pass (5,670 times for 72 tokens). The project's own records
    and everything below WARNING pass untouched. One instance per handler."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.split(".")[0] in {"runner", "hydra_plugins"}:
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True
