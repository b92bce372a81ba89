"""The continuous engine: one forward pass per step over every turn in flight, with no turn barrier.

Each conversation in flight owns a slot of a preallocated KV cache (runner/engines/slot_cache.py).
A step admits queued turns into free slots, prefills one chunk of joining prompts (batched, at
most `prefill_chunk` tokens, so a long prompt cannot stall the other rows for long), then decodes
one token for every row. A reply that ends (a stop id after min_new_tokens, or its own
max_new_tokens) frees its row at once; when its conversation has another turn, the slot keeps the
KV cache, and that turn prefills only the tokens after the longest prefix of the re-rendered prompt
that equals the tokens the slot holds. A prompt whose start another slot holds or is prefilling (a
shared system prompt, or samples of one conversation) copies those tokens' KV from that slot
instead of computing it again. Each row samples with its own settings and its own generator
seeded from the turn's seed, so its text does not depend on the rows beside it.

Out of memory: the rows admitted last go back to the queue (their turns start again, each turn is
still generated once), `batch_size` drops to half the rows that were in flight, and the step is
retried; a row alone that still does not fit ends its conversation with `out_of_memory`.
"""

from __future__ import annotations

import enum
import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from runner.engines.chat_model import ChatModel
from runner.engines.continuous.sampling import next_tokens
from runner.engines.continuous.slot_cache import SlotCache
from runner.engines.protocol import Outcome, Request, Sampling, TurnError

log = logging.getLogger(__name__)

# Shorter common starts are computed again: holding a prompt back a step to copy them saves little.
MIN_SHARED_PREFIX = 16


class Phase(enum.Enum):
    prefill = "prefill"  # prompt tokens left to write into the slot's cache
    decode = "decode"  # one token fed per step
    idle = "idle"  # reply done; the slot's cache waits for the conversation's next turn


@dataclass(eq=False)
class RowState:
    """One conversation in flight: its slot, and the turn in it."""

    stream: int
    slot: int
    order: int  # admission count: the newest rows are the first to go back on out-of-memory
    cached: list[int] = field(default_factory=list)  # tokens whose KV the slot holds, positions 0..n-1
    request: Request | None = None
    sampling: Sampling | None = None
    ids: list[int] = field(default_factory=list)  # this turn's prompt
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    next_token: int = 0  # fed at position len(cached) by the next decode step
    phase: Phase = Phase.idle
    source: RowState | None = None  # the row whose slot holds, or is prefilling, this prompt's start
    shared: int = 0  # how many of this prompt's first tokens to copy from the source's slot
    started: float = 0.0
    first_token_at: float | None = None

    @property
    def remaining(self) -> int:
        """Prompt tokens still to prefill (the last one is fed by the first decode step)."""
        return len(self.ids) - 1 - len(self.cached)

    def start(self, request: Request, ids: list[int], sampling: Sampling, generator: Any, now: float) -> int:
        """Take a turn; keep the cached tokens that equal the prompt's first ones. Returns how many."""
        same = _common_length(self.cached, ids, len(ids) - 1)
        del self.cached[same:]
        self.request, self.sampling, self.ids, self.generator = request, sampling, ids, generator
        self.generated, self.started, self.first_token_at = [], now, None
        self.source, self.shared = None, 0
        self.phase = Phase.prefill if self.remaining else Phase.decode
        self.next_token = ids[-1]
        return same


class ContinuousEngine(ChatModel):
    """Step-level replay over `batch_size` KV-cache slots (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, sampling: Sampling, batch_size: int, prefill_chunk: int):
        super().__init__(model, tokenizer)
        self.sampling, self.batch_size, self.prefill_chunk = sampling, batch_size, prefill_chunk
        text = model.config.get_text_config()
        self.layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if not self.layer_types <= {"full_attention", "sliding_attention"}:
            raise ValueError(
                f"engine=continuous runs attention-only models; this one has {sorted(self.layer_types)} "
                "layers: use engine=pipeline"
            )
        self.sliding_window = getattr(text, "sliding_window", None)
        self.device = model.device
        self.cache = SlotCache(text.num_hidden_layers, batch_size)
        self.rows: list[RowState] = []  # rows[i].slot == i: occupied slots stay contiguous
        self.idle: dict[int, RowState] = {}  # stream -> its slot, waiting for the next turn
        self.queue: deque[Request] = deque()
        self.admitted = 0
        self.stop_tensor = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=self.device)
        self.pad = tokenizer.pad_token_id
        # transformers 5.24 renamed the cache argument from past_key_values to cache.
        self.cache_argument = (
            "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        )
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "shared_tokens": 0, "prefix_mismatches": 0}
        self.timings = {
            "steps": 0,
            "decode_steps": 0,
            "decode_rows": 0,
            "decode_pass_rows": 0,
            "decode_seconds": 0.0,
            "prefill_passes": 0,
            "prefill_tokens": 0,
            "prefill_seconds": 0.0,
            "sampling_seconds": 0.0,
            "step_seconds": 0.0,
        }

    # -- the engine protocol ------------------------------------------------------------------

    def free_slots(self) -> int:
        new = sum(request.stream not in self.idle for request in self.queue)
        return max(self.batch_size - len(self.rows) - new, 0)

    def submit(self, request: Request) -> None:
        self.queue.append(request)

    def step(self) -> list[Outcome]:
        started = time.perf_counter()
        finished = self._admit()
        finished += self._guarded(self._prefill)
        if any(row.phase is Phase.decode for row in self.rows):
            finished += self._guarded(self._decode)
        self.timings["steps"] += 1
        self.timings["step_seconds"] += time.perf_counter() - started
        return finished

    def counters(self) -> dict[str, Any]:
        timings = {key: round(value, 4) for key, value in self.timings.items()}
        other = timings["step_seconds"] - sum(
            timings[key] for key in ("decode_seconds", "prefill_seconds", "sampling_seconds")
        )
        return {
            "cache": {**self.stats, "kv_bytes": self.cache.nbytes, "slot_tokens": self.cache.capacity},
            "steps": {**timings, "scheduling_seconds": round(other, 4)},
        }

    # -- scheduling ----------------------------------------------------------------------------

    def _admit(self) -> list[Outcome]:
        """Queued turns into slots: a conversation's next turn into its own, new ones into free ones."""
        finished, waiting = [], deque()
        while self.queue:
            request = self.queue.popleft()
            row = self.idle.pop(request.stream, None)
            if row is None and len(self.rows) >= self.batch_size:
                waiting.append(request)
                continue
            sampling = request.sampling or self.sampling
            ids = self.prompt_ids(request.messages)
            overflow = self.overflow(len(ids), sampling.max_new_tokens)
            if overflow is not None:
                if row is not None:
                    self._release(row)
                finished.append((request, overflow))
                continue
            if row is None:
                row = RowState(request.stream, slot=len(self.rows), order=self.admitted)
                self.rows.append(row)
            self.admitted += 1
            had = len(row.cached)
            generator = None
            if sampling.do_sample:
                generator = torch.Generator(device=self.device).manual_seed(request.seed)
            same = row.start(request, ids, sampling, generator, time.perf_counter())
            self.stats["reused_tokens"] += same
            self.stats["prefix_mismatches"] += same < had
            self.stats["prefill_tokens"] += len(ids) - same
            self._find_shared_prefix(row)
        self.queue = waiting
        return finished

    def _find_shared_prefix(self, row: RowState) -> None:
        """Find the row whose slot holds, or will once prefilled, the longest start of this turn's
        prompt beyond what its own slot holds. Rows that wait for a source are not sources, so no
        two rows wait for each other."""
        best = len(row.cached) + MIN_SHARED_PREFIX - 1
        for other in self.rows:
            if other is row or other.source is not None:
                continue
            tokens = other.ids[:-1] if other.phase is Phase.prefill else other.cached
            length = _common_length(tokens, row.ids, len(row.ids) - 1)
            if length > best:
                best, row.source, row.shared = length, other, length
        self._copy_shared_prefix(row)

    def _copy_shared_prefix(self, row: RowState) -> None:
        """Copy the shared start from the source's slot once it holds it; keep waiting while the
        source is still prefilling it; give up (prefill it here) if the source moved on."""
        source, length = row.source, row.shared
        if source is None:
            return
        alive = source.slot < len(self.rows) and self.rows[source.slot] is source
        holds = alive and _common_length(source.cached, row.ids, length) == length
        if not holds:
            prefilling = source.phase is Phase.prefill
            if not (alive and prefilling and _common_length(source.ids, row.ids, length) == length):
                row.source, row.shared = None, 0
            return
        self.cache.copy(source.slot, row.slot, len(row.cached), length)
        self.stats["shared_tokens"] += length - len(row.cached)
        self.stats["prefill_tokens"] -= length - len(row.cached)
        row.cached = row.ids[:length]
        row.source, row.shared = None, 0
        if not row.remaining:
            row.phase = Phase.decode

    def _release(self, row: RowState) -> None:
        """Free a row's slot; the last occupied slot moves into it so occupied slots stay 0..n-1."""
        self.idle.pop(row.stream, None)
        last = self.rows.pop()
        if last is not row:
            self.cache.copy(last.slot, row.slot, 0, len(last.cached))
            last.slot = row.slot
            self.rows[row.slot] = last

    def _guarded(self, work: Any) -> list[Outcome]:
        """Run a forward step; on out-of-memory give rows back to the queue and retry."""
        while True:
            try:
                return work()
            except Exception as error:
                if not should_reduce_batch_size(error):
                    raise
            clear_device_cache(garbage_collection=True)
            busy = [row for row in self.rows if row.phase is not Phase.idle]
            if len(self.rows) <= 1 or self.batch_size == 1:
                if not busy:
                    raise RuntimeError("out of memory with no turn in flight")
                row = busy[-1]
                request = row.request
                self._release(row)
                return [(request, TurnError("out_of_memory", "out of memory even at batch size 1", {}))]
            self.batch_size = max(len(self.rows) // 2, 1)
            log.warning(
                "out of memory with %d rows in flight: batch_size now %d, the newest turns start again",
                len(self.rows),
                self.batch_size,
            )
            for row in sorted(self.rows, key=lambda r: r.order, reverse=True)[
                : len(self.rows) - self.batch_size
            ]:
                if row.request is not None:
                    self.queue.appendleft(row.request)
                self._release(row)

    # -- forward passes -------------------------------------------------------------------------

    def _prefill(self) -> list[Outcome]:
        """One batched chunk of joining prompts: rows of similar remaining length, padding under 20%.
        Rows waiting for a shared start copy it first, or wait for the next step."""
        for row in self.rows:
            self._copy_shared_prefix(row)
        group: list[tuple[RowState, int]] = []
        real = 0
        ready = (r for r in self.rows if r.phase is Phase.prefill and r.source is None)
        for row in sorted(ready, key=lambda r: r.remaining):
            chunk = min(row.remaining, self.prefill_chunk)
            wider = (len(group) + 1) * chunk
            if group and (wider > self.prefill_chunk or wider > 1.2 * (real + chunk)):
                break
            group.append((row, chunk))
            real += chunk
        if not group:
            return []
        started = time.perf_counter()
        width = max(chunk for _, chunk in group)
        starts = torch.tensor([len(row.cached) for row, _ in group], device=self.device)
        input_ids = [
            row.ids[len(row.cached) : len(row.cached) + chunk] + [self.pad] * (width - chunk)
            for row, chunk in group
        ]
        positions = starts[:, None] + torch.arange(width, device=self.device)
        slots = torch.tensor([row.slot for row, _ in group], device=self.device)
        self._forward(input_ids, positions, slots, int(positions.max()) + 1)
        for row, chunk in group:
            row.cached += row.ids[len(row.cached) : len(row.cached) + chunk]
            if not row.remaining:
                row.phase = Phase.decode
        self.timings["prefill_passes"] += 1
        self.timings["prefill_tokens"] += real
        self.timings["prefill_seconds"] += time.perf_counter() - started
        return []

    def _decode(self) -> list[Outcome]:
        """One token for every decoding row. The pass reads the slots up to the last decoding row's
        as one view; rows still prefilling or idle below it ride along, unread."""
        started = time.perf_counter()
        last = max(row.slot for row in self.rows if row.phase is Phase.decode)
        rows = self.rows[: last + 1]
        positions = torch.tensor([[len(row.cached)] for row in rows], device=self.device)
        tokens = [[row.next_token if row.phase is Phase.decode else self.pad] for row in rows]
        logits = self._forward(tokens, positions, slice(0, len(rows)), int(positions.max()) + 1)
        decoding = [row for row in rows if row.phase is Phase.decode]
        self.timings["decode_steps"] += 1
        self.timings["decode_rows"] += len(decoding)
        self.timings["decode_pass_rows"] += len(rows)
        sampled = time.perf_counter()
        self.timings["decode_seconds"] += sampled - started
        index = torch.tensor([row.slot for row in decoding], device=logits.device)
        chosen = next_tokens(logits[:, -1].index_select(0, index), decoding, self.stop_tensor)
        now = time.perf_counter()
        self.timings["sampling_seconds"] += now - sampled
        done = []
        for row, token in zip(decoding, chosen, strict=True):
            row.cached.append(row.next_token)
            row.generated.append(token)
            row.first_token_at = row.first_token_at or now
            if (
                token in self.stop_ids
                or len(row.generated) >= row.sampling.max_new_tokens
                or (row.sampling.stop and self._stop_string_in(row))
            ):
                done.append(row)
            else:
                row.next_token = token
        return [self._finish(row, now) for row in done]

    def _stop_string_in(self, row: RowState) -> bool:
        """Whether the reply so far holds one of its turn's stop strings (decoded each step: only
        turns that have stop strings pay for it)."""
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        return any(stop in text for stop in row.sampling.stop)

    def _finish(self, row: RowState, now: float) -> Outcome:
        request = row.request
        reply = self.reply(
            request, len(row.ids), row.generated, now - row.started, row.first_token_at - row.started
        )
        row.request, row.generator, row.phase = None, None, Phase.idle
        if request.continues:
            self.idle[request.stream] = row
        else:
            self._release(row)
        return request, reply

    def _forward(
        self, input_ids: list[list[int]], positions: torch.Tensor, slots: Any, kv_length: int
    ) -> torch.Tensor:
        """One forward pass writing each row's tokens at `positions` of its slot; the last logits."""
        self.cache.plan(slots, positions, kv_length)
        keys = torch.arange(kv_length, device=self.device)
        visible = keys[None, None, None, :] <= positions[:, None, :, None]  # [rows, 1, tokens, keys]
        masks = {"full_attention": visible}
        if "sliding_attention" in self.layer_types and self.sliding_window:
            masks["sliding_attention"] = visible & (keys > positions[:, None, :, None] - self.sliding_window)
        # Additive masks, made once a pass: eager attention needs them, and SDPA takes them as they are.
        masks = {
            name: torch.zeros(m.shape, dtype=self.model.dtype, device=self.device).masked_fill(
                ~m, torch.finfo(self.model.dtype).min
            )
            for name, m in masks.items()
        }
        with torch.inference_mode():
            output = self.model(
                input_ids=torch.tensor(input_ids, device=self.device),
                position_ids=positions,
                attention_mask=masks if len(self.layer_types) > 1 else masks["full_attention"],
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_argument: self.cache},
            )
        return output.logits


def _common_length(first: list[int], second: list[int], limit: int) -> int:
    """How many leading tokens the two lists share, at most `limit`."""
    limit = min(limit, len(first), len(second))
    return next((i for i in range(limit) if first[i] != second[i]), limit)
