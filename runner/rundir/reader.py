"""THE reader of run dirs: records, turns, summary and config, for the viewer, report, export,
merge and `runner.load_run` alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonlines

from runner.errors import RunnerError


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file the runner wrote; anything but whole records is an error."""
    try:
        with jsonlines.open(path) as reader:
            return list(reader)
    except jsonlines.InvalidLineError as error:
        raise RunnerError(f"{path}:{error.lineno}: not a whole JSON record") from None
