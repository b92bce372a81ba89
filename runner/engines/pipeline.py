"""The pipeline engine: transformers' TextGenerationPipeline in chat mode, one turn per call, the
reference the other engines are measured against. It is also the path of speculative decoding
(prompt lookup or a draft model), which transformers runs one sequence at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TextGenerationPipeline, set_seed

from runner.engines.chat_model import ChatModel, cut_at_stop
from runner.engines.protocol import Capabilities, EngineCounters, Reply, Request, Sampling, TurnError
from runner.engines.whole_turn import WholeTurnEngine

if TYPE_CHECKING:
    from runner.config.schema import RunConfig
    from runner.engines.registry import EngineSetup

log = logging.getLogger(__name__)

CAPABILITIES = Capabilities(batch_limit=1, speculation=True)


class ChatReplayPipeline(TextGenerationPipeline):
    """A TextGenerationPipeline whose records also carry `prompt_tokens` and `new_token_ids`."""

    def postprocess(self, model_outputs: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
        records = super().postprocess(model_outputs, **kwargs)
        prompt_tokens = model_outputs["input_ids"].shape[-1]
        for record, sequence in zip(records, model_outputs["generated_sequence"][0], strict=True):
            record["prompt_tokens"] = prompt_tokens
            record["new_token_ids"] = sequence[prompt_tokens:].tolist()
        return records


class FirstTokenTimer(LogitsProcessor):
    """Notes when generate first asks for logits: the prefill is done and token one is chosen."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


@dataclass(frozen=True)
class SpeculationCounts:
    """summary.json's `speculative` section."""

    method: str  # prompt_lookup | assistant_model
    forward_passes: int
    drafted_tokens: int
    accepted_tokens: int
    new_tokens: int
    acceptance_rate: float  # accepted / drafted
    tokens_per_forward_pass: float


class SpeculationCounter:
    """Counts what speculative decoding did, from the target model's own forward passes.

    Each pass verifies the k tokens drafted since the last one (by prompt lookup or a draft model)
    and yields the accepted ones plus one token of its own, so over a generate call
    accepted = new tokens - passes, and drafted = tokens fed - passes - (prompt tokens - 1).
    """

    def __init__(self, method: str) -> None:
        self.method = method
        self.totals = {"forward_passes": 0, "drafted_tokens": 0, "accepted_tokens": 0, "new_tokens": 0}

    @contextlib.contextmanager
    def measure(self, model: Any, prompt_tokens: int) -> Iterator[Callable[[int], None]]:
        """Count the passes of one batch-1 generate call; call the yielded function with its new tokens."""
        calls = [0, 0]  # passes, tokens fed

        def count(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            calls[0] += 1
            calls[1] += kwargs["input_ids"].shape[1]

        def finish(new_tokens: int) -> None:
            passes, fed = calls
            self.totals["forward_passes"] += passes
            self.totals["drafted_tokens"] += fed - passes - (prompt_tokens - 1)
            self.totals["accepted_tokens"] += new_tokens - passes
            self.totals["new_tokens"] += new_tokens

        handle = model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            yield finish
        finally:
            handle.remove()

    def summary(self) -> SpeculationCounts:
        """Totals, the share of drafted tokens accepted, and tokens per forward pass of the model."""
        totals = self.totals
        return SpeculationCounts(
            method=self.method,
            **totals,
            acceptance_rate=round(totals["accepted_tokens"] / max(totals["drafted_tokens"], 1), 4),
            tokens_per_forward_pass=round(totals["new_tokens"] / max(totals["forward_passes"], 1), 3),
        )


class PipelineEngine(ChatModel, WholeTurnEngine):
    """Batch-1 chat replay through TextGenerationPipeline, the whole history re-sent each turn."""

    def __init__(
        self, pipe: ChatReplayPipeline, sampling: Sampling, speculation: dict[str, Any] | None = None
    ):
        """`speculation`: generate's drafting argument, `prompt_lookup_num_tokens` or `assistant_model`."""
        ChatModel.__init__(self, pipe.model, pipe.tokenizer)
        WholeTurnEngine.__init__(self, batch_size=1)
        self.pipe, self.sampling, self.drafting = pipe, sampling, speculation or {}
        method = "prompt_lookup" if "prompt_lookup_num_tokens" in self.drafting else "assistant_model"
        self.speculation = SpeculationCounter(method) if self.drafting else None

    def generate(self, requests: Sequence[Request]) -> list[Reply | TurnError]:
        return [self._generate_one(request) for request in requests]

    def counters(self) -> EngineCounters:
        return EngineCounters(speculative=self.speculation.summary() if self.speculation else None)

    def _generate_one(self, request: Request) -> Reply | TurnError:
        prompt_tokens = len(self.prompt_ids(request.messages))
        arguments = {**(request.sampling or self.sampling).generate_arguments(), **self.drafting}
        overflow = self.overflow(prompt_tokens, arguments["max_new_tokens"])
        if overflow is not None:
            return overflow
        if arguments["do_sample"]:
            set_seed(request.seed)
        chat = [message.as_dict() for message in request.messages]
        timer = FirstTokenTimer()
        start = time.perf_counter()
        with self._measure(prompt_tokens) as finish:
            [record] = self.pipe(
                chat, return_full_text=False, logits_processor=LogitsProcessorList([timer]), **arguments
            )
            finish(len(record["new_token_ids"]))
        end = time.perf_counter()
        reply = self.reply(
            request, record["prompt_tokens"], record["new_token_ids"], end - start, (timer.at or end) - start
        )
        text, stopped = cut_at_stop(record["generated_text"], request)  # the pipeline's own decoding
        return dataclasses.replace(reply, text=text, finish_reason="stop" if stopped else reply.finish_reason)

    def _measure(self, prompt_tokens: int) -> contextlib.AbstractContextManager:
        if self.speculation is None:
            return contextlib.nullcontext(lambda new_tokens: None)
        return self.speculation.measure(self.model, prompt_tokens)


def build(cfg: RunConfig, setup: EngineSetup) -> PipelineEngine:
    """engine=pipeline: the model inside a TextGenerationPipeline, with its draft model if any."""
    from runner.model.loading import load_assistant, load_pipeline

    pipe = load_pipeline(setup.arguments.load, ChatReplayPipeline, setup.tokenizer)
    drafting = drafting_arguments(cfg.generation)
    if cfg.generation.assistant_model:
        drafting["assistant_model"] = load_assistant(cfg, setup.hardware, setup.tokenizer)
    return PipelineEngine(pipe, Sampling.from_config(cfg.generation), drafting)


def drafting_arguments(generation: Any) -> dict[str, Any]:
    """generate's speculative decoding argument that needs no model: prompt lookup's draft length
    (a draft model, generation.assistant_model, is loaded by `build`)."""
    if generation.prompt_lookup_num_tokens:
        return {"prompt_lookup_num_tokens": generation.prompt_lookup_num_tokens}
    return {}
