"""The continuous engine: one forward pass per step over every turn in flight, with no turn barrier.

It wires the parts together and times them: the scheduler (scheduler.py) decides each step as
data, the forward pass (forward.py) runs it through the model into the slot cache (slot_cache.py),
and sampling.py picks each decoding row's token with the row's own settings and generator, seeded
from its turn, so a row's text does not depend on the rows beside it.

A step admits queued turns into free slots, prefills one chunk of joining prompts (batched, at most
`prefill_chunk` tokens, so a long prompt cannot stall the other rows for long), then decodes one
token for every row; where the forward pass runs rows of any lengths (forward.py's `mixed`), the
chunk and the decode tokens are one pass, which reads the weights once for both. A reply that
ends frees its row at once; when its conversation has another turn, the slot keeps the KV cache,
and that turn prefills only the tokens after the longest prefix of the re-rendered prompt that
equals the tokens the slot holds. A prompt whose start another slot holds or is prefilling copies
those tokens' KV from that slot instead of computing it again.

Out of memory: the rows admitted last go back to the queue (their turns start again, each turn is
still generated once), `batch_size` drops to half the rows that were in flight, and the pass is
retried; a row alone that still does not fit ends its conversation with `out_of_memory`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from runner.engines.chat_model import ChatModel
from runner.engines.continuous.decode_graphs import DecodeGraphs, buckets
from runner.engines.continuous.forward import Forward
from runner.engines.continuous.mapped_zeros import maps_lazily
from runner.engines.continuous.sampling import next_tokens
from runner.engines.continuous.scheduler import DecodeBatch, RowState, Scheduler
from runner.engines.continuous.slot_cache import SlotCache
from runner.engines.protocol import EngineCounters, Outcome, Request, Sampling


@dataclass(frozen=True)
class CacheCounts:
    """summary.json's `cache` section: where each turn's prompt KV came from, and the cache's size."""

    prefill_tokens: int  # computed by prefill passes
    reused_tokens: int  # kept in a conversation's own slot from its previous turn
    shared_tokens: int  # copied from another slot that held the same prompt start
    prefix_mismatches: int  # next turns whose re-rendered prompt changed tokens the slot held
    kv_budget_waits: int  # admissions that left a turn waiting for room in the KV budget
    kv_bytes: int  # the most the cache held at once (its slots x capacity; on a CPU address space)
    kv_written_bytes: int  # the most of it written at once: on a CPU, what it held in memory
    kv_budget_bytes: int | None  # engine.kv_cache_gb, resolved (None: no limit)
    slot_tokens: int  # each slot's capacity at the end


@dataclass(frozen=True)
class StepCounts:
    """summary.json's `steps` section: passes, rows and where the step time went."""

    steps: int
    decode_steps: int  # passes that only decoded (mixed_passes decoded too)
    decode_rows: int  # rows that took a token, summed over the passes that decoded (mixed ones too)
    decode_pass_rows: int  # their decode rows, the idle and prefilling ones below included
    decode_seconds: float  # in the passes that only decoded
    prefill_passes: int
    prefill_tokens: int
    mixed_passes: int  # prefill passes that decoded a token for the decoding rows too
    prefill_seconds: float
    sampling_seconds: float
    step_seconds: float
    scheduling_seconds: float  # the step time outside the passes and sampling


class ContinuousEngine(ChatModel):
    """Step-level replay over `batch_size` KV-cache slots (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sampling: Sampling,
        batch_size: int,
        prefill_chunk: int,
        cuda_graphs: bool = False,
        kv_budget_bytes: int | None = None,
        context_tokens: int = 0,
    ):
        super().__init__(model, tokenizer)
        self.sampling, self.prefill_chunk = sampling, prefill_chunk
        self.device = model.device
        self.kv_budget_bytes = kv_budget_bytes
        layers = model.config.get_text_config().num_hidden_layers
        # CUDA graphs pass over a bucket's slots: the cache holds slots in the same steps, and
        # gives memory back less eagerly, since each resize records the graphs again.
        self.cache = SlotCache(
            layers,
            batch_size,
            slot_sizes=buckets(batch_size) if cuda_graphs else None,
            written_only=maps_lazily(self.device),
            shrink_at=4 if cuda_graphs else 2,
            context=context_tokens,  # on a CPU the cache is taken once, this long (slot_cache.py)
        )
        self.forward = Forward(model, self.cache)
        budget = None if kv_budget_bytes is None else kv_budget_bytes // self.kv_bytes_per_token()
        self.scheduler = Scheduler(
            self,
            self.cache,
            sampling,
            batch_size,
            prefill_chunk,
            tokenizer.pad_token_id,
            self._generator,
            kv_budget=budget,
            ragged=self.forward.ragged,
        )
        # Fixed-shape decode passes, recorded as CUDA graphs on CUDA (decode_graphs.py).
        self.graphs = (
            DecodeGraphs(self.forward, batch_size, tokenizer.pad_token_id, record=self.device.type == "cuda")
            if cuda_graphs
            else None
        )
        # One ragged pass a step for the prefill chunk and the decode tokens (forward.mixed),
        # where the decoder runs op by op and decode passes are not recorded graphs.
        self.mixed = self.forward.ragged and self.graphs is None
        self.stop_tensor = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=self.device)
        self.timings = {
            "steps": 0,
            "decode_steps": 0,
            "decode_rows": 0,
            "decode_pass_rows": 0,
            "decode_seconds": 0.0,
            "prefill_passes": 0,
            "prefill_tokens": 0,
            "mixed_passes": 0,
            "prefill_seconds": 0.0,
            "sampling_seconds": 0.0,
            "step_seconds": 0.0,
        }

    # The scheduler's state, as the app and the tests read it.

    @property
    def batch_size(self) -> int:
        return self.scheduler.batch_size

    @property
    def rows(self) -> list[RowState]:
        return self.scheduler.rows

    @property
    def idle(self) -> dict[int, RowState]:
        return self.scheduler.idle

    @property
    def stats(self) -> dict[str, int]:
        return self.scheduler.stats

    # -- the engine protocol ------------------------------------------------------------------

    def free_slots(self) -> int:
        return self.scheduler.free_slots()

    def submit(self, request: Request) -> None:
        self.scheduler.submit(request)

    def step(self) -> list[Outcome]:
        started = time.perf_counter()
        finished = self.scheduler.admit()
        if self.mixed:
            finished += self._guarded(self._prefill_and_decode)
        else:
            finished += self._guarded(self._prefill)
            if self.scheduler.decoding:
                finished += self._guarded(self._decode)
        self.timings["steps"] += 1
        self.timings["step_seconds"] += time.perf_counter() - started
        return finished

    def counters(self) -> EngineCounters:
        timings = {key: round(value, 4) for key, value in self.timings.items()}
        other = timings["step_seconds"] - sum(
            timings[key] for key in ("decode_seconds", "prefill_seconds", "sampling_seconds")
        )
        return EngineCounters(
            cache=CacheCounts(
                **self.stats,
                kv_bytes=self.cache.peak_bytes,
                kv_written_bytes=self.cache.peak_written_bytes,
                kv_budget_bytes=self.kv_budget_bytes,
                slot_tokens=self.cache.capacity,
            ),
            steps=StepCounts(**timings, scheduling_seconds=round(other, 4)),
        )

    def close(self) -> None:
        """Let go of the decode graphs and their memory pool now, not whenever the engine is
        collected (the scheduler and the engine refer to each other)."""
        if self.graphs is not None:
            self.graphs.release()
        super().close()

    # -- what the scheduler asks of the engine ---------------------------------------------------

    def stop_string_in(self, generated: list[int], stops: tuple[str, ...]) -> bool:
        """Whether the reply so far holds one of its turn's stop strings (decoded each step: only
        turns that have stop strings pay for it)."""
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return any(stop in text for stop in stops)

    def _generator(self, request: Request) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(request.seed)

    # -- passes ----------------------------------------------------------------------------------

    def _guarded(self, work: Callable[[], list[Outcome]]) -> list[Outcome]:
        """Run a pass; on out-of-memory let the scheduler give rows back to the queue, and retry."""
        while True:
            try:
                return work()
            except Exception as error:
                if not should_reduce_batch_size(error):
                    raise
            clear_device_cache(garbage_collection=True)
            lost = self.scheduler.back_off()
            if lost is not None:
                return [lost]

    def _prefill(self) -> list[Outcome]:
        batch = self.scheduler.prefill_batch()
        if batch is None:
            return []
        started = time.perf_counter()
        # A prompt's last token is fed by its first decode pass: a prefill's logits go unread.
        self.forward(batch.input_ids, batch.starts, batch.slots, logits=False)
        self.scheduler.prefilled(batch)
        self.timings["prefill_passes"] += 1
        self.timings["prefill_tokens"] += batch.tokens
        self.timings["prefill_seconds"] += self._settled() - started
        return []

    def _prefill_and_decode(self) -> list[Outcome]:
        """The step's prefill chunk and its decode tokens in one pass (`Forward.mixed`): the rows
        whose prompt it ends take their first token in it too. Its time counts as prefill."""
        prefill = self.scheduler.prefill_batch()
        if prefill is None:
            return self._decode() if self.scheduler.decoding else []
        started = time.perf_counter()
        self.scheduler.prefilled(prefill)
        decode = self.scheduler.decode_batch()
        try:
            logits = self.forward.mixed(
                prefill.input_ids,
                prefill.starts,
                prefill.slots,
                decode.input_ids if decode else [],
                decode.starts if decode else [],
                logits=False,
            )
        except Exception:
            self.scheduler.unprefilled(prefill)  # nothing of the chunk is in the cache
            raise
        self.timings["prefill_passes"] += 1
        self.timings["prefill_tokens"] += prefill.tokens
        self.timings["mixed_passes"] += decode is not None
        self.timings["prefill_seconds"] += self._settled() - started
        return self._sample(decode, logits) if decode else []

    def _decode(self) -> list[Outcome]:
        started = time.perf_counter()
        batch = self.scheduler.decode_batch()
        if batch is None:  # out-of-memory sent every decoding row back to the queue
            return []
        if self.graphs is not None:
            logits = self.graphs(batch.input_ids, batch.starts)
        else:
            logits = self.forward(batch.input_ids, batch.starts, batch.slots)
        self.timings["decode_steps"] += 1
        self.timings["decode_seconds"] += self._settled() - started
        return self._sample(batch, logits)

    def _settled(self) -> float:
        """The clock once the device has run what was queued: a GPU runs a pass after its launches
        return, so its time would land in whatever waits next (the sampler's tokens)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _sample(self, batch: DecodeBatch, logits: torch.Tensor) -> list[Outcome]:
        """Each decoding row's next token from the pass's logits (row i of the pass is slot i)."""
        sampled = time.perf_counter()
        self.timings["decode_rows"] += len(batch.decoding)
        self.timings["decode_pass_rows"] += len(batch.rows)
        if len(batch.decoding) < len(batch.rows):  # rows prefilling or idle below took no token
            logits = logits.index_select(0, torch.tensor(batch.logit_rows, device=logits.device))
        chosen = next_tokens(logits, batch.decoding, self.stop_tensor)
        now = time.perf_counter()
        self.timings["sampling_seconds"] += now - sampled
        return self.scheduler.update(batch, chosen, now)
