"""Replay semantics, driven by a scripted engine that records every prompt it is given."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from runner.config.schema import ReplayMode
from runner.engines.whole_turn import WholeTurnEngine
from runner.inputs.conversation import Conversation, Message
from runner.replay import (
    Reply,
    Request,
    TurnError,
    replay_all,
    replay_conversation,
    replies_to_generate,
    trajectory_seed,
)


class ScriptedEngine(WholeTurnEngine):
    """Answers "reply N" (or a TurnError for prompts containing "OVERFLOW"); keeps every call."""

    def __init__(self, supports_system_role: bool = True, batch_size: int = 1):
        super().__init__(batch_size)
        self.supports_system_role = supports_system_role
        self.calls: list[tuple[tuple[Message, ...], int]] = []
        self.batches: list[list[Request]] = []

    def generate(self, requests):
        assert 0 < len(requests) <= self.batch_size
        self.batches.append(list(requests))
        outcomes = []
        for request in requests:
            self.calls.append((request.messages, request.seed))
            if "OVERFLOW" in request.messages[-1].content:
                outcomes.append(TurnError("context_overflow", "too long", {"prompt_tokens": 9999}))
                continue
            n, tokens = len(self.calls), 10 * len(request.messages)
            outcomes.append(Reply(f"reply {n}", tokens, 3, "stop", seconds=0.5, first_token_seconds=0.1))
        return outcomes


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


def test_replay_all_batches_turns_across_conversations_and_keeps_input_order():
    chats = [
        conversation(*[(U, f"c{i} q{t}") for t in range(1 + i % 3)], conversation_id=f"c{i}")
        for i in range(10)
    ]
    engine = ScriptedEngine(batch_size=3)
    seen = []
    results = list(replay_all(chats, engine, ReplayMode.regenerate, run_seed=0, on_turn=seen.append))
    assert [r.conversation.id for r in results] == [f"c{i}" for i in range(10)]
    expected_turns = sum(1 + i % 3 for i in range(10))
    assert len(engine.calls) == len(seen) == expected_turns  # every turn generated exactly once
    assert max(len(batch) for batch in engine.batches) == 3 and len(engine.batches) < expected_turns
    for result in results:  # each prompt held that conversation's own earlier replies, in order
        assert [m.role for m in result.messages] == [U, A] * len(result.turns)
        for turn in result.turns:
            prompt = next(p for p, _ in engine.calls if p == result.messages[: turn.message_index])
            assert prompt[-1] == result.messages[turn.message_index - 1]
    for batch in engine.batches:  # never two turns of one conversation in one batch
        owners = [request.messages[0].content.split()[0] for request in batch]
        assert len(owners) == len(set(owners))


def test_replay_all_bounds_conversations_in_flight():
    chats = [conversation((U, f"{i} a"), (U, f"{i} b"), conversation_id=i) for i in range(50)]
    engine = ScriptedEngine(batch_size=2)
    results = replay_all(chats, engine, ReplayMode.regenerate, run_seed=0)
    assert next(results).conversation.id == 0
    started = {prompt[0].content.split()[0] for prompt, _ in engine.calls}
    assert len(started) <= 4 * engine.batch_size  # memory follows the batch size, not the input
    assert [r.conversation.id for r in results] == list(range(1, 50))


def test_samples_are_separate_trajectories():
    engine = ScriptedEngine(batch_size=4)
    results = list(replay_all([WITH_REPLIES], engine, ReplayMode.regenerate, run_seed=3, samples=3))
    assert [r.sample for r in results] == [0, 1, 2]
    assert len({r.seed for r in results}) == 3


def test_a_turn_error_stops_that_conversation_only():
    failing = conversation((U, "q1"), (U, "OVERFLOW q2"), (U, "q3"), conversation_id="bad")
    engine = ScriptedEngine(batch_size=2)
    bad, good = replay_all([failing, WITH_REPLIES], engine, ReplayMode.regenerate, run_seed=0)
    assert bad.error.code == "context_overflow" and len(bad.turns) == 1
    # The record keeps the whole conversation: the turns after the failed one follow it, unanswered.
    assert [m.content for m in bad.messages] == ["q1", "reply 1", "OVERFLOW q2", "q3"]
    assert bad.error.details == {"prompt_tokens": 9999, "unanswered_from": 2}
    assert good.error is None and len(good.turns) == 2
    gold = replay_conversation(
        conversation((U, "q1"), (A, "g1"), (U, "OVERFLOW q2"), (U, "q3"), (A, "g3")),
        ScriptedEngine(),
        ReplayMode.gold_history,
        run_seed=0,
    )
    assert [m.content for m in gold.messages] == ["q1", "g1", "OVERFLOW q2", "q3", "g3"]


@pytest.mark.parametrize("mode", list(ReplayMode))
def test_nothing_to_generate_leaves_the_conversation_unchanged(mode):
    chat = conversation((U, "q"), (A, "gold"))
    engine = ScriptedEngine()
    result = replay_conversation(chat, engine, mode, run_seed=0)
    if mode is ReplayMode.gold_history:
        assert result.messages == chat.messages and not engine.calls and result.turns == ()
    else:
        assert result.messages == (Message(U, "q"), Message(A, "reply 1"))
