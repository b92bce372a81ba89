"""Read conversation JSONL files: resolve the input paths, read every line with bounded memory,
parse and validate it, and report every problem in every file as `file:line: reason` at once, so a
user fixes a bad file in one pass. Everything is checked before any weights load.
"""

from __future__ import annotations

import glob
import hashlib
import json
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from runner.config.schema import InputFormat
from runner.errors import InputError
from runner.inputs.conversation import Conversation
from runner.inputs.formats import claimed_id, parse_conversation
from runner.inputs.rejects import RAW_PREFIX_BYTES, LineError, Rejected

MAX_LINE_BYTES = 16 * 2**20


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
    """The regular files `path` names. A FIFO, a device (a link to /dev/zero) or a directory where
    a file is expected is refused, naming it: reading one would hang, spin or fail mid-run."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        files = sorted(candidate.glob("*.jsonl"))
        where = f"directory {candidate} has no *.jsonl files"
    elif candidate.exists() and not glob.has_magic(path):
        files = [candidate]
        where = ""
    elif glob.has_magic(path):  # directories a recursive glob passes through are no matches
        files = sorted(Path(p) for p in glob.glob(str(candidate), recursive=True) if not Path(p).is_dir())
        where = f"glob {path!r} matches no files"
    else:
        raise InputError([f"{path}: no such file or directory (set input.path=<file, dir or glob>)"])
    if not files:
        raise InputError([f"{where} (set input.path=<file, dir or glob>)"])
    irregular = [
        f"{file}: not a regular file ({_kind(file)}): input files must be regular files"
        for file in files
        if not file.is_file()
    ]
    if irregular:
        raise InputError(irregular)
    return files


def _kind(path: Path) -> str:
    """What a path that is not a regular file is, as `ls -l` would tell."""
    try:
        mode = path.stat().st_mode
    except OSError as error:
        return f"a broken link: {error.strerror}" if path.is_symlink() else error.strerror or str(error)
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device" + (f", through a link to {path.resolve()}" if path.is_symlink() else "")
    return "a socket" if stat.S_ISSOCK(mode) else "not a file"


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
    """Every valid conversation of every file, and every invalid line with its reason, in file order."""
    conversations: list[Conversation] = []
    rejected: list[Rejected] = []
    for item in scan_conversations(files, form, max_line_bytes):
        (conversations if isinstance(item, Conversation) else rejected).append(item)
    return conversations, rejected


def scan_conversations(
    files: Iterable[Path],
    form: InputFormat = InputFormat.auto,
    max_line_bytes: int = MAX_LINE_BYTES,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Conversation | Rejected]:
    """One streaming pass: each valid conversation, and each invalid line with its reason, of the
    lines shard (index, count) owns (the non-blank lines of all files, counted from 0, whose number
    modulo count is index), in file order. Memory holds one line at a time, and the ids seen.

    Ids are unique across the whole run: 1 and "1" collide (they print the same), and a line with
    an id an earlier line holds (valid or not) is rejected, naming the first. Lines of other shards
    are only read for their id: a shard parses and checks its own lines alone.
    """
    index, count = shard
    first_seen: dict[str, int] = {}  # str(id) -> (file number << 32) | line
    ordinal = -1
    files = list(files)
    for number, path in enumerate(files):
        for line_number, offset, raw, whole in _numbered_lines(path, max_line_bytes):
            ordinal += 1
            if ordinal % count != index:
                claimed = None if whole is not None else claimed_id(raw, path, line_number, form)
                if claimed is not None:
                    first_seen.setdefault(claimed, number << 32 | line_number)
                continue
            if whole is not None:  # longer than max_line_bytes: only its start was read
                limit = f"input.max_line_bytes={max_line_bytes}"
                message = f"line of {whole[0]} bytes, longer than {limit} (not parsed)"
                yield Rejected(path, line_number, None, "line_too_long", message, raw, *whole)
                continue
            try:
                conversation = parse_conversation(
                    raw, path, line_number, form, offset=offset, ordinal=ordinal
                )
            except LineError as error:
                claimed = claimed_id(raw, path, line_number, form)
                if claimed is not None:
                    first_seen.setdefault(claimed, number << 32 | line_number)
                yield Rejected.of(path, line_number, _id_of(raw), error.code, str(error), raw)
                continue
            key = str(conversation.id)
            first = first_seen.setdefault(key, number << 32 | line_number)
            if first != number << 32 | line_number:
                where = f"{files[first >> 32]}:{first & 0xFFFFFFFF}"
                message = f"duplicate id {key!r} (first at {where})"
                yield Rejected.of(path, line_number, conversation.id, "duplicate_id", message, raw)
                continue
            yield conversation


def read_line(path: Path, offset: int, max_line_bytes: int = MAX_LINE_BYTES) -> bytes:
    """The line that starts at `offset` in `path`, as `scan_conversations` read it."""
    with path.open("rb") as stream:
        stream.seek(offset)
        raw = stream.readline(max_line_bytes + 2)
    if offset == 0 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.rstrip(b"\r\n")


def _id_of(raw: bytes) -> str | int | None:
    """The id (or an OpenAI Batch request's custom_id) of a rejected line, when it can still be read;
    a lone surrogate in it is written as its escape (\\ud800), which UTF-8 can hold."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    keys = ("id", "question_id", "custom_id")
    value = next((record[key] for key in keys if key in record), None) if isinstance(record, dict) else None
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _numbered_lines(
    path: Path, max_line_bytes: int
) -> Iterator[tuple[int, int, bytes, tuple[int, str] | None]]:
    """Yield (1-based line number, byte offset, raw bytes, None) for non-blank lines; split on b"\n" only.

    Binary reading keeps U+2028 and other Unicode line separators inside their record, a CRLF
    line end loses its "\r", and a UTF-8 byte-order mark at the start of the file is dropped. A
    line longer than `max_line_bytes` is read on in chunks (memory stays bounded) and yielded as
    its first bytes with (its whole length, its sha256) in place of None, for the caller to reject.
    """
    with path.open("rb") as stream:
        line_number, offset, start = 0, 0, 0
        while raw := stream.readline(max_line_bytes + 2):
            line_number += 1
            start, offset = offset, offset + len(raw)
            if len(raw) == max_line_bytes + 2 and not raw.endswith(b"\n"):  # longer still: read on
                digest, length = hashlib.sha256(raw), len(raw)
                while (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                    digest.update(rest)
                    length += len(rest)
                offset += length - len(raw) + len(rest)
                rest = rest.rstrip(b"\r\n")
                digest.update(rest)
                yield (
                    line_number,
                    start,
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
                yield line_number, start, raw, None
