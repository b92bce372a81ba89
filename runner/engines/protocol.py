"""What the replay and the app exchange with an engine: turns in, replies out; imports no torch.

An engine works in steps. `submit` queues a turn; `step` advances every turn in flight by one unit
of the engine's work (a decoding step for `continuous`, a whole reply for `pipeline`) and returns
the turns that finished. `free_slots` says how many new conversations may join now: a
conversation's next turn always has room, since its engine keeps its place (and KV cache) for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from runner.inputs.conversation import Message


@dataclass(frozen=True)
class Sampling:
    """How one turn's reply is decoded: every knob applies per row, so rows of one batch may differ."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end the reply (not kept in its text), as OpenAI's `stop`

    @classmethod
    def from_config(cls, generation: Any) -> Sampling:
        """The run's generation config (runner.config.schema.GenerationConfig) as per-turn settings."""
        return cls(
            max_new_tokens=generation.max_new_tokens,
            min_new_tokens=generation.min_new_tokens,
            do_sample=generation.do_sample,
            temperature=generation.temperature,
            top_p=generation.top_p,
            top_k=generation.top_k,
            repetition_penalty=generation.repetition_penalty,
        )


@dataclass(frozen=True)
class Request:
    """One turn to generate: the prompt messages (ending in a user message) and its seed.

    `stream` names the (conversation, sample) it belongs to, and `continues` says whether that
    conversation has more turns after this one: an engine may keep state for its next turn.
    `sampling` overrides the engine's default decoding settings for this turn.
    """

    messages: tuple[Message, ...]
    seed: int
    stream: int = 0
    continues: bool = False
    sampling: Sampling | None = None


@dataclass(frozen=True)
class Reply:
    """What an engine returns for one turn."""

    text: str
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (an eos token) or "length" (max_new_tokens reached)
    seconds: float  # from the turn joining the engine's work to its last token
    first_token_seconds: float  # from joining to its first new token
    control_tokens_in_content: int = 0  # special-token strings inside the prompt's message texts


@dataclass(frozen=True)
class TurnError:
    """A turn that cannot be generated; the conversation stops there and the run goes on."""

    code: str  # stable: "context_overflow", "out_of_memory"
    message: str
    details: dict[str, Any]


Outcome = tuple[Request, Reply | TurnError]


class Engine(Protocol):
    """Everything the app and the replay read from an engine."""

    supports_system_role: bool  # False: the replay folds system messages into the first user turn
    chat_template_sha256: str  # recorded with every output record
    batch_size: int  # turns in flight at most (an out-of-memory may lower it)

    def free_slots(self) -> int:
        """How many turns of new conversations `submit` may take now."""
        ...

    def submit(self, request: Request) -> None:
        """Queue a turn; a conversation's next turn is submitted as soon as its previous reply is in."""
        ...

    def step(self) -> list[Outcome]:
        """Advance the turns in flight; return those that finished (a reply or an error)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The loaded model for summary.json: weights_bytes, kv_bytes_per_token, dtype, device_map, device."""
        ...

    def counters(self) -> dict[str, Any]:
        """What the engine counted, for summary.json (cache reuse, step timings, speculation)."""
        ...


class WholeTurnEngine:
    """Base of engines that produce a whole reply per call: subclasses define `generate`."""

    batch_size: int

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._queued: deque[Request] = deque()

    def free_slots(self) -> int:
        return max(self.batch_size - len(self._queued), 0)

    def submit(self, request: Request) -> None:
        self._queued.append(request)

    def step(self) -> list[Outcome]:
        """Generate the oldest queued turns, up to `batch_size` of them."""
        requests = [self._queued.popleft() for _ in range(min(self.batch_size, len(self._queued)))]
        return list(zip(requests, self.generate(requests), strict=True)) if requests else []

    def generate(self, requests: Sequence[Request]) -> list[Reply | TurnError]:
        raise NotImplementedError
