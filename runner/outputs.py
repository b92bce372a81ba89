"""The run directory: chats written append-and-flush as they complete, summary.json, environment.

Layout (Hydra writes `.hydra/` and `chat-runner.log` beside these):
    chats/<input-file-stem>.jsonl   one completed conversation a line, in input order
    summary.json                    config choices, counts, speed, memory, versions, hardware
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import jsonlines

from runner.errors import InputError
from runner.replay import ReplayedConversation

PACKAGES = (
    "chat-runner",
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "hydra-core",
    "omegaconf",
    "gguf",
    "tokenizers",
)

_claimed_dirs: dict[str, str] = {}


def unique_dir(base: str) -> str:
    """Hydra resolver for the run dir: `base`, or `base-1`, `base-2`... if another run holds it.

    `mkdir` claims a directory atomically, so two runs started in the same second never share one;
    the answer is remembered so that every resolution in this process agrees.
    """
    if base not in _claimed_dirs:
        for suffix in ("", *(f"-{n}" for n in range(1, 10_000))):
            candidate = Path(base + suffix)
            candidate.parent.mkdir(parents=True, exist_ok=True)
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            _claimed_dirs[base] = str(candidate)
            break
    return _claimed_dirs[base]


def chat_paths(run_dir: Path, files: Iterable[Path]) -> dict[Path, Path]:
    """Map each input file to `chats/<stem>.jsonl`; two inputs may not share a stem."""
    paths: dict[Path, Path] = {}
    owners: dict[str, Path] = {}
    problems = []
    for source in files:
        if source.stem in owners:
            problems.append(
                f"{source}: same file name as {owners[source.stem]}; both would write "
                f"chats/{source.stem}.jsonl (rename one, or run them separately)"
            )
        owners[source.stem] = source
        paths[source] = run_dir / "chats" / f"{source.stem}.jsonl"
    if problems:
        raise InputError(problems)
    return paths


def chat_record(replayed: ReplayedConversation, chat_template_sha256: str) -> dict[str, Any]:
    """One output line: id, the input's other keys, the full messages, and replay metadata."""
    conversation = replayed.conversation
    return {
        "id": conversation.id,
        **conversation.extra,
        "messages": [message.as_dict() for message in replayed.messages],
        "replay": {
            "sample": replayed.sample,
            "seed": replayed.seed,
            "system_folded": replayed.system_folded,
            "chat_template_sha256": chat_template_sha256,
            "error": None
            if replayed.error is None
            else {"code": replayed.error.code, "message": replayed.error.message, **replayed.error.details},
            "turns": [
                {
                    "message_index": turn.message_index,
                    "prompt_tokens": turn.prompt_tokens,
                    "new_tokens": turn.new_tokens,
                    "seconds": round(turn.seconds, 4),
                    "first_token_seconds": round(turn.first_token_seconds, 4),
                    "finish_reason": turn.finish_reason,
                    "reference": turn.reference,
                }
                for turn in replayed.turns
            ],
        },
    }


class ChatWriter:
    """Appends records to their chats file and flushes each one, so a crash loses at most one."""

    def __init__(self, paths: dict[Path, Path]):
        self._paths = paths
        self._streams: dict[Path, IO[str]] = {}
        self._writers: dict[Path, jsonlines.Writer] = {}

    def write(self, source: Path, record: dict[str, Any]) -> None:
        if source not in self._writers:
            path = self._paths[source]
            path.parent.mkdir(parents=True, exist_ok=True)
            stream = self._streams[source] = path.open("a", encoding="utf-8")
            self._writers[source] = jsonlines.Writer(
                stream,
                flush=True,
                dumps=functools.partial(json.dumps, ensure_ascii=False),
            )
        self._writers[source].write(record)

    def close(self) -> None:
        for source, writer in self._writers.items():
            writer.close()
            self._streams[source].close()  # jsonlines leaves a stream it did not open to its owner
        self._writers.clear()
        self._streams.clear()

    def __enter__(self) -> ChatWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with scratch.open("w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=2, ensure_ascii=False)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(scratch, path)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment() -> dict[str, Any]:
    """Package versions, hardware and git revision: what a colleague needs to reproduce a run."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "git_revision": _git_revision(),
    }


def _git_revision() -> str | None:
    """The project's commit (with "+dirty" for local changes), or None outside a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
