"""The turn-by-turn replay of one conversation through an engine; no file I/O, no torch.

`regenerate`: every user message gets a generated reply, and the history holds the model's own
replies; an input reply to that user message becomes the turn's `reference`.
`gold_history`: input replies stay in the history (teacher forcing); only user messages without a
reply get a generated one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from runner.conversations import Conversation, Message, fold_system_message
from runner.schema import ReplayMode


@dataclass(frozen=True)
class Reply:
    """What an engine returns for one turn."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (an eos token) or "length" (max_new_tokens reached)
    seconds: float


class Engine(Protocol):
    supports_system_role: bool

    def generate(self, messages: Sequence[Message], seed: int) -> Reply:
        """Reply to `messages` (ending in a user message); `seed` seeds sampling."""
        ...


@dataclass(frozen=True)
class Turn:
    """Metadata of one generated reply; `message_index` points into the output messages."""

    message_index: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish_reason: str
    reference: str | None


@dataclass(frozen=True)
class ReplayedConversation:
    conversation: Conversation
    sample: int
    seed: int
    messages: tuple[Message, ...]
    turns: tuple[Turn, ...]
    system_folded: bool


def trajectory_seed(run_seed: int, conversation_id: str | int, sample: int) -> int:
    """A seed per (conversation, sample): stable across runs, independent of input order."""
    digest = hashlib.sha256(f"{run_seed}\0{conversation_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 2  # headroom: per-turn seeds add the turn index


def replies_to_generate(conversation: Conversation, mode: ReplayMode) -> int:
    """How many replies `replay_conversation` will generate (for progress totals)."""
    return sum(1 for _ in _reply_points(conversation.messages, mode))


def _reply_points(messages: tuple[Message, ...], mode: ReplayMode):
    """Yield (index of a user message to answer, its input reply or None)."""
    for index, message in enumerate(messages):
        if message.role != "user":
            continue
        following = messages[index + 1] if index + 1 < len(messages) else None
        reply = following if following is not None and following.role == "assistant" else None
        if mode is ReplayMode.gold_history and reply is not None:
            continue
        yield index, reply


def replay_conversation(
    conversation: Conversation,
    engine: Engine,
    mode: ReplayMode,
    *,
    run_seed: int,
    sample: int = 0,
    on_turn: Callable[[Turn], None] | None = None,
) -> ReplayedConversation:
    """Walk the messages in order, generating a reply at every reply point."""
    seed = trajectory_seed(run_seed, conversation.id, sample)
    answer_at = dict(_reply_points(conversation.messages, mode))
    fold = not engine.supports_system_role and conversation.messages[0].role == "system"
    history: list[Message] = []
    turns: list[Turn] = []
    for index, message in enumerate(conversation.messages):
        if message.role == "assistant" and mode is ReplayMode.regenerate:
            continue  # replaced by the generated reply; kept as that turn's reference
        history.append(message)
        if index not in answer_at:
            continue
        prompt = fold_system_message(tuple(history)) if fold else tuple(history)
        reply = engine.generate(prompt, seed=seed + len(turns))
        history.append(Message("assistant", reply.text))
        reference = answer_at[index]
        turn = Turn(
            message_index=len(history) - 1,
            prompt_tokens=reply.prompt_tokens,
            new_tokens=reply.new_tokens,
            seconds=reply.seconds,
            finish_reason=reply.finish_reason,
            reference=reference.content if reference is not None else None,
        )
        turns.append(turn)
        if on_turn is not None:
            on_turn(turn)
    return ReplayedConversation(conversation, sample, seed, tuple(history), tuple(turns), fold)
