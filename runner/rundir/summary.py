"""summary.json as a dataclass: the one schema the app writes and every reader reads.

Every field but `status` has a default, so a summary written by an older runner, by a run stopped
before it loaded its model, or by `runner.merge` reads as the same type, with None (or an empty
collection) for what it does not say. Keys this version does not know are kept in `other` and
written back as they were. Sections whose shape is an engine's own (`cache`, `steps`,
`speculative`) and the figures of the plan and the machine stay JSON objects.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import RunnerError


@dataclass(frozen=True)
class ModelInfo:
    """The model a run loaded: its preset name, where its weights came from, and its revision."""

    name: str | None = None
    source: str | None = None  # embedded | hub | local
    location: str | None = None  # the checkpoint directory or hub id
    revision: str | None = None


@dataclass(frozen=True)
class LoadedInfo:
    """What the loaded weights weigh and where they live, as the engine described them."""

    weights_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    dtype: str | None = None  # float32, bfloat16, ...
    device_map: dict[str, str] = field(default_factory=dict)  # module ("all") -> device
    device: str | None = None


@dataclass(frozen=True)
class BatchSize:
    configured: int | None = None  # after engine.batch_size=auto and the memory plan
    final: int | None = None  # after any out-of-memory back-off


@dataclass(frozen=True)
class PeakMemory:
    rss_bytes: int | None = None
    cuda_bytes: int | None = None  # None without CUDA

    @property
    def bytes(self) -> int | None:
        """The figure that bounds the run: GPU memory where it used a GPU, else resident memory."""
        return self.cuda_bytes or self.rss_bytes


_NESTED = {"model": ModelInfo, "loaded": LoadedInfo, "batch_size": BatchSize, "peak_memory": PeakMemory}


@dataclass(frozen=True)
class Summary:
    """What a run (or a merge of shards) loaded and replayed, how it ended, how fast, and on what."""

    status: str  # completed | interrupted | failed | merged
    error: str | None = None  # why a failed run ended
    model: ModelInfo | None = None
    precision: str | None = None  # as configured (auto, fp32, ...); `loaded.dtype` is what it became
    quant: str | None = None
    device: str | None = None
    loaded: LoadedInfo | None = None
    engine: str | None = None  # the engine that ran
    engine_version: str | None = None  # its package's version, where the engine is another package's
    batch_size: BatchSize | None = None
    cache: dict[str, Any] | None = None
    steps: dict[str, Any] | None = None
    speculative: dict[str, Any] | None = None
    requests: dict[str, Any] | None = None  # engine=openai: attempts, answers, retries and failures by cause
    server: dict[str, Any] | None = None  # engine=openai: base_url, model, what answered, a started server
    replay_mode: str | None = None
    generation: dict[str, Any] | None = None
    chat_template_sha256: str | None = None
    system_folded: bool | None = None
    input_files: list[str] = field(default_factory=list)
    chat_files: list[str] = field(default_factory=list)  # relative to the run dir, in input order
    conversations: int | None = None
    rejected: dict[str, int] = field(default_factory=dict)  # bad input lines by code
    records: int = 0
    records_kept_from_before: int = 0  # written by an earlier session of this run (resume)
    turns: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # conversations that ended in an error, by code
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    load_seconds: float | None = None
    replay_seconds: float | None = None
    wall_seconds: float | None = None
    tokens_per_second: float | None = None  # this session's new tokens over its replay time
    turn_seconds: dict[str, float | None] | None = None  # p50, p95
    first_token_seconds: dict[str, float | None] | None = None
    memory_plan: dict[str, Any] | None = None
    roofline: dict[str, Any] | None = None
    peak_memory: PeakMemory | None = None
    environment: dict[str, Any] | None = None
    # sha256 of each record's canonical JSON, per chats file in file order, as written: merge checks them.
    record_sha256: dict[str, list[str]] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # a merged run's shard dirs
    other: dict[str, Any] = field(default_factory=dict)  # keys of another version, kept as they are

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "other"}
        for key, value in data.items():
            if dataclasses.is_dataclass(value):
                data[key] = dataclasses.asdict(value)
        return {**data, **self.other}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary:
        known = {f.name for f in dataclasses.fields(cls)} - {"other"}
        values: dict[str, Any] = {key: value for key, value in data.items() if key in known}
        for key, kind in _NESTED.items():
            if isinstance(values.get(key), dict):
                names = {f.name for f in dataclasses.fields(kind)}
                values[key] = kind(**{k: v for k, v in values[key].items() if k in names})
        if isinstance(values.get("rejected"), int):  # merges before the per-code counts
            values["rejected"] = {"rejected": values["rejected"]} if values["rejected"] else {}
        for key in ("errors", "finish_reasons", "record_sha256", "input_files", "chat_files", "shards"):
            if values.get(key) is None:
                values.pop(key, None)  # keep the default empty collection
        other = {key: value for key, value in data.items() if key not in known}
        return cls(**values, other=other)

    @classmethod
    def read(cls, path: Path) -> Summary:
        """Read summary.json; a file that is not a JSON object is an error naming it."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RunnerError(f"{path}: not a readable summary ({error})") from None
        if not isinstance(data, dict) or not isinstance(data.get("status"), str):
            raise RunnerError(f"{path}: not a run summary (no 'status')")
        return cls.from_json(data)


# Field types resolved once, for the tests that check every field of a summary round-trips.
FIELD_TYPES = typing.get_type_hints(Summary)
