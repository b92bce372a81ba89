"""Reading and validating conversation JSONL: what is accepted, and each rejection's message."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import chat

from runner.config.schema import InputFormat
from runner.errors import InputError
from runner.inputs.conversation import Message, fold_system_message
from runner.inputs.reader import load_conversations, read_conversations, resolve_input_files

GOOD = chat("a", ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"))


def test_reads_messages_ids_and_extra_keys(write_jsonl):
    path = write_jsonl([GOOD, chat(7, ("user", "Only a question"), category="qa", score=[1, 2])])
    first, second = load_conversations([path])
    assert first.id == "a" and second.id == 7
    assert first.messages == (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello!"),
        Message("user", "Bye"),
    )
    assert dict(second.extra) == {"category": "qa", "score": [1, 2]}
    assert (first.source, first.line, second.line) == (path, 1, 2)


def test_bom_crlf_blank_lines_and_unicode_separators(tmp_path):
    record = json.dumps(chat("u", ("user", "one\u2028two\u2029three")), ensure_ascii=False)
    path = tmp_path / "dirty.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + record.encode() + b"\r\n\r\n   \n" + json.dumps(GOOD).encode() + b"\r\n"
    )
    first, second = load_conversations([path])
    assert first.messages[0].content == "one\u2028two\u2029three"
    assert (first.line, second.line) == (1, 4)


def test_sharegpt_turns_and_text_parts_become_messages(write_jsonl):
    path = write_jsonl(
        [
            {
                "id": "s",
                "conversations": [
                    {"from": "system", "value": "Be kind."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                    {"from": "human", "value": "Bye"},
                ],
            },
            {
                "question_id": 81,
                "category": "writing",
                "turns": ["Write a poem.", "Shorter."],
                "reference": ["x"],
            },
            {
                "id": "p",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}],
                    }
                ],
            },
        ]
    )
    sharegpt, mt_bench, parts = load_conversations([path])
    assert [(m.role, m.content) for m in sharegpt.messages] == [
        ("system", "Be kind."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Bye"),
    ]
    assert mt_bench.id == 81
    assert mt_bench.messages == (Message("user", "Write a poem."), Message("user", "Shorter."))
    assert dict(mt_bench.extra) == {"question_id": 81, "category": "writing", "reference": ["x"]}
    assert parts.messages == (Message("user", "Hello, world"),)


def test_forced_format_reads_only_that_key(write_jsonl):
    path = write_jsonl([{"id": 1, "turns": ["q"], "messages": "kept as an extra key"}])
    [conversation] = load_conversations([path], InputFormat.turns)
    assert conversation.messages == (Message("user", "q"),)
    assert conversation.extra["messages"] == "kept as an extra key"
    with pytest.raises(InputError, match="missing 'conversations'"):
        load_conversations([path], InputFormat.sharegpt)


def test_conversation_without_id_gets_its_file_and_line(write_jsonl):
    path = write_jsonl([{"messages": [{"role": "user", "content": "hi"}]}], name="noid.jsonl")
    [conversation] = load_conversations([path])
    assert conversation.id == "noid.jsonl:1"


BAD_LINES = [
    (b'{"id": 1, "messages": [', "invalid JSON: Expecting value (column 24)"),
    (b"[1, 2]", "expected a JSON object, got a list"),
    (b'{"id": 1}', "expected exactly one of 'messages' or 'conversations' or 'turns' (found none)"),
    (b'{"id": 1, "messages": [], "turns": ["q"]}', "(found 'messages' and 'turns')"),
    (b'{"id": 1, "messages": []}', "'messages' must be a non-empty list"),
    (b'{"id": 1, "turns": ["q", ""]}', "turns[1]: 'content' is empty"),
    (
        b'{"id": 1, "conversations": [{"from": "bot", "value": "q"}]}',
        "unknown from 'bot' (allowed: system,",
    ),
    (
        b'{"id": 1, "conversations": [{"from": "human", "value": 3}]}',
        "'value' must be a string, got a number",
    ),
    (
        b'{"id": 1, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
        "content part 0 is 'image_url'; only {'type': 'text', 'text': ...}",
    ),
    (
        json.dumps(chat(1, ("robot", "beep"))).encode(),
        "unknown role 'robot' (allowed: system, user, assistant)",
    ),
    (b'{"id": 1, "messages": [{"role": "user", "content": null}]}', "'content' must be a string, got null"),
    (b'{"id": 1, "messages": [{"role": "user", "content": 5}]}', "'content' must be a string, got a number"),
    (json.dumps(chat(1, ("user", "  "))).encode(), "messages[0]: 'content' is empty"),
    (json.dumps(chat(1, ("system", "s"))).encode(), "no user message"),
    (json.dumps(chat(1, ("user", "q"), ("system", "s"))).encode(), "a system message may only come first"),
    (json.dumps(chat(1, ("assistant", "hi"), ("user", "q"))).encode(), "must answer a user message"),
    (
        json.dumps(chat(1, ("user", "q"), ("assistant", "a"), ("assistant", "b"))).encode(),
        "follows assistant",
    ),
    (
        b'{"id": 1, "messages": [{"role": "user", "content": "q", "name": "x"}]}',
        "unsupported key(s) ['name']",
    ),
    (b'{"id": true, "messages": [{"role": "user", "content": "q"}]}', "'id' must be a string or an integer"),
    (b'{"id": 1, "id": 2, "messages": [{"role": "user", "content": "q"}]}', "duplicate JSON key(s) ['id']"),
    (b'{"id": 1, "w": NaN, "messages": [{"role": "user", "content": "q"}]}', "NaN is not valid JSON"),
    (b'{"id": 1, "messages": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8 at byte 55"),
    (
        b'{"id": 1, "messages": [{"role": "user", "content": "x\\ud800"}]}',
        "messages[0].content: holds a lone surrogate at character 1",
    ),
    (b'{"id": "\\ud800", "messages": [{"role": "user", "content": "q"}]}', "id: holds a lone surrogate"),
    (b'{"id": 1, "tag\\udfff": 1, "messages": [{"role": "user", "content": "q"}]}', "key 'tag\\udfff'"),
    (b'{"id": 1, "meta": {"a": ["\\ud800"]}, "messages": []}', "meta.a[0]: holds a lone surrogate"),
    (b'{"id": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "messages": []}', "nested deeper than 100"),
    (b'{"id": 1, "x": ' + b"[" * 101 + b"]" * 101 + b', "messages": []}', ": x[0][0]"),
    (json.dumps({**GOOD, "replay": {}}).encode(), "key 'replay' is reserved"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[reason for _, reason in BAD_LINES])
def test_each_bad_line_is_reported_with_file_line_and_reason(write_jsonl, line, reason):
    path = write_jsonl([GOOD | {"id": "ok"}, line])
    with pytest.raises(InputError) as caught:
        load_conversations([path])
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}:2: ")
    assert reason in problem


def test_every_problem_in_every_file_is_listed_at_once(write_jsonl):
    first = write_jsonl([b"not json", GOOD], name="one.jsonl")
    second = write_jsonl([chat("a", ("user", "dup id")), b"{}", chat(1, ("user", "x"))], name="two.jsonl")
    third = write_jsonl([chat("1", ("user", "collides with 1"))], name="three.jsonl")
    with pytest.raises(InputError) as caught:
        load_conversations([first, second, third])
    assert caught.value.problems == [
        f"{first}:1: invalid JSON: Expecting value (column 1)",
        f"{second}:1: duplicate id 'a' (first at {first}:2)",
        f"{second}:2: expected exactly one of 'messages' or 'conversations' or 'turns' (found none); "
        "input.format=... forces one",
        f"{third}:1: duplicate id '1' (first at {second}:3)",
    ]
    assert "3 problem(s)" not in str(caught.value) and "4 problem(s) in the input" in str(caught.value)


def test_read_conversations_keeps_the_good_and_rejects_the_bad_with_codes(write_jsonl):
    path = write_jsonl(
        [GOOD, b"{broken", chat("a", ("user", "again")), chat(2, ("robot", "x")), chat(3, ("user", "ok"))]
    )
    conversations, rejected = read_conversations([path])
    assert [c.id for c in conversations] == ["a", 3]
    assert [(r.line, r.id, r.code) for r in rejected] == [
        (2, None, "invalid_json"),
        (3, "a", "duplicate_id"),
        (4, 2, "unknown_role"),
    ]
    assert rejected[0].as_dict() == {
        "file": str(path),
        "line": 2,
        "id": None,
        "code": "invalid_json",
        "message": "invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "raw": "{broken",
        "raw_bytes": 7,
        "raw_sha256": hashlib.sha256(b"{broken").hexdigest(),
    }


def test_a_huge_line_is_rejected_without_being_parsed(write_jsonl):
    huge = json.dumps(chat("big", ("user", "x" * 5000))).encode()
    path = write_jsonl([GOOD, huge, chat("after", ("user", "still read"))])
    conversations, [rejected] = read_conversations([path], max_line_bytes=1000)
    assert [c.id for c in conversations] == ["a", "after"]
    assert (rejected.line, rejected.code, len(rejected.raw)) == (2, "line_too_long", 1001)
    assert (rejected.raw_bytes, rejected.raw_sha256) == (len(huge), hashlib.sha256(huge).hexdigest())
    assert f"line of {len(huge)} bytes, longer than input.max_line_bytes=1000" in rejected.message


def test_rejects_keep_a_bounded_prefix_of_each_line(write_jsonl):
    long_bad = b'{"id": 1, "messages": "' + b"x" * 20_000 + b'"}'
    path = write_jsonl([GOOD, long_bad, long_bad.replace(b"x", b"y")])
    _, rejected = read_conversations([path], max_line_bytes=10_000)
    assert [r.code for r in rejected] == ["line_too_long", "line_too_long"]
    assert all(len(r.raw) == 4096 and r.raw_bytes == len(long_bad) for r in rejected)
    assert rejected[0].raw_sha256 != rejected[1].raw_sha256
    [invalid] = read_conversations([path])[1][:1]
    assert (invalid.code, len(invalid.as_dict()["raw"]), invalid.raw_bytes) == (
        "no_messages",
        4096,
        len(long_bad),
    )


def test_input_path_file_directory_and_glob(tmp_path):
    (tmp_path / "b.jsonl").write_text("")
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")
    assert resolve_input_files(str(tmp_path)) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    assert resolve_input_files(str(tmp_path / "b.jsonl")) == [tmp_path / "b.jsonl"]
    assert resolve_input_files(str(tmp_path / "*.jsonl")) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with pytest.raises(InputError, match="no such file or directory"):
        resolve_input_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="matches no files"):
        resolve_input_files(str(tmp_path / "*.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"has no \*\.jsonl files"):
        resolve_input_files(str(tmp_path / "empty"))


def test_fifos_devices_and_directories_named_like_input_are_refused_by_name(tmp_path):
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.jsonl").write_text('{"id": 1, "turns": ["hi"]}\n')
    os.mkfifo(folder / "fifo.jsonl")  # reading it would block until killed
    (folder / "zero.jsonl").symlink_to("/dev/zero")  # reading it would never end
    (folder / "sub.jsonl").mkdir()
    with pytest.raises(InputError) as caught:
        resolve_input_files(str(folder))
    assert caught.value.problems == [
        f"{folder / 'fifo.jsonl'}: not a regular file (a FIFO): input files must be regular files",
        f"{folder / 'sub.jsonl'}: not a regular file (a directory): input files must be regular files",
        f"{folder / 'zero.jsonl'}: not a regular file (a device, through a link to /dev/zero): input files "
        "must be regular files",
    ]
    for named in (folder / "fifo.jsonl", Path("/dev/zero")):
        with pytest.raises(InputError, match="not a regular file"):
            resolve_input_files(str(named))
    with pytest.raises(InputError, match=r"fifo\.jsonl: not a regular file"):
        resolve_input_files(str(folder / "*.jsonl"))  # a glob skips the directory, not the FIFO
    assert resolve_input_files(str(folder / "ok.jsonl")) == [folder / "ok.jsonl"]


def test_a_rejected_id_with_a_lone_surrogate_is_written_escaped(write_jsonl, tmp_path):
    from runner.rundir.writer import write_jsonl_atomically

    path = write_jsonl([GOOD, b'{"id": "\\ud800", "messages": []}', b'{"custom_id": "r\\udfff", "body": 3}'])
    _, rejected = read_conversations([path])
    assert [(r.id, r.code) for r in rejected] == [
        ("\\ud800", "lone_surrogate"),
        ("r\\udfff", "lone_surrogate"),
    ]
    write_jsonl_atomically(tmp_path / "rejected.jsonl", [r.as_dict() for r in rejected])
    assert [json.loads(line)["id"] for line in (tmp_path / "rejected.jsonl").read_text().splitlines()] == [
        "\\ud800",
        "r\\udfff",
    ]


def test_input_path_list_and_a_file_named_twice(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("")
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert resolve_input_files([b, a]) == [Path(b), Path(a)]
    with pytest.raises(InputError) as caught:
        resolve_input_files([a, str(tmp_path / "*.jsonl")])
    assert caught.value.problems == [
        f"{a}: named twice in input.path (by {a!r} and {str(tmp_path / '*.jsonl')!r})"
    ]


def test_empty_file_gives_no_conversations(write_jsonl):
    path = write_jsonl([])
    path.write_bytes(b"")
    assert load_conversations([path]) == []


def test_fold_system_message_into_the_first_user_turn():
    messages = (Message("system", "Be a pirate."), Message("user", "Hi"), Message("assistant", "Arr"))
    assert fold_system_message(messages) == (
        Message("user", "Be a pirate.\n\nHi"),
        Message("assistant", "Arr"),
    )
    assert fold_system_message(messages[1:]) == messages[1:]
