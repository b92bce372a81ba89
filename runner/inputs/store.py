"""A shard's conversations held as where they are, not as parsed objects: a million of them take
tens of MB. Each is read and parsed again when the replay reaches it."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from pathlib import Path

from runner.config.schema import InputFormat
from runner.errors import InputError
from runner.inputs.conversation import Conversation
from runner.inputs.formats import parse_conversation
from runner.inputs.reader import MAX_LINE_BYTES, read_line
from runner.inputs.rejects import LineError


class StoredConversations:
    """The accepted conversations of a pass over the input, in input order: per conversation its
    file, line, byte offset, place among all lines, and id (resume and progress need the ids)."""

    def __init__(self, files: list[Path], form: InputFormat, max_line_bytes: int = MAX_LINE_BYTES):
        self.files, self._form, self._max_line_bytes = files, form, max_line_bytes
        self._number = {path: number for number, path in enumerate(files)}
        self._file, self._line = array("I"), array("Q")
        self._offset, self._ordinal = array("Q"), array("Q")
        self.ids: list[str] = []  # str(id), as keys of records are
        self._dropped: set[int] = set()  # positions refused after the pass (the chat template)

    def add(self, conversation: Conversation) -> int:
        """Hold a conversation of the pass; its position."""
        self._file.append(self._number[conversation.source])
        self._line.append(conversation.line)
        self._offset.append(conversation.offset)
        self._ordinal.append(conversation.ordinal)
        self.ids.append(str(conversation.id))
        return len(self._file) - 1

    def drop(self, position: int) -> None:
        """Leave the conversation at `position` out of the replay (refused after the pass)."""
        self._dropped.add(position)

    def __len__(self) -> int:
        return len(self._file) - len(self._dropped)

    def positions(self) -> Iterator[int]:
        return (position for position in range(len(self._file)) if position not in self._dropped)

    def ordinal(self, position: int) -> int:
        return self._ordinal[position]

    def __getitem__(self, position: int) -> Conversation:
        """The conversation at `position` (of `positions()`), read and parsed again."""
        path, line = self.files[self._file[position]], self._line[position]
        offset, ordinal = self._offset[position], self._ordinal[position]
        try:
            raw = read_line(path, offset, self._max_line_bytes)
            conversation = parse_conversation(raw, path, line, self._form, offset=offset, ordinal=ordinal)
        except LineError as error:
            raise InputError([f"{path}:{line}: changed since the run read it ({error})"]) from None
        except OSError as error:
            raise InputError([f"{path}: cannot read it again ({error.strerror or error})"]) from None
        if str(conversation.id) != self.ids[position]:
            raise InputError([f"{path}:{line}: changed since the run read it (id {conversation.id!r})"])
        return conversation

    def __iter__(self) -> Iterator[Conversation]:
        return (self[position] for position in self.positions())
