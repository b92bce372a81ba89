"""Writing an export: all its files or none, never replacing a file another run exported (an export
dir's `.chat-runner-exports.json` says which run each of its files came from)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from runner.errors import RunnerError

OWNERS = ".chat-runner-exports.json"  # in an export dir: the run each of its files was exported from


def claim_files(files: dict[Path, tuple[bytes, Path]], out: Path, default: bool) -> bytes:
    """Refuse to replace a file exported from another run (or not by an export at all, outside a
    run's own exports/ dir); return the export dir's record of owners with these files in it."""
    try:
        owners = json.loads((out / OWNERS).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        owners = {}
    owners = owners if isinstance(owners, dict) else {}
    for path, (_, source) in files.items():
        mine, owner = str(source.resolve()), owners.get(path.name)
        if path.exists() and owner != mine and not (owner is None and default):
            whose = f"the export of another run, {owner}" if owner else f"a file not exported from {source}"
            raise RunnerError(
                f"{path}: already holds {whose}: export {source} into another --out, or remove it first"
            )
        owners[path.name] = mine
    return (json.dumps(owners, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def commit_files(files: dict[Path, bytes], out: Path) -> None:
    """Write every file or none: each to a temp file first (fsynced), then all renamed into place;
    on a failure the temp files and the directories made for them are removed again."""
    if out.exists() and not out.is_dir():
        raise RunnerError(f"{out}: exists and is not a directory")
    made: list[Path] = []
    scratch: dict[Path, Path] = {}
    current = out
    try:
        for current in reversed([path for path in (out, *out.parents) if not path.exists()]):
            current.mkdir()
            made.append(current)
        for current, data in files.items():
            scratch[current] = current.with_name(f".{current.name}.{os.getpid()}.tmp")
            with scratch[current].open("wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        for current, temporary in scratch.items():
            os.replace(temporary, current)
    except OSError as error:
        for temporary in scratch.values():
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise RunnerError(f"{current}: {error.strerror or error}") from None
