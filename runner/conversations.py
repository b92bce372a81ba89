"""Read conversation JSONL files, validate every line, and hold them as frozen Conversations.

Everything is checked before any weights load, and every problem in every file is reported as
`file:line: reason` at once, so a user fixes a bad file in one pass.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from runner.errors import InputError
from runner.schema import InputFormat

ROLES = ("system", "user", "assistant")
# Top-level keys the runner owns in its output records: an input line may not carry them.
RESERVED_KEYS = ("replay",)
SYSTEM_FOLD_SEPARATOR = "\n\n"
MAX_LINE_BYTES = 16 * 2**20
# Nesting of lists and objects a line may have: deeper is a `too_deep` reject (JSON parsers and
# our own writer recurse, and no conversation needs more).
MAX_DEPTH = 100
OPENAI_ROLES = {role: role for role in ROLES}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


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

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


class LineError(ValueError):
    """Why one line is not a valid conversation (the caller adds file and line).

    `code` is stable (for rejected.jsonl and scripts); the message says what and where.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def resolve_input_files(paths: str | Sequence[str]) -> list[Path]:
    """Files, directories (their *.jsonl, sorted) or globs -> the files to read, in order.

    A file reached twice (named twice, or by a name and a glob) is an error, not read twice.
    """
    files: list[Path] = []
    problems: list[str] = []
    first_named: dict[Path, str] = {}
    for path in [paths] if isinstance(paths, str) else paths:
        try:
            matched = _matching_files(path)
        except InputError as error:
            problems += error.problems
            continue
        for file in matched:
            resolved = file.resolve()
            if resolved in first_named:
                problems.append(
                    f"{file}: named twice in input.path (by {first_named[resolved]!r} and {path!r})"
                )
                continue
            first_named[resolved] = path
            files.append(file)
    if problems:
        raise InputError(problems)
    return files


def _matching_files(path: str) -> list[Path]:
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        files = sorted(candidate.glob("*.jsonl"))
        where = f"directory {candidate} has no *.jsonl files"
    elif candidate.is_file():
        files = [candidate]
        where = ""
    elif glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(str(candidate), recursive=True) if Path(p).is_file())
        where = f"glob {path!r} matches no files"
    else:
        raise InputError([f"{path}: no such file or directory (set input.path=<file, dir or glob>)"])
    if not files:
        raise InputError([f"{where} (set input.path=<file, dir or glob>)"])
    return files


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


def load_conversations(
    files: Iterable[Path], form: InputFormat = InputFormat.auto, max_line_bytes: int = MAX_LINE_BYTES
) -> list[Conversation]:
    """Read and validate every line of every file; raise InputError listing all problems."""
    conversations, rejected = read_conversations(files, form, max_line_bytes)
    if rejected:
        raise InputError([str(reject) for reject in rejected])
    return conversations


def read_conversations(
    files: Iterable[Path], form: InputFormat = InputFormat.auto, max_line_bytes: int = MAX_LINE_BYTES
) -> tuple[list[Conversation], list[Rejected]]:
    """Every valid conversation of every file, and every invalid line with its reason, in file order.

    Ids are unique across the whole run: 1 and "1" collide (they print the same), and every later
    occurrence is rejected, naming the first.
    """
    conversations: list[Conversation] = []
    rejected: list[Rejected] = []
    first_seen: dict[str, str] = {}
    for path in files:
        for line_number, raw, whole in _numbered_lines(path, max_line_bytes):
            if whole is not None:  # longer than max_line_bytes: only its start was read
                limit = f"input.max_line_bytes={max_line_bytes}"
                message = f"line of {whole[0]} bytes, longer than {limit} (not parsed)"
                reject = Rejected(path, line_number, None, "line_too_long", message, raw, *whole)
                rejected.append(reject)
                continue
            try:
                conversation = parse_conversation(raw, path, line_number, form)
            except LineError as error:
                rejected.append(Rejected.of(path, line_number, _id_of(raw), error.code, str(error), raw))
                continue
            key = str(conversation.id)
            if key in first_seen:
                message = f"duplicate id {key!r} (first at {first_seen[key]})"
                rejected.append(Rejected.of(path, line_number, conversation.id, "duplicate_id", message, raw))
                continue
            first_seen[key] = conversation.where
            conversations.append(conversation)
    return conversations, rejected


def _id_of(raw: bytes) -> str | int | None:
    """The id of a rejected line, when it can still be read."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    value = record.get("id", record.get("question_id")) if isinstance(record, dict) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def _numbered_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes, tuple[int, str] | None]]:
    """Yield (1-based line number, raw bytes, None) for non-blank lines; split on b"\n" only.

    Binary reading keeps U+2028 and other Unicode line separators inside their record, a CRLF
    line end loses its "\r", and a UTF-8 byte-order mark at the start of the file is dropped. A
    line longer than `max_line_bytes` is read on in chunks (memory stays bounded) and yielded as
    its first bytes with (its whole length, its sha256) in place of None, for the caller to reject.
    """
    with path.open("rb") as stream:
        line_number = 0
        while raw := stream.readline(max_line_bytes + 2):
            line_number += 1
            if len(raw) == max_line_bytes + 2 and not raw.endswith(b"\n"):  # longer still: read on
                digest, length = hashlib.sha256(raw), len(raw)
                while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                    digest.update(rest)
                    length += len(rest)
                rest = rest.rstrip(b"\r\n")
                digest.update(rest)
                yield (
                    line_number,
                    raw[: min(max_line_bytes + 1, RAW_PREFIX_BYTES)],
                    (
                        length + len(rest),
                        digest.hexdigest(),
                    ),
                )
                continue
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield line_number, raw, None


def parse_conversation(
    raw: bytes, source: Path, line: int, form: InputFormat = InputFormat.auto
) -> Conversation:
    """One JSONL line -> a validated Conversation, or LineError saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LineError("invalid_utf8", f"not valid UTF-8 at byte {error.start} of the line") from None
    try:
        record = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except json.JSONDecodeError as error:
        raise LineError("invalid_json", f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise LineError("too_deep", f"nested deeper than {MAX_DEPTH} levels of lists and objects") from None
    _check_writable(record)
    if not isinstance(record, dict):
        raise LineError("not_an_object", f"expected a JSON object, got {_json_type(record)}")
    for key in RESERVED_KEYS:
        if key in record:
            raise LineError(
                "reserved_key",
                f"key {key!r} is reserved for the runner's own metadata "
                f"(is this a runner output? drop it, e.g. jq -c 'del(.{key})')",
            )
    form = _detect_format(record) if form is InputFormat.auto else form
    if form is InputFormat.openai_batch:
        from runner import openai_batch

        if not openai_batch.is_request(record):
            raise LineError("unknown_format", "an OpenAI Batch request needs 'custom_id' and 'body'")
        conversation_id, entries, settings, recorded = openai_batch.parse_request(record)
        messages = _validate_order(FORMAT_PARSERS[InputFormat.messages](entries, "body.messages"))
        return Conversation(
            conversation_id, messages, MappingProxyType(recorded), source, line, MappingProxyType(settings)
        )
    messages_key = FORMAT_KEYS[form]
    default_id = record.get("question_id") if form is InputFormat.turns else None
    conversation_id = record.get("id", default_id if default_id is not None else f"{source.name}:{line}")
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, str | int):
        raise LineError(
            "invalid_id", f"'id' must be a string or an integer, got {_json_type(conversation_id)}"
        )
    if conversation_id == "":
        raise LineError("invalid_id", "'id' is empty")
    messages = _validate_order(FORMAT_PARSERS[form](record.get(messages_key), messages_key))
    extra = {key: value for key, value in record.items() if key not in ("id", messages_key)}
    return Conversation(conversation_id, messages, MappingProxyType(extra), source, line)


def _check_writable(record: Any) -> None:
    """Refuse now what could not be written out or read back later: nesting deeper than
    MAX_DEPTH, and lone surrogates (UTF-8 cannot encode them) in any key or string value."""
    pending = [(record, 1, "")]
    while pending:
        value, depth, where = pending.pop()
        if depth > MAX_DEPTH:
            raise LineError(
                "too_deep", f"{where.lstrip('.')}: nested deeper than {MAX_DEPTH} levels of lists and objects"
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            at = f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]"
            if isinstance(key, str):
                _check_encodable(key, f"key {at.lstrip('.')!r}")
            if isinstance(item, dict | list):
                pending.append((item, depth + 1, at))
            elif isinstance(item, str):
                _check_encodable(item, at.lstrip("."))


def _check_encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise LineError(
            "lone_surrogate", f"{where}: holds a lone surrogate at character {error.start}"
        ) from None


def _detect_format(record: dict[str, Any]) -> InputFormat:
    if "custom_id" in record and "body" in record:
        return InputFormat.openai_batch
    found = [form for form, key in FORMAT_KEYS.items() if key in record]
    if len(found) != 1:
        keys = " or ".join(repr(key) for key in FORMAT_KEYS.values())
        what = "none" if not found else " and ".join(repr(FORMAT_KEYS[form]) for form in found)
        raise LineError(
            "unknown_format", f"expected exactly one of {keys} (found {what}); input.format=... forces one"
        )
    return found[0]


def _parse_turns(value: Any, key: str) -> tuple[Message, ...]:
    """MT-bench style: a list of user turns."""
    if not isinstance(value, list) or not value:
        raise LineError("no_messages", f"{_missing_or(value, key)} must be a non-empty list of user turns")
    return tuple(Message("user", _text(f"{key}[{index}]", turn)) for index, turn in enumerate(value))


def _parse_entries(
    value: Any, key: str, *, role_key: str, text_key: str, roles: Mapping[str, str]
) -> tuple[Message, ...]:
    """OpenAI ({"role", "content"}) or ShareGPT ({"from": "system" | "human" | "gpt", "value"})."""
    if not isinstance(value, list) or not value:
        raise LineError(
            "no_messages",
            f"{_missing_or(value, key)} must be a non-empty list of {{{role_key!r}, {text_key!r}}} objects",
        )
    return tuple(
        _parse_entry(f"{key}[{index}]", item, role_key, text_key, roles) for index, item in enumerate(value)
    )


def _missing_or(value: Any, key: str) -> str:
    return f"missing {key!r}:" if value is None else f"{key!r}"


def _validate_order(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """System first if at all, every assistant answering a user, and at least one user message."""
    for index, message in enumerate(messages):
        previous = messages[index - 1].role if index else None
        if message.role == "system" and index != 0:
            raise LineError("system_not_first", f"message {index}: a system message may only come first")
        if message.role == "assistant" and previous != "user":
            raise LineError(
                "assistant_without_user",
                f"message {index}: an assistant message must answer a user message "
                f"(it follows {previous or 'nothing'})",
            )
    if not any(message.role == "user" for message in messages):
        raise LineError("no_user_turn", "no user message: nothing to reply to")
    return messages


def _parse_entry(where: str, item: Any, role_key: str, text_key: str, roles: Mapping[str, str]) -> Message:
    """One message object: exactly a role key and a text key, a known role, a valid text."""
    if not isinstance(item, dict):
        raise LineError("invalid_message", f"{where}: expected an object, got {_json_type(item)}")
    unknown = sorted(set(item) - {role_key, text_key})
    if unknown:
        raise LineError(
            "invalid_message", f"{where}: unsupported key(s) {unknown} (only {role_key!r} and {text_key!r})"
        )
    role = item.get(role_key)
    if not isinstance(role, str) or role not in roles:
        allowed = ", ".join(roles)
        raise LineError("unknown_role", f"{where}: unknown {role_key} {role!r} (allowed: {allowed})")
    text = item.get(text_key)
    if isinstance(text, list):
        text = _join_text_parts(where, text)
    return Message(roles[role], _text(where, text, text_key))


def _join_text_parts(where: str, parts: list[Any]) -> str:
    """OpenAI content parts: text parts are concatenated, as chat templates render them."""
    texts = []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            shown = repr(kind) if kind is not None else _json_type(part)
            raise LineError(
                "unsupported_content_part",
                f"{where}: content part {index} is {shown}; only {{'type': 'text', 'text': ...}}",
            )
        texts.append(part["text"])
    return "".join(texts)


def _text(where: str, content: Any, key: str = "content") -> str:
    """A message text: a non-empty string (its encoding was checked with the whole record)."""
    if not isinstance(content, str):
        raise LineError("invalid_content", f"{where}: {key!r} must be a string, got {_json_type(content)}")
    if not content.strip():
        raise LineError("empty_content", f"{where}: {key!r} is empty")
    return content


def fold_system_message(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """For templates without a system role: prepend the system text to the first user turn."""
    if not messages or messages[0].role != "system":
        return messages
    system, first, *rest = messages
    folded = Message("user", system.content + SYSTEM_FOLD_SEPARATOR + first.content)
    return (folded, *rest)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    duplicates = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    if duplicates:
        raise LineError("duplicate_key", f"duplicate JSON key(s) {duplicates} in one object")
    return dict(pairs)


def _no_constants(name: str) -> None:
    raise LineError("non_finite_number", f"{name} is not valid JSON (use null or a string)")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


FORMAT_KEYS = {
    InputFormat.messages: "messages",
    InputFormat.sharegpt: "conversations",
    InputFormat.turns: "turns",
}
FORMAT_PARSERS = {
    InputFormat.messages: functools.partial(
        _parse_entries, role_key="role", text_key="content", roles=OPENAI_ROLES
    ),
    InputFormat.sharegpt: functools.partial(
        _parse_entries, role_key="from", text_key="value", roles=SHAREGPT_ROLES
    ),
    InputFormat.turns: _parse_turns,
}
