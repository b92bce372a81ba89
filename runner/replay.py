"""Turn-by-turn replay of conversations through an engine, many at a time; no file I/O, no torch.

`regenerate`: every user message gets a generated reply, and the history holds the model's own
replies; an input reply to that user message becomes the turn's `reference`.
`gold_history`: input replies stay in the history (teacher forcing); only user messages without a
reply get a generated one.

Conversations are independent and the turns of one are sequential, so `replay_all` keeps as many
conversations in flight as the engine has room for and submits each one's next turn the moment its
previous reply is in; the engine decides what runs in each step. Results come out in input order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Container, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from runner.config.schema import ReplayMode
from runner.engines.protocol import Engine, Reply, Request, Sampling, TurnError
from runner.inputs.conversation import Conversation, Message, fold_system_message


@dataclass(frozen=True)
class Turn:
    """Metadata of one generated reply; `message_index` points into the output messages."""

    message_index: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float
    finish_reason: str
    reference: str | None
    control_tokens_in_content: int = 0
    server_model: str | None = None  # the model a server says answered (engine=openai)


@dataclass(frozen=True)
class ReplayedConversation:
    conversation: Conversation
    sample: int
    seed: int
    messages: tuple[Message, ...]
    turns: tuple[Turn, ...]
    system_folded: bool
    error: TurnError | None = None

    def as_record(self, chat_template_sha256: str) -> dict[str, Any]:
        """One output line: id, the input's other keys, the full messages, and replay metadata."""
        conversation = self.conversation
        return {
            "id": conversation.id,
            **conversation.extra,
            "messages": [message.as_dict() for message in self.messages],
            "replay": {
                "line": conversation.line,
                "sample": self.sample,
                "seed": self.seed,
                "system_folded": self.system_folded,
                "chat_template_sha256": chat_template_sha256,
                "error": None
                if self.error is None
                else {"code": self.error.code, "message": self.error.message, **self.error.details},
                "turns": [
                    {
                        "message_index": turn.message_index,
                        "prompt_tokens": turn.prompt_tokens,
                        "new_tokens": turn.new_tokens,
                        "seconds": round(turn.seconds, 4),
                        "first_token_seconds": round(turn.first_token_seconds, 4),
                        "finish_reason": turn.finish_reason,
                        "reference": turn.reference,
                        "control_tokens_in_content": turn.control_tokens_in_content,
                        **({"server_model": turn.server_model} if turn.server_model else {}),
                    }
                    for turn in self.turns
                ],
            },
        }


def trajectory_seed(run_seed: int, conversation_id: str | int, sample: int) -> int:
    """A seed per (conversation, sample): stable across runs, independent of input order."""
    digest = hashlib.sha256(f"{run_seed}\0{conversation_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 2  # headroom: per-turn seeds add the turn index


def replies_to_generate(conversation: Conversation, mode: ReplayMode) -> int:
    """How many replies the replay will generate (for progress totals)."""
    return len(_reply_points(conversation.messages, mode))


def _reply_points(messages: tuple[Message, ...], mode: ReplayMode) -> dict[int, Message | None]:
    """Index of each user message to answer -> its input reply (or None)."""
    points = {}
    for index, message in enumerate(messages):
        if message.role != "user":
            continue
        following = messages[index + 1] if index + 1 < len(messages) else None
        reply = following if following is not None and following.role == "assistant" else None
        if mode is ReplayMode.gold_history and reply is not None:
            continue
        points[index] = reply
    return points


class ConversationReplay:
    """One (conversation, sample) replayed step by step: `pending` is the turn to generate next."""

    def __init__(
        self,
        conversation: Conversation,
        mode: ReplayMode,
        *,
        run_seed: int,
        sample: int,
        fold: bool,
        stream: int = 0,
        sampling: Sampling | None = None,
    ):
        """`sampling`: the run's decoding settings, which a conversation's own settings amend."""
        self.conversation = conversation
        self.stream = stream
        self.sample = sample
        settings = dict(conversation.settings)
        self.seed = trajectory_seed(settings.pop("seed", run_seed), conversation.id, sample)
        self.sampling = dataclasses.replace(sampling, **settings) if settings and sampling else None
        self.fold = fold and conversation.messages[0].role == "system"
        self._keep_input_replies = mode is ReplayMode.gold_history
        self._answer_at = _reply_points(conversation.messages, mode)
        self._next = 0  # next input message to take into the history
        self.history: list[Message] = []
        self.turns: list[Turn] = []
        self.error: TurnError | None = None
        self.pending: Request | None = None
        self._advance()

    @property
    def done(self) -> bool:
        return self.pending is None

    def _advance(self) -> None:
        """Take input messages into the history up to the next user message to answer."""
        messages = self.conversation.messages
        while self._next < len(messages):
            index, message = self._next, messages[self._next]
            self._next += 1
            if message.role == "assistant" and not self._keep_input_replies:
                continue  # replaced by the generated reply; kept as that turn's reference
            self.history.append(message)
            if index in self._answer_at:
                prompt = tuple(self.history)
                self.pending = Request(
                    fold_system_message(prompt) if self.fold else prompt,
                    seed=self.seed + len(self.turns),
                    stream=self.stream,
                    continues=index < max(self._answer_at),
                    sampling=self.sampling,
                )
                return
        self.pending = None

    def record(self, outcome: Reply | TurnError) -> Turn | None:
        """Take the engine's answer to `pending`; returns the new turn (None after an error)."""
        if isinstance(outcome, TurnError):
            self._keep_the_rest(outcome)
            return None
        reference = self._answer_at[self._next - 1]
        self.history.append(Message("assistant", outcome.text))
        turn = Turn(
            message_index=len(self.history) - 1,
            prompt_tokens=outcome.prompt_tokens,
            new_tokens=outcome.new_tokens,
            seconds=outcome.seconds,
            first_token_seconds=outcome.first_token_seconds,
            finish_reason=outcome.finish_reason,
            reference=reference.content if reference is not None else None,
            control_tokens_in_content=outcome.control_tokens_in_content,
            server_model=outcome.server_model,
        )
        self.turns.append(turn)
        self._advance()
        return turn

    def _keep_the_rest(self, error: TurnError) -> None:
        """End on an error with the whole conversation kept: the input messages after the failed
        turn follow it unanswered (as the history takes them), and the error says where."""
        unanswered = len(self.history) - 1  # the user message the engine could not answer
        rest = self.conversation.messages[self._next :]
        self.history += [m for m in rest if m.role != "assistant" or self._keep_input_replies]
        self.error = dataclasses.replace(error, details={**error.details, "unanswered_from": unanswered})
        self.pending = None

    def result(self) -> ReplayedConversation:
        return ReplayedConversation(
            self.conversation,
            self.sample,
            self.seed,
            tuple(self.history),
            tuple(self.turns),
            self.fold,
            self.error,
        )


REPLY_PLACEHOLDER = "..."  # a generated reply in a conversation's final shape


def final_shape(conversation: Conversation, mode: ReplayMode, *, fold: bool) -> tuple[Message, ...]:
    """The messages a replay ends with, replies as placeholders: what to check a chat template on."""
    replay = ConversationReplay(conversation, mode, run_seed=0, sample=0, fold=fold)
    while not replay.done:
        replay.record(Reply(REPLY_PLACEHOLDER, 0, 0, "stop", 0.0, 0.0))
    history = tuple(replay.history)
    return fold_system_message(history) if replay.fold else history


def replay_all(
    conversations: Iterable[Conversation],
    engine: Engine,
    mode: ReplayMode,
    *,
    run_seed: int,
    samples: int = 1,
    done: Container[tuple[str, int]] = frozenset(),
    on_turn: Callable[[Turn | None], None] | None = None,
    sampling: Sampling | None = None,
) -> Iterator[ReplayedConversation]:
    """Replay every (conversation, sample) through the engine's steps; yield results in input order.

    `done` holds the (str(id), sample) pairs a resumed run already has: they are skipped.
    `sampling` is the run's decoding settings, which a conversation's own settings amend.

    A new conversation starts when the engine has a free slot, oldest first, and while fewer than
    `4 * engine.batch_size` are in flight or waiting to be yielded behind an older one, so memory
    grows with the batch size, not with the input.
    """
    jobs = ((c, s) for c in conversations for s in range(samples) if (str(c.id), s) not in done)
    active: dict[int, ConversationReplay] = {}
    finished: dict[int, ReplayedConversation] = {}
    emitted = 0

    def start(stream: int, conversation: Conversation, sample: int) -> None:
        replay = ConversationReplay(
            conversation,
            mode,
            run_seed=run_seed,
            sample=sample,
            fold=not engine.supports_system_role,
            stream=stream,
            sampling=sampling,
        )
        if replay.done:
            finished[stream] = replay.result()
        else:
            active[stream] = replay
            engine.submit(replay.pending)

    for stream, (conversation, sample) in enumerate(jobs):
        while engine.free_slots() == 0 or len(active) + len(finished) >= 4 * max(engine.batch_size, 1):
            emitted = yield from _advance(engine, active, finished, emitted, on_turn)
        start(stream, conversation, sample)
    while active or finished:
        emitted = yield from _advance(engine, active, finished, emitted, on_turn)


def _advance(
    engine: Engine,
    active: dict[int, ConversationReplay],
    finished: dict[int, ReplayedConversation],
    emitted: int,
    on_turn: Callable[[Turn | None], None] | None,
) -> Generator[ReplayedConversation, None, int]:
    """One engine step: record the finished turns, submit their conversations' next turns, and
    yield the results now next in input order; returns how many have been yielded in all."""
    if active:
        for request, outcome in engine.step():
            replay = active[request.stream]
            turn = replay.record(outcome)
            if on_turn is not None:
                on_turn(turn)
            if replay.done:
                finished[request.stream] = active.pop(request.stream).result()
            else:
                engine.submit(replay.pending)
    while emitted in finished:
        yield finished.pop(emitted)
        emitted += 1
    return emitted


def replay_conversation(
    conversation: Conversation, engine: Engine, mode: ReplayMode, *, run_seed: int, sample: int = 0
) -> ReplayedConversation:
    """Replay one conversation alone, turn after turn."""
    replay = ConversationReplay(
        conversation, mode, run_seed=run_seed, sample=sample, fold=not engine.supports_system_role
    )
    while not replay.done:
        engine.submit(replay.pending)
        outcomes = []
        while not outcomes:
            outcomes = engine.step()
        [(_, outcome)] = outcomes
        replay.record(outcome)
    return replay.result()
