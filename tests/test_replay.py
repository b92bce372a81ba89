"""Replay semantics, driven by a scripted engine that records every prompt it is given."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from runner.conversations import Conversation, Message
from runner.replay import Reply, replay_conversation, replies_to_generate, trajectory_seed
from runner.schema import ReplayMode


class ScriptedEngine:
    """Answers "reply N" and keeps (prompt, seed) of each call."""

    def __init__(self, supports_system_role: bool = True):
        self.supports_system_role = supports_system_role
        self.calls: list[tuple[tuple[Message, ...], int]] = []

    def generate(self, messages, seed):
        self.calls.append((tuple(messages), seed))
        return Reply(
            f"reply {len(self.calls)}",
            prompt_tokens=10 * len(messages),
            new_tokens=3,
            finish_reason="stop",
            seconds=0.5,
        )


def conversation(*turns: tuple[str, str], conversation_id="c1") -> Conversation:
    messages = tuple(Message(role, content) for role, content in turns)
    return Conversation(conversation_id, messages, MappingProxyType({}), Path("in.jsonl"), 1)


S, U, A = "system", "user", "assistant"
WITH_REPLIES = conversation((S, "sys"), (U, "q1"), (A, "gold1"), (U, "q2"), (A, "gold2"))


def test_regenerate_replaces_input_replies_and_keeps_them_as_references():
    engine = ScriptedEngine()
    result = replay_conversation(WITH_REPLIES, engine, ReplayMode.regenerate, run_seed=0)
    assert result.messages == (
        Message(S, "sys"),
        Message(U, "q1"),
        Message(A, "reply 1"),
        Message(U, "q2"),
        Message(A, "reply 2"),
    )
    # The second prompt holds the model's own first reply, not the gold one.
    assert engine.calls[1][0] == result.messages[:4]
    assert [(t.message_index, t.reference) for t in result.turns] == [(2, "gold1"), (4, "gold2")]
    assert [(t.prompt_tokens, t.new_tokens, t.finish_reason) for t in result.turns] == [
        (20, 3, "stop"),
        (40, 3, "stop"),
    ]


def test_gold_history_keeps_input_replies_and_answers_only_open_turns():
    engine = ScriptedEngine()
    chat = conversation((U, "q1"), (A, "gold1"), (U, "q2"), (U, "q3"), (A, "gold3"), (U, "q4"))
    result = replay_conversation(chat, engine, ReplayMode.gold_history, run_seed=0)
    assert [m.content for m in result.messages] == [
        "q1",
        "gold1",
        "q2",
        "reply 1",
        "q3",
        "gold3",
        "q4",
        "reply 2",
    ]
    assert engine.calls[0][0] == tuple(result.messages[:3])
    assert engine.calls[1][0] == tuple(result.messages[:7])
    assert [(t.message_index, t.reference) for t in result.turns] == [(3, None), (7, None)]
    assert replies_to_generate(chat, ReplayMode.gold_history) == 2
    assert replies_to_generate(chat, ReplayMode.regenerate) == 4


def test_consecutive_user_messages_each_get_their_own_reply():
    engine = ScriptedEngine()
    chat = conversation((U, "a"), (U, "b"), (U, "c"))
    result = replay_conversation(chat, engine, ReplayMode.regenerate, run_seed=0)
    assert [(m.role, m.content) for m in result.messages] == [
        (U, "a"),
        (A, "reply 1"),
        (U, "b"),
        (A, "reply 2"),
        (U, "c"),
        (A, "reply 3"),
    ]
    assert all(prompt[-1].role == U for prompt, _ in engine.calls)


def test_system_message_is_folded_for_templates_without_a_system_role():
    engine = ScriptedEngine(supports_system_role=False)
    result = replay_conversation(WITH_REPLIES, engine, ReplayMode.regenerate, run_seed=0)
    assert engine.calls[0][0] == (Message(U, "sys\n\nq1"),)
    assert engine.calls[1][0] == (Message(U, "sys\n\nq1"), Message(A, "reply 1"), Message(U, "q2"))
    # The output keeps the conversation as given; the fold is recorded, not written into it.
    assert result.messages[0] == Message(S, "sys") and result.system_folded


def test_seeds_are_per_conversation_sample_and_turn():
    engine = ScriptedEngine()
    result = replay_conversation(WITH_REPLIES, engine, ReplayMode.regenerate, run_seed=5, sample=1)
    assert result.seed == trajectory_seed(5, "c1", 1)
    assert [seed for _, seed in engine.calls] == [result.seed, result.seed + 1]
    seeds = {trajectory_seed(run, cid, sample) for run in (0, 1) for cid in ("c1", "c2") for sample in (0, 1)}
    assert len(seeds) == 8
    assert trajectory_seed(0, "c1", 0) == trajectory_seed(0, "c1", 0)


def test_progress_callback_sees_every_turn():
    seen = []
    replay_conversation(
        WITH_REPLIES, ScriptedEngine(), ReplayMode.regenerate, run_seed=0, on_turn=seen.append
    )
    assert [turn.message_index for turn in seen] == [2, 4]


@pytest.mark.parametrize("mode", list(ReplayMode))
def test_nothing_to_generate_leaves_the_conversation_unchanged(mode):
    chat = conversation((U, "q"), (A, "gold"))
    engine = ScriptedEngine()
    result = replay_conversation(chat, engine, mode, run_seed=0)
    if mode is ReplayMode.gold_history:
        assert result.messages == chat.messages and not engine.calls and result.turns == ()
    else:
        assert result.messages == (Message(U, "q"), Message(A, "reply 1"))
