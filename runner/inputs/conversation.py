"""A conversation as the runner holds it: frozen messages, the input's other keys, its origin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

ROLES = ("system", "user", "assistant")


SYSTEM_FOLD_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """One input line: its id, messages, the other keys (carried to the output) and its origin."""

    id: str | int
    messages: tuple[Message, ...]
    extra: Mapping[str, Any]
    source: Path
    line: int
    # The line's own decoding settings over the run's (an OpenAI Batch request's max_tokens, ...):
    # Sampling fields, and `seed` in place of generation.seed.
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Where the line starts in its file, and its place among the non-blank lines of every input
    # file (from 0), which decides the shard that owns it: the conversation is found again by these.
    offset: int = field(default=0, compare=False)
    ordinal: int = field(default=0, compare=False)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def fold_system_message(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """For templates without a system role: prepend the system text to the first user turn."""
    if not messages or messages[0].role != "system":
        return messages
    system, first, *rest = messages
    folded = Message("user", system.content + SYSTEM_FOLD_SEPARATOR + first.content)
    return (folded, *rest)
