"""Generation engines: the model's chat template, generate, and decoding of the new tokens only.

`PipelineEngine` is the seed's way: transformers' TextGenerationPipeline in chat mode, one turn per
call. `BatchedEngine` renders the same template and runs left-padded `model.generate` batches over
turns of different conversations, which reads each weight once per step for the whole batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from jinja2.exceptions import TemplateError
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, TextGenerationPipeline, set_seed
from transformers.cache_utils import DynamicLayer

from runner.conversations import Message
from runner.replay import Reply, Request, TurnError
from runner.schema import EngineKind, RunConfig

log = logging.getLogger(__name__)

# bitsandbytes int8 warns on every matmul when activations are not fp16; once is enough.
warnings.filterwarnings("once", message="MatMul8bitLt: inputs will be cast")

_SENTINEL = "chat-runner system-role probe"


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


class SpeculationCounter:
    """Counts what speculative decoding did, from the target model's own forward passes.

    Each pass verifies the k tokens drafted since the last one (by prompt lookup or a draft model)
    and yields the accepted ones plus one token of its own, so over a generate call
    accepted = new tokens - passes, and drafted = tokens fed - passes - (uncached prompt tokens - 1).
    """

    def __init__(self) -> None:
        self.totals = {"forward_passes": 0, "drafted_tokens": 0, "accepted_tokens": 0, "new_tokens": 0}

    @contextlib.contextmanager
    def measure(self, model: Any, uncached_prompt_tokens: int) -> Iterator[Callable[[int], None]]:
        """Count the passes of one batch-1 generate call; call the yielded function with its new tokens."""
        calls = [0, 0]  # passes, tokens fed

        def count(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            calls[0] += 1
            calls[1] += kwargs["input_ids"].shape[1]

        def finish(new_tokens: int) -> None:
            passes, fed = calls
            self.totals["forward_passes"] += passes
            self.totals["drafted_tokens"] += fed - passes - (uncached_prompt_tokens - 1)
            self.totals["accepted_tokens"] += new_tokens - passes
            self.totals["new_tokens"] += new_tokens

        handle = model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            yield finish
        finally:
            handle.remove()

    def summary(self) -> dict[str, float | int]:
        """Totals, the share of drafted tokens accepted, and tokens per forward pass of the model."""
        totals = self.totals
        return {
            **totals,
            "acceptance_rate": round(totals["accepted_tokens"] / max(totals["drafted_tokens"], 1), 4),
            "tokens_per_forward_pass": round(totals["new_tokens"] / max(totals["forward_passes"], 1), 3),
        }


def template_supports_system_role(tokenizer: Any) -> bool:
    """Render a probe chat: a template without a system role raises or drops the system text."""
    probe = [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "hi"}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return _SENTINEL in rendered


def template_tokens(tokenizer: Any, messages: Sequence[Message]) -> int | str:
    """How many tokens the chat template renders these messages into, or, when the template
    refuses them, its error message."""
    try:
        rendered = tokenizer.apply_chat_template([m.as_dict() for m in messages], return_dict=True)
    except TemplateError as error:
        return str(error)
    return len(rendered["input_ids"])


def stop_token_ids(generation_config: Any) -> frozenset[int]:
    """All eos ids of the model's generation config (Llama 3: <|eot_id|> and <|end_of_text|>)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class _ChatEngine:
    """What both engines share: the template, stop ids, the context check and reply decoding."""

    def __init__(self, model: Any, tokenizer: Any, generate: dict[str, Any], batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.generate_arguments = generate
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(model.generation_config)
        template = tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat template")
        self.chat_template_sha256 = hashlib.sha256(template.encode()).hexdigest()
        self.supports_system_role = template_supports_system_role(tokenizer)
        self.context_tokens = getattr(model.config, "max_position_embeddings", None)
        self.stats: dict[str, int] = {}
        speculative = "prompt_lookup_num_tokens" in generate or "assistant_model" in generate
        self.speculation = SpeculationCounter() if speculative else None
        # Text that the tokenizer turns into control tokens: in user content it could forge a turn.
        self.control_strings = sorted(
            {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
            | set(tokenizer.all_special_tokens)
        )

    def control_tokens_in(self, messages: Sequence[Message]) -> int:
        """How many control-token strings the messages' texts hold (flagged per turn, not removed)."""
        return sum(message.content.count(token) for message in messages for token in self.control_strings)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """The chat template rendered and tokenized, exactly as the pipeline does it."""
        chat = [message.as_dict() for message in messages]
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]

    def measure_speculation(self, uncached_prompt_tokens: int) -> contextlib.AbstractContextManager:
        """Around a generate call: count its drafted and accepted tokens when decoding speculatively."""
        if self.speculation is None:
            return contextlib.nullcontext(lambda new_tokens: None)
        return self.speculation.measure(self.model, uncached_prompt_tokens)

    def overflow(self, prompt_tokens: int) -> TurnError | None:
        """A turn whose prompt plus max_new_tokens outgrows the model's context."""
        budget = prompt_tokens + self.generate_arguments["max_new_tokens"]
        if self.context_tokens is None or budget <= self.context_tokens:
            return None
        return TurnError(
            "context_overflow",
            f"prompt of {prompt_tokens} tokens + max_new_tokens {self.generate_arguments['max_new_tokens']} "
            f"exceeds the model's context of {self.context_tokens} tokens",
            {
                "prompt_tokens": prompt_tokens,
                "max_new_tokens": self.generate_arguments["max_new_tokens"],
                "context_tokens": self.context_tokens,
            },
        )

    def reply(
        self, request: Request, prompt_tokens: int, new_ids: list[int], seconds: float, first: float
    ) -> Reply:
        """Cut the new ids at the first stop id (kept, as the pipeline counts it) and decode them."""
        stop = next((i for i, token in enumerate(new_ids) if token in self.stop_ids), None)
        if stop is not None:
            new_ids = new_ids[: stop + 1]
        return Reply(
            text=self.tokenizer.decode(new_ids, skip_special_tokens=True),
            prompt_tokens=prompt_tokens,
            new_tokens=len(new_ids),
            finish_reason="stop" if stop is not None else "length",
            seconds=seconds,
            first_token_seconds=first,
            control_tokens_in_content=self.control_tokens_in(request.messages),
        )

    def describe(self) -> dict[str, Any]:
        """Where the weights live and what they weigh, for summary.json."""
        placement = getattr(self.model, "hf_device_map", None) or {"": str(self.model.device)}
        return {
            "weights_bytes": self.model.get_memory_footprint(),
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device_map": {name or "all": str(device) for name, device in placement.items()},
        }

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token of context takes: 2 x layers x KV heads x head dim x dtype size."""
        config = self.model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim * self.model.dtype.itemsize


class PipelineEngine(_ChatEngine):
    """Batch-1 chat replay through TextGenerationPipeline (the seed's way, kept to compare)."""

    def __init__(self, pipe: ChatReplayPipeline, generate: dict[str, Any]):
        super().__init__(pipe.model, pipe.tokenizer, generate, batch_size=1)
        self.pipe = pipe

    def generate(self, requests: Sequence[Request]) -> list[Reply | TurnError]:
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, request: Request) -> Reply | TurnError:
        prompt_tokens = len(self.prompt_ids(request.messages))
        overflow = self.overflow(prompt_tokens)
        if overflow is not None:
            return overflow
        if self.generate_arguments["do_sample"]:
            set_seed(request.seed)
        chat = [message.as_dict() for message in request.messages]
        timer = FirstTokenTimer()
        start = time.perf_counter()
        with self.measure_speculation(prompt_tokens) as finish:
            [record] = self.pipe(
                chat,
                return_full_text=False,
                logits_processor=LogitsProcessorList([timer]),
                **self.generate_arguments,
            )
            finish(len(record["new_token_ids"]))
        end = time.perf_counter()
        reply = self.reply(
            request, record["prompt_tokens"], record["new_token_ids"], end - start, (timer.at or end) - start
        )
        return dataclasses.replace(reply, text=record["generated_text"])  # the pipeline's own decoding


@dataclass
class _Prefix:
    """The KV cache a conversation left behind: one (keys, values) of [heads, tokens, dim] per layer."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclass
class _Row:
    """One turn of a batch: its place in the request list, prompt ids and reusable prefix."""

    index: int
    ids: list[int]
    request: Request
    prefix: _Prefix | None

    @property
    def cached(self) -> int:
        return len(self.prefix.ids) if self.prefix is not None else 0


class BatchedEngine(_ChatEngine):
    """Left-padded `model.generate` over a batch of turns from different conversations.

    Cache reuse: after a turn, a conversation that has more turns keeps its KV cache (LRU, at most
    `cache_bytes` in all); its next turn prefills only the tokens after the longest run of
    re-rendered prompt tokens that equal the cached ones (all of them unless a template rewrites
    history). Rows are laid out as [pad | cached prefix | pad | new tokens], masked, so positions
    follow each row's own tokens.

    Out of memory: the batch is split in half and each half retried (and `batch_size` lowered for
    later batches), so every turn is generated exactly once; a single turn that still does not fit
    becomes that conversation's `out_of_memory` error.
    """

    def __init__(
        self, model: Any, tokenizer: Any, generate: dict[str, Any], batch_size: int, cache_bytes: int
    ):
        super().__init__(model, tokenizer, generate, batch_size)
        self.cache_bytes = cache_bytes
        self._prefixes: OrderedDict[int, _Prefix] = OrderedDict()
        self._held_bytes = 0  # sum of the kept prefixes' nbytes
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "prefix_mismatches": 0, "evictions": 0}
        # Prefixes are cut and re-stacked only for plain full-attention caches (no sliding windows),
        # and not under speculative decoding: transformers' assisted decoding feeds the whole prompt
        # on its first pass whatever cache it is given.
        self.cache_supported = self.speculation is None and all(
            type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers
        )
        # transformers 5.24 renamed the cache argument and output field from past_key_values to
        # cache (the old name goes in 5.40): use whichever this version's model takes.
        self._cache_argument = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    def generate(self, requests: Sequence[Request]) -> list[Reply | TurnError]:
        outcomes: list[Reply | TurnError | None] = [None] * len(requests)
        rows = []
        for index, request in enumerate(requests):
            ids = self.prompt_ids(request.messages)
            prefix = self._reusable_prefix(self._take_prefix(request.stream), ids)
            if prefix is not None:
                self.stats["reused_tokens"] += len(prefix.ids)
            outcomes[index] = self.overflow(len(ids))
            if outcomes[index] is None:
                rows.append(_Row(index, ids, request, prefix))
        for row, outcome in zip(rows, self._generate_splitting(rows), strict=True):
            outcomes[row.index] = outcome
        return outcomes

    def _reusable_prefix(self, prefix: _Prefix | None, ids: list[int]) -> _Prefix | None:
        """The part of a cached prefix whose tokens equal the new prompt's first tokens.

        KV at a position depends only on the tokens up to it, so a prefix cut where the re-rendered
        prompt departs from the cached tokens (a template that rewrites history, or a reply that
        re-tokenizes differently) is still exact. At least one prompt token is left to prefill.
        """
        if prefix is None:
            return None
        limit = min(len(prefix.ids), len(ids) - 1)
        same = next((i for i in range(limit) if prefix.ids[i] != ids[i]), limit)
        if same < len(prefix.ids):
            self.stats["prefix_mismatches"] += 1
            if same == 0:
                return None
            prefix = _Prefix(prefix.ids[:same], [(k[:, :same], v[:, :same]) for k, v in prefix.layers])
        return prefix

    def _generate_splitting(self, rows: list[_Row]) -> list[Reply | TurnError]:
        if not rows:
            return []
        try:
            return self._generate_batch(rows)
        except Exception as error:
            if not should_reduce_batch_size(error):
                raise
        clear_device_cache(garbage_collection=True)
        if len(rows) == 1:
            return [
                TurnError(
                    "out_of_memory", "out of memory even at batch size 1", {"prompt_tokens": len(rows[0].ids)}
                )
            ]
        half = len(rows) // 2
        self.batch_size = min(self.batch_size, half)
        log.warning(
            "out of memory at batch size %d: retrying as two batches, batch_size now %d", len(rows), half
        )
        return self._generate_splitting(rows[:half]) + self._generate_splitting(rows[half:])

    def _generate_batch(self, rows: list[_Row]) -> list[Reply]:
        start = time.perf_counter()  # a turn's latency and time to first token include its prefill
        if self.cache_supported:
            self._prefill(rows)
        self.stats["prefill_tokens"] += sum(len(row.ids) - row.cached for row in rows)
        layout = self._layout(rows, [len(row.ids) for row in rows])
        if self.generate_arguments["do_sample"]:
            set_seed(rows[0].request.seed)  # the schedule is deterministic, so this reproduces it
        timer = FirstTokenTimer()
        with torch.inference_mode(), self.measure_speculation(layout.width) as finish:
            output = self.model.generate(
                input_ids=layout.input_ids,
                attention_mask=layout.attention_mask,
                **{self._cache_argument: layout.past},
                logits_processor=LogitsProcessorList([timer]),
                return_dict_in_generate=True,
                **self.generate_arguments,
            )
            new = output.sequences[:, layout.cache_width + layout.width :].tolist()
            finish(len(new[0]))
        end = time.perf_counter()
        replies = [
            self.reply(row.request, len(row.ids), row_new, end - start, (timer.at or end) - start)
            for row, row_new in zip(rows, new, strict=True)
        ]
        if self.cache_supported and self.cache_bytes > 0:
            # The last sampled token was never fed back, so it has no KV entry.
            cache = getattr(output, self._cache_argument)
            fed = cache.get_seq_length() - layout.cache_width - layout.width
            for position, (row, reply) in enumerate(zip(rows, replies, strict=True)):
                if row.request.continues:
                    kept = new[position][: min(reply.new_tokens, fed)]
                    self._keep(row.request.stream, layout.prefix(position, cache, kept))
        return replies

    def _prefill(self, rows: list[_Row]) -> None:
        """Extend every row's prefix to all but its last prompt token, in groups of similar length.

        On a CPU prefill is compute-bound, so padding costs real time: grouping keeps the padded
        tokens within 20% of the real ones, and the generate call then starts from one new token
        per row.
        """
        todo = sorted(
            (row for row in rows if row.cached < len(row.ids) - 1), key=lambda r: len(r.ids) - r.cached
        )
        group: list[_Row] = []
        for row in [*todo, None]:
            need = len(row.ids) - 1 - row.cached if row is not None else 0
            real = sum(len(member.ids) - 1 - member.cached for member in group) + need
            if group and (row is None or (len(group) + 1) * need > 1.2 * real):
                self._prefill_group(group)
                group = []
            if row is not None:
                group.append(row)

    def _prefill_group(self, group: list[_Row]) -> None:
        self.stats["prefill_tokens"] += sum(len(row.ids) - 1 - row.cached for row in group)
        layout = self._layout(group, [len(row.ids) - 1 for row in group])
        position_ids = (layout.attention_mask.cumsum(-1) - 1).clamp(min=0)[:, layout.cache_width :]
        with torch.inference_mode():
            output = self.model(
                input_ids=layout.input_ids[:, layout.cache_width :],
                attention_mask=layout.attention_mask,
                position_ids=position_ids,
                **{
                    self._cache_argument: layout.past
                    if layout.past is not None
                    else DynamicCache(config=self.model.config)
                },
                use_cache=True,
                logits_to_keep=1,
            )
        for position, row in enumerate(group):
            row.prefix = layout.prefix(position, getattr(output, self._cache_argument), [])

    def _layout(self, rows: list[_Row], ends: list[int]) -> _Layout:
        """Rows as [pad | cached prefix | pad | ids[cached:end]], with the prefixes' cache stacked."""
        cache_width = max(row.cached for row in rows)
        width = max(end - row.cached for row, end in zip(rows, ends, strict=True))
        pad = self.tokenizer.pad_token_id
        input_ids, attention_mask = [], []
        for row, end in zip(rows, ends, strict=True):
            gap, tail = cache_width - row.cached, width - (end - row.cached)
            input_ids.append(
                [pad] * gap + row.ids[:end][: row.cached] + [pad] * tail + row.ids[row.cached : end]
            )
            attention_mask.append([0] * gap + [1] * row.cached + [0] * tail + [1] * (end - row.cached))
        device = self.model.device
        return _Layout(
            rows,
            ends,
            torch.tensor(input_ids, device=device),
            torch.tensor(attention_mask, device=device),
            self._batch_cache(rows, cache_width) if cache_width else None,
            cache_width,
            width,
        )

    @staticmethod
    def _batch_cache(rows: list[_Row], cache_width: int) -> DynamicCache:
        """The rows' prefixes right-aligned in a [batch, heads, cache_width, dim] cache, zeros elsewhere."""
        template = next(row.prefix for row in rows if row.prefix is not None)
        layers = []
        for layer, parts in enumerate(template.layers):
            stacked = []
            for part, like in enumerate(parts):
                tensor = like.new_zeros((len(rows), like.shape[0], cache_width, like.shape[2]))
                for position, row in enumerate(rows):
                    if row.prefix is not None:
                        tensor[position, :, cache_width - row.cached :] = row.prefix.layers[layer][part]
                stacked.append(tensor)
            layers.append(tuple(stacked))
        return DynamicCache(ddp_cache_data=layers)

    def _take_prefix(self, stream: int) -> _Prefix | None:
        """Remove and return a conversation's kept prefix: each serves one turn."""
        prefix = self._prefixes.pop(stream, None)
        if prefix is not None:
            self._held_bytes -= prefix.nbytes
        return prefix

    def _keep(self, stream: int, prefix: _Prefix) -> None:
        """Hold a conversation's prefix for its next turn, evicting the least recently kept."""
        self._take_prefix(stream)
        self._prefixes[stream] = prefix
        self._held_bytes += prefix.nbytes
        while self._held_bytes > self.cache_bytes:
            self._held_bytes -= self._prefixes.popitem(last=False)[1].nbytes
            self.stats["evictions"] += 1


@dataclass
class _Layout:
    """A batch laid out for one forward or generate call (see BatchedEngine._layout)."""

    rows: list[_Row]
    ends: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    past: DynamicCache | None
    cache_width: int
    width: int

    def prefix(self, position: int, cache: DynamicCache, new_ids: list[int]) -> _Prefix:
        """Cut one row's real tokens (prefix, its prompt part, `new_ids`) out of the call's cache."""
        row, end = self.rows[position], self.ends[position]
        suffix = end - row.cached
        slots = torch.cat(
            [
                torch.arange(self.cache_width - row.cached, self.cache_width),
                torch.arange(
                    self.cache_width + self.width - suffix, self.cache_width + self.width + len(new_ids)
                ),
            ]
        )
        layers = []
        for layer in cache.layers:
            index = slots.to(layer.keys.device)
            layers.append((layer.keys[position, :, index], layer.values[position, :, index]))
        return _Prefix(row.ids[:end] + new_ids, layers)


def create_engine(cfg: RunConfig, pipe: ChatReplayPipeline, generate: dict[str, Any], batch_size: int):
    """The engine that `engine.kind` names, around an already loaded pipeline."""
    if cfg.engine.kind is EngineKind.pipeline:
        return PipelineEngine(pipe, generate)
    return BatchedEngine(pipe.model, pipe.tokenizer, generate, batch_size, cfg.engine.cache_mb * 2**20)


def accelerator_peak_bytes() -> int | None:
    """Peak CUDA memory allocated by this process over all GPUs, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count()))


def accelerator_names() -> list[str]:
    """Names of the visible CUDA GPUs (empty on a CPU-only machine)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
