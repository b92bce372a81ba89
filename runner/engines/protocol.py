"""What the replay and the app exchange with an engine: turns in, replies out; imports no torch.

An engine works in steps. `submit` queues a turn; `step` advances every turn in flight by one unit
of the engine's work (a decoding step for `continuous`, a whole reply for `pipeline`) and returns
the turns that finished. `free_slots` says how many new conversations may join now: a
conversation's next turn always has room, since its engine keeps its place (and KV cache) for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from runner.inputs.conversation import Message

MIN_TEMPERATURE = 1e-4  # a temperature below it decodes greedily


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

    def __post_init__(self) -> None:
        # Below MIN_TEMPERATURE sampling is greedy decoding to float precision, and dividing the
        # logits by a temperature near 0 (OpenAI's range allows 1e-40) overflows into inf/nan.
        if self.do_sample and self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "do_sample", False)

    @classmethod
    def from_config(cls, generation: Any) -> Sampling:
        """The run's generation config (runner.config.schema.GenerationConfig) as per-turn settings."""
        return cls(**{knob: getattr(generation, knob) for knob in SAMPLING_KNOBS})

    def generate_arguments(self) -> dict[str, Any]:
        """These settings as keyword arguments of transformers' generate (through the text-generation
        pipeline, which takes stop strings as `stop_sequence`): the one translation of decoding
        settings. Greedy decoding sets the sampling knobs to None, overriding sampling defaults some
        models ship in generation_config.json (Llama 3: 0.6/0.9), so greedy is plainly greedy."""
        arguments = {knob: getattr(self, knob) for knob in SAMPLING_KNOBS}
        if not self.do_sample:
            arguments.update(temperature=None, top_p=None, top_k=None)
        if self.stop:
            arguments["stop_sequence"] = list(self.stop)
        return arguments


# The Sampling fields a run's generation config sets (`stop` comes from OpenAI Batch lines alone).
SAMPLING_KNOBS = (
    "max_new_tokens",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
)


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared by its module as `CAPABILITIES`: runner.engines.registry picks
    the engine and its batch size from these, or refuses the config."""

    batch_limit: int | None = None  # turns in flight at most; None: as many as engine.batch_size
    speculation: bool = False  # drafts tokens (generation.prompt_lookup_num_tokens / assistant_model)
    sampling_knobs: frozenset[str] = frozenset(SAMPLING_KNOBS)  # the knobs it honours per turn
    remote: bool = False  # the model runs elsewhere: no weights, tokenizer or memory plan here


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
    server_model: str | None = None  # the model a server says answered (engine=openai)


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

    def counters(self) -> EngineCounters:
        """What the engine counted, for summary.json (cache reuse, step timings, speculation)."""
        ...

    def close(self) -> None:
        """Let go of what the engine holds outside this process (a server it started, an engine
        core); the run calls it once at its end, whichever way it ends."""
        ...


@dataclass(frozen=True)
class EngineCounters:
    """What an engine counted, by summary.json section; each section a dataclass of the engine's own
    (None where the engine has nothing to say)."""

    cache: Any = None  # KV-cache reuse between turns and conversations
    steps: Any = None  # step counts and timings
    speculative: Any = None  # drafted and accepted tokens
    requests: Any = None  # requests sent to a server, retried and failed by cause
    server: Any = None  # where those requests went, and what answered them
