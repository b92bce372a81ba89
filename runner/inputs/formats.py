"""One JSONL line -> a validated Conversation: the JSON checks every format shares, format detection,
and the parsers of the messages (OpenAI), conversations (ShareGPT) and turns (MT-bench) forms; OpenAI
Batch requests are runner/inputs/openai_batch.py's.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from runner.config.schema import InputFormat
from runner.inputs import openai_batch
from runner.inputs.conversation import ROLES, Conversation, Message
from runner.inputs.rejects import LineError

# Top-level keys the runner owns in its output records: an input line may not carry them.
RESERVED_KEYS = ("replay",)


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


def parse_conversation(
    raw: bytes,
    source: Path,
    line: int,
    form: InputFormat = InputFormat.auto,
    *,
    offset: int = 0,
    ordinal: int = 0,
) -> Conversation:
    """One JSONL line -> a validated Conversation, or LineError saying what is wrong (`offset`,
    `ordinal`: where the line is, see Conversation)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LineError("invalid_utf8", f"not valid UTF-8 at byte {error.start} of the line") from None
    try:
        record = _DECODER.decode(text)
    except json.JSONDecodeError as error:
        raise LineError("invalid_json", f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise LineError("too_deep", f"nested deeper than {MAX_DEPTH} levels of lists and objects") from None
    if _may_not_be_writable(raw):
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
        if not openai_batch.is_request(record):
            raise LineError("unknown_format", "an OpenAI Batch request needs 'custom_id' and 'body'")
        conversation_id, entries, settings, recorded = openai_batch.parse_request(record)
        messages = _validate_order(FORMAT_PARSERS[InputFormat.messages](entries, "body.messages"))
        return Conversation(
            conversation_id,
            messages,
            MappingProxyType(recorded),
            source,
            line,
            MappingProxyType(settings),
            offset,
            ordinal,
        )
    messages_key = FORMAT_KEYS[form]
    conversation_id = _record_id(record, form, source, line)
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, str | int):
        raise LineError(
            "invalid_id", f"'id' must be a string or an integer, got {_json_type(conversation_id)}"
        )
    if conversation_id == "":
        raise LineError("invalid_id", "'id' is empty")
    messages = _validate_order(FORMAT_PARSERS[form](record.get(messages_key), messages_key))
    extra = {key: value for key, value in record.items() if key not in ("id", messages_key)}
    return Conversation(
        conversation_id, messages, MappingProxyType(extra), source, line, offset=offset, ordinal=ordinal
    )


def claimed_id(raw: bytes, source: Path, line: int, form: InputFormat = InputFormat.auto) -> str | None:
    """The id a line claims, as a string (1 and "1" print the same, so they are one id), read
    without validating the line: what `parse_conversation` would give it, or None where no id can
    be read. A line claims its id whether or not it is valid, so that every shard of a run, each
    parsing only its own lines, agrees on which line holds an id first.

    A line that opens with its `id` (as most writers put it) is read no further than that: the
    first key of an object is a top-level key, so its value is the id, or the line is not valid."""
    leading = _LEADING_ID.match(raw)
    if leading and b'"custom_id"' not in raw:
        text, number = leading.groups()
        return text.decode("utf-8", "replace") if text is not None else str(int(number))
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    if form is InputFormat.auto:
        try:
            form = _detect_format(record)
        except LineError:
            return None
    value = (
        record.get("custom_id")
        if form is InputFormat.openai_batch
        else _record_id(record, form, source, line)
    )
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        return None
    return str(value)


def _record_id(record: dict[str, Any], form: InputFormat, source: Path, line: int) -> Any:
    """A conversation's id: `id`, else MT-bench's `question_id`, else `<file name>:<line>`."""
    default_id = record.get("question_id") if form is InputFormat.turns else None
    return record.get("id", default_id if default_id is not None else f"{source.name}:{line}")


def _may_not_be_writable(raw: bytes) -> bool:
    """Whether a line could hold what `_check_writable` refuses: fewer brackets than MAX_DEPTH cannot
    nest that deep, and a lone surrogate can only come from a \\uD800-\\uDFFF escape (the line is
    valid UTF-8). Most lines have neither, and skip the walk over every value."""
    return raw.count(b"[") + raw.count(b"{") > MAX_DEPTH or _SURROGATE_ESCAPE.search(raw) is not None


_LEADING_ID = re.compile(rb'\{\s*"id"\s*:\s*(?:"([^"\\]+)"|(-?(?:0|[1-9][0-9]*)))\s*[,}]')


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
    unknown = (
        []
        if len(item) == 2 and role_key in item and text_key in item
        else sorted(set(item) - {role_key, text_key})
    )
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
    if not content or content.isspace():
        raise LineError("empty_content", f"{where}: {key!r} is empty")
    return content


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    unique = dict(pairs)
    if len(unique) < len(pairs):
        duplicates = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise LineError("duplicate_key", f"duplicate JSON key(s) {duplicates} in one object")
    return unique


def _no_constants(name: str) -> None:
    raise LineError("non_finite_number", f"{name} is not valid JSON (use null or a string)")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constants)


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
