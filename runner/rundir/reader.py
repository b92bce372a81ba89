"""THE reader of run dirs: summary, config, overrides, records, turns and rejects of one run, and the
jobs of a sweep, for the viewer, report, export, merge and `runner.load_run` alike.

Records come in the order summary.json lists the chats files (input order), each file's records as
written. A torn last line (a run still writing, or killed mid-write) is left out, as resume cuts it
off; anything else that is not a whole JSON record is an error naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from runner.config.schema import InputFormat
from runner.errors import RunnerError
from runner.inputs.conversation import Conversation
from runner.inputs.reader import MAX_LINE_BYTES, read_conversations
from runner.rundir.layout import MANIFEST, REJECTED, SUMMARY
from runner.rundir.summary import Summary

# transformers' dtype names as the precision options say them.
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def read_records(path: Path, *, torn_tail: bool = False) -> list[dict[str, Any]]:
    """Every record of a JSONL file the runner wrote; anything but whole JSON objects is an error
    naming the line. `torn_tail`: a last line without its newline that does not parse is left out."""
    return list(iter_records(path, torn_tail=torn_tail))


def iter_records(path: Path, *, torn_tail: bool = False) -> Iterator[dict[str, Any]]:
    """`read_records`, one record at a time: memory holds one line."""
    try:
        stream = path.open("rb")
    except OSError as error:
        raise RunnerError(f"{path}: cannot read it ({error.strerror or error})") from None
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                if torn_tail and not line.endswith(b"\n"):  # the last line, not (yet) finished
                    return
                raise RunnerError(f"{path}:{number}: not a whole JSON record") from None
            if not isinstance(record, dict):
                raise RunnerError(f"{path}:{number}: not a JSON object")
            yield record


def is_run_dir(path: Path) -> bool:
    return (path / SUMMARY).is_file() or (path / "chats").is_dir()


class Run:
    """One run dir (or a merged one) read back: `summary`, `config`, `records` (input order),
    `turns()` (a row per generated turn) and `to_pandas()`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        run = cls(Path(path))
        if not is_run_dir(run.path):
            raise RunnerError(f"{run.path} holds no summary.json or chats/: not a run dir")
        return run

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def summary(self) -> Summary | None:
        """summary.json, or None while the run has written none (it is starting, or was killed)."""
        path = self.path / SUMMARY
        return Summary.read(path) if path.is_file() else None

    @property
    def status(self) -> str:
        """summary.json's status (completed, interrupted, failed, merged), or "unfinished" while the
        run has written none (it is still running, or was killed before it could)."""
        return self.summary.status if self.summary is not None else "unfinished"

    @property
    def finished(self) -> bool:
        """Whether the run replayed all it was to: it completed, or it is a merge of completed shards."""
        return self.status in ("completed", "merged")

    @property
    def model_name(self) -> str | None:
        """The model's preset name, from the summary or (a merged run) the config."""
        if self.summary is not None and self.summary.model is not None and self.summary.model.name:
            return self.summary.model.name
        return (self.config.get("model") or self.hydra_config.get("model") or {}).get("name")

    @cached_property
    def manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunnerError(f"{path}: not a readable manifest ({error})") from None

    @property
    def config(self) -> dict[str, Any]:
        """The run's resolved config as the manifest recorded it ({} without a manifest)."""
        return (self.manifest or {}).get("config", {})

    @cached_property
    def hydra_config(self) -> dict[str, Any]:
        """.hydra/config.yaml, the composed config as Hydra saved it ({} without one)."""
        path = self.path / ".hydra" / "config.yaml"
        return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}

    def hydra_text(self, name: str) -> str | None:
        """The text of .hydra/<name>.yaml, or None."""
        path = self.path / ".hydra" / f"{name}.yaml"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def input_conversations(self, form: InputFormat | None = None) -> list[Conversation] | None:
        """The valid conversations of the inputs the manifest names (every shard's), read and checked
        again as the run read them (in its input.format, or `form`); None when that cannot be known:
        no manifest, or an input not found from here (paths are as the run was given them) or
        changed since it ran (its sha256 is not the manifest's)."""
        if self.manifest is None:
            return None
        files = []
        try:
            for entry in self.manifest.get("inputs", []):
                path = Path(entry["path"])
                with path.open("rb") as stream:
                    if hashlib.file_digest(stream, "sha256").hexdigest() != entry["sha256"]:
                        return None
                files.append(path)
            settings = self.config.get("input") or {}
            form = form or InputFormat(settings.get("format", InputFormat.auto.value))
            conversations, _ = read_conversations(files, form, settings.get("max_line_bytes", MAX_LINE_BYTES))
        except (OSError, KeyError, TypeError, ValueError):  # gone, unreadable, or a manifest of another shape
            return None
        return conversations

    def user_overrides(self) -> list[str]:
        """The command-line overrides (none without .hydra/, e.g. a merged run), less the
        `resume=true` a requeued attempt adds, which is no choice of the user's."""
        path = self.path / ".hydra" / "overrides.yaml"
        listed = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
        return [override for override in listed if override.split("=", 1)[0].lstrip("+~") != "resume"]

    @property
    def chat_files(self) -> list[Path]:
        """The chats files in input order: as summary.json lists them, else those on disk."""
        if self.summary is not None and self.summary.chat_files:
            return [self.path / name for name in self.summary.chat_files]
        return sorted((self.path / "chats").glob("*.jsonl"))

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        return [
            record
            for path in self.chat_files
            if path.is_file()
            for record in read_records(path, torn_tail=True)
        ]

    def records_by_file(self) -> dict[Path, list[dict[str, Any]]]:
        return {path: read_records(path, torn_tail=True) for path in self.chat_files if path.is_file()}

    def rejects(self) -> list[dict[str, Any]]:
        """rejected.jsonl's lines (bad input lines skipped by input.on_error=skip)."""
        path = self.path / REJECTED
        return read_records(path) if path.is_file() else []

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

    def resolved_setup(self) -> dict[str, str] | None:
        """The precision and device the run's model loaded with (fp32 and cpu where the config said
        auto); None before it loaded."""
        loaded = self.summary.loaded if self.summary is not None else None
        if loaded is None or loaded.dtype is None:
            return None
        # hf_device_map names a GPU by its index; a model split over devices lists each once.
        devices = [f"cuda:{d}" if d.isdigit() else d for d in dict.fromkeys(loaded.device_map.values())]
        return {
            "precision": DTYPES.get(loaded.dtype, loaded.dtype),
            "device": "+".join(devices) or loaded.device,
        }

    def last_logged_error(self) -> str | None:
        """The last ERROR line of the run's log, or None."""
        log = self.path / "chat-runner.log"
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        errors = [line for line in text.splitlines() if "[ERROR]" in line]
        return errors[-1].split(" - ", 1)[-1] if errors else None


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


def sweep_jobs(sweep_dir: Path) -> list[Run]:
    """The job dirs (dirs with .hydra/) of a sweep, in job order (by their number)."""
    if not sweep_dir.is_dir():
        return []
    jobs = sorted(
        (path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir()),
        key=lambda path: (
            int(path.name.split("_")[0]) if path.name.split("_")[0].isdigit() else 1 << 30,
            path.name,
        ),
    )
    return [Run(path) for path in jobs]
