"""Writing a run dir: one writer at a time (the lock), records appended and fsynced as they
complete, and whole files replaced atomically."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.rundir.layout import LOCK


class RunDirLock:
    """One writer per run dir: an exclusive `flock` on `<run dir>/.lock`, held for the run's whole
    life. The OS drops it when the process ends, however it ends, so a killed run never leaves
    its dir locked; a second run or resume of a held dir is refused at once, naming the holder."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._descriptor: int | None = None

    def __enter__(self) -> RunDirLock:
        descriptor = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 4096).decode(errors="replace").strip() or "another process"
            os.close(descriptor)
            raise RunnerError(
                f"{self.run_dir} is in use by {holder}: one process writes a run dir at a time; wait for "
                "it to end (or stop it), or pick another hydra.run.dir"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._descriptor = descriptor
        return self

    def __exit__(self, *exc: object) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # releases the lock
            self._descriptor = None


def record_sha256(record: dict[str, Any]) -> str:
    """A record's digest: sha256 over its canonical JSON (sorted keys, no spaces, UTF-8), so that
    rewriting a file (resume's repair) keeps it and any edit of a value changes it."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ChatWriter:
    """Appends each record to its chats file as one write, then fsyncs: a crash loses at most the
    conversation in flight, and a line is either whole or the torn tail that resume cuts off.

    `digests` holds each chats file's record digests in file order, as written (records kept from
    an earlier session first, given by `keep`): summary.json records them, and merge checks them.
    """

    def __init__(self, paths: dict[Path, Path]):
        self._paths = paths
        self._files: dict[Path, int] = {}
        self.digests: dict[Path, list[str]] = {path: [] for path in paths.values()}

    def keep(self, path: Path, record: dict[str, Any]) -> None:
        """Count a record an earlier session of this run wrote to `path`."""
        self.digests[path].append(record_sha256(record))

    def write(self, source: Path, record: dict[str, Any]) -> None:
        path = self._paths[source]
        if source not in self._files:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[source] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        descriptor = self._files[source]
        end = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            written = os.write(descriptor, data)
            while written < len(data):  # only a full disk makes a regular file take less
                written += os.write(descriptor, data[written:])
            os.fsync(descriptor)
        except OSError as error:
            os.ftruncate(descriptor, end)  # leave whole records only
            raise RunnerError(f"could not write {path}: {error.strerror or error}") from error
        self.digests[path].append(record_sha256(record))

    def close(self) -> None:
        for descriptor in self._files.values():
            os.close(descriptor)
        self._files.clear()

    def __enter__(self) -> ChatWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    _write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomically(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """A whole JSONL file, written like `write_json_atomically`, one record at a time."""
    _write_atomically(path, (json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _write_atomically(path: Path, text: str | Iterable[str]) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with scratch.open("w", encoding="utf-8") as stream:
            stream.writelines([text] if isinstance(text, str) else text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(scratch, path)
    except OSError as error:
        raise RunnerError(f"could not write {path}: {error.strerror or error}") from error
    finally:
        scratch.unlink(missing_ok=True)
