"""Bad input lines: why one line is not a conversation (LineError) and how it is recorded (Rejected)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LineError(ValueError):
    """Why one line is not a valid conversation (the caller adds file and line).

    `code` is stable (for rejected.jsonl and scripts); the message says what and where.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# How much of a rejected line rejected.jsonl keeps (with the whole line's length and sha256), so
# that many huge bad lines cost neither memory nor disk.
RAW_PREFIX_BYTES = 4096


@dataclass(frozen=True)
class Rejected:
    """A line that is not a valid conversation: where, why (a stable code and a message), and what:
    the line's first RAW_PREFIX_BYTES bytes, its whole length and its sha256."""

    source: Path
    line: int
    id: str | int | None
    code: str
    message: str
    raw: bytes
    raw_bytes: int = 0
    raw_sha256: str = ""

    @classmethod
    def of(
        cls, source: Path, line: int, id: str | int | None, code: str, message: str, raw: bytes
    ) -> Rejected:
        """A reject of the whole line `raw` (only its prefix is kept)."""
        digest = hashlib.sha256(raw).hexdigest()
        return cls(source, line, id, code, message, raw[:RAW_PREFIX_BYTES], len(raw), digest)

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.source),
            "line": self.line,
            "id": self.id,
            "code": self.code,
            "message": self.message,
            "raw": self.raw.decode("utf-8", errors="backslashreplace"),
            "raw_bytes": self.raw_bytes,
            "raw_sha256": self.raw_sha256,
        }
