"""What the continuous engine does each step, decided as data; imports no torch.

The scheduler owns the rows in flight (one `RowState` per conversation turn, each in a slot of the
KV cache), the queue and the idle slots. Each step it admits queued turns (a conversation's next
turn into its own slot, keeping the cached start of its prompt; new ones into free slots) while
the cache they need fits the KV budget, copies prompt starts that another slot holds, and hands
the engine a `PrefillBatch` and a `DecodeBatch` to run; `prefilled` and `update` take the results
back. Slots stay contiguous: when a row is released, the last occupied slot moves into its place.
On out-of-memory, `back_off` decides who goes back to the queue.

The KV budget: the cache counts the memory its rows take (`Slots.cells`). Slots all hold the same
capacity, so that is (slots) x (the longest row's tokens), except where the cache holds memory only
for what rows write (on a CPU): there it is each row's own tokens. A turn joins only while that,
with its prompt and max_new_tokens counted, stays within `kv_budget` tokens; a turn that does not
fit waits, and new conversations queue behind it so it is not passed over for ever. Where nothing
is running and a waiting turn still does not fit, the longest idle slot is given up (its
conversation's next turn prefills again); a turn alone that does not fit runs alone. After the
longest rows leave, the cache gives the memory back.

It meets the model through two small injected things: a `TurnText` (prompt ids, the context check,
stop strings, the reply) and `Slots` (the KV cache's copy and sizes), so it runs without either.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from runner.engines.protocol import Outcome, Reply, Request, Sampling, TurnError
from runner.inputs.conversation import Message

log = logging.getLogger(__name__)

# Shorter common starts are computed again: holding a prompt back a step to copy them saves little.
MIN_SHARED_PREFIX = 16


class TurnText(Protocol):
    """The tokenizer and chat template, as the scheduler sees them (the engine, a ChatModel)."""

    stop_ids: frozenset[int]

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]: ...

    def overflow(self, prompt_tokens: int, max_new_tokens: int) -> TurnError | None: ...

    def stop_string_in(self, generated: list[int], stops: tuple[str, ...]) -> bool: ...

    def reply(
        self, request: Request, prompt_tokens: int, new_ids: list[int], seconds: float, first: float
    ) -> Reply: ...


class Slots(Protocol):
    """The KV cache as the scheduler sees it (slot_cache.SlotCache)."""

    def copy(self, source: int, target: int, start: int, stop: int) -> None: ...

    def forget(self, slot: int, start: int = 0) -> None: ...

    def fit(self, rows: int, length: int, most: int | None = None) -> None: ...

    def cells(self, needs: list[int]) -> int: ...

    def claim(self, slots: list[int], stops: list[int]) -> None: ...


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
    generator: Any = None  # the engine's random generator for this turn, when it samples
    next_token: int = 0  # fed at position len(cached) by the next decode step
    phase: Phase = Phase.idle
    source: RowState | None = None  # the row whose slot holds, or is prefilling, this prompt's start
    shared: int = 0  # how many of this prompt's first tokens to copy from the source's slot
    started: float = 0.0
    first_token_at: float | None = None

    @property
    def need(self) -> int:
        """KV-cache positions this row may fill: its prompt and max_new_tokens while a turn runs,
        what the slot holds while idle."""
        if self.phase is Phase.idle:
            return len(self.cached)
        return len(self.ids) + self.sampling.max_new_tokens

    @property
    def remaining(self) -> int:
        """Prompt tokens still to prefill (the last one is fed by the first decode step)."""
        return len(self.ids) - 1 - len(self.cached)

    def start(self, request: Request, ids: list[int], sampling: Sampling, generator: Any, now: float) -> int:
        """Take a turn; keep the cached tokens that equal the prompt's first ones. Returns how many."""
        same = common_length(self.cached, ids, len(ids) - 1)
        del self.cached[same:]
        self.request, self.sampling, self.ids, self.generator = request, sampling, ids, generator
        self.generated, self.started, self.first_token_at = [], now, None
        self.source, self.shared = None, 0
        self.phase = Phase.prefill if self.remaining else Phase.decode
        self.next_token = ids[-1]
        return same


@dataclass
class PrefillBatch:
    """One chunk of joining prompts: row i writes `input_ids[i][:chunks[i]]` (the rest, in a padded
    batch, is padding) into slot `slots[i]` from position `starts[i]` on."""

    rows: list[RowState]
    chunks: list[int]
    input_ids: list[list[int]]
    starts: list[int]
    slots: list[int]

    @property
    def tokens(self) -> int:
        """The prompt tokens written, padding not counted."""
        return sum(self.chunks)


@dataclass
class DecodeBatch:
    """One token for every decoding row. The pass covers slots 0..n-1 (up to the last decoding
    row's), so it reads them as one view; rows prefilling or idle below it are fed padding and
    their logits are not read. `decoding` are the rows that take a token, in slot order."""

    rows: list[RowState]  # slots 0..n-1, every row of the pass
    decoding: list[RowState]
    input_ids: list[list[int]]
    starts: list[int]

    @property
    def slots(self) -> slice:
        return slice(0, len(self.rows))

    @property
    def logit_rows(self) -> list[int]:
        """Where the decoding rows' logits are among the pass's (row i of the pass is slot i)."""
        return [row.slot for row in self.decoding]


class Scheduler:
    """Rows, queue and idle slots of the continuous engine, and every decision over them.

    Args:
        text: prompt ids, the context check, stop ids and strings, and the reply of a finished turn.
        cache: where the KV of a shared prompt start or a moved slot is copied, and what sizes it.
        sampling: the settings of turns that bring none.
        batch_size: rows in flight at most (halved on out-of-memory).
        prefill_chunk: prompt tokens one prefill pass writes at most.
        pad: the token fed where a pass has nothing to write.
        generator: makes a turn's random generator when it samples (the engine's, seeded by the turn).
        kv_budget: KV-cache positions (slots x capacity) the rows may hold at once; None: no limit.
        ragged: prefill passes take rows of any lengths unpadded (else rows of one length).
    """

    def __init__(
        self,
        text: TurnText,
        cache: Slots,
        sampling: Sampling,
        batch_size: int,
        prefill_chunk: int,
        pad: int,
        generator: Callable[[Request], Any],
        kv_budget: int | None = None,
        ragged: bool = False,
    ):
        self.text, self.cache, self.sampling, self.ragged = text, cache, sampling, ragged
        self.batch_size, self.prefill_chunk, self.pad, self.generator = (
            batch_size,
            prefill_chunk,
            pad,
            generator,
        )
        self.rows: list[RowState] = []  # rows[i].slot == i: occupied slots stay contiguous
        self.idle: dict[int, RowState] = {}  # stream -> its slot, waiting for the next turn
        self.queue: deque[Request] = deque()
        self.prompts: dict[int, list[int]] = {}  # id(request) -> prompt ids, for turns waiting for room
        self.admitted = 0
        self.kv_budget = kv_budget
        self.over_budget_said = False
        self.waiting_for_room = False  # the last admission left a turn waiting for KV room
        self.stats = {
            "prefill_tokens": 0,
            "reused_tokens": 0,
            "shared_tokens": 0,
            "prefix_mismatches": 0,
            "kv_budget_waits": 0,
        }

    # -- admission -------------------------------------------------------------------------------

    def free_slots(self) -> int:
        """How many new conversations may join now (a queued next turn has its own slot)."""
        new = sum(request.stream not in self.idle for request in self.queue)
        return max(self.batch_size - len(self.rows) - new, 0)

    def submit(self, request: Request) -> None:
        self.queue.append(request)

    def admit(self) -> list[Outcome]:
        """Queued turns into slots: a conversation's next turn into its own, new ones into free slots,
        while the KV budget allows (see the module docstring). Returns the turns that cannot run
        (their prompt outgrows the context)."""
        finished = self._admit_queue()
        while self.waiting_for_room and self.rows and all(row.phase is Phase.idle for row in self.rows):
            longest = max(self.rows, key=lambda row: len(row.cached))
            log.info("KV budget: a %d-token idle slot given up for a waiting turn", len(longest.cached))
            self.release(longest)
            finished += self._admit_queue()
        self.cache.fit(len(self.rows), max((row.need for row in self.rows), default=0), self.kv_budget)
        return finished

    def _admit_queue(self) -> list[Outcome]:
        finished, waiting = [], deque()
        blocked = False  # a turn waits for KV room: new conversations queue behind it
        while self.queue:
            request = self.queue.popleft()
            row = self.idle.get(request.stream)
            if row is None and (blocked or len(self.rows) >= self.batch_size):
                waiting.append(request)
                continue
            sampling = request.sampling or self.sampling
            ids = self.prompts.pop(id(request), None) or self.text.prompt_ids(request.messages)
            overflow = self.text.overflow(len(ids), sampling.max_new_tokens)
            if overflow is not None:
                if row is not None:
                    self.release(row)
                finished.append((request, overflow))
                continue
            need = len(ids) + sampling.max_new_tokens
            if not self._room_for(row, need):
                self.prompts[id(request)] = ids  # not rendered again while it waits
                waiting.append(request)
                blocked = True
                continue
            if row is None:
                row = RowState(request.stream, slot=len(self.rows), order=self.admitted)
                self.rows.append(row)
            else:
                del self.idle[request.stream]
            self.cache.fit(len(self.rows), max([need, *(other.need for other in self.rows)]), self.kv_budget)
            self._start(row, request, ids, sampling)
        self.queue, self.waiting_for_room = waiting, blocked
        self.stats["kv_budget_waits"] += blocked
        return finished

    def _room_for(self, row: RowState | None, need: int) -> bool:
        """Whether the cache, with this turn (in `row`'s slot, or a new one) needing `need`
        positions, stays within the KV budget. A turn alone always runs (said once, if over)."""
        if self.kv_budget is None:
            return True
        others = [other for other in self.rows if other is not row]
        if self.cache.cells([need, *(other.need for other in others)]) <= self.kv_budget:
            return True
        if others:
            return False
        if not self.over_budget_said:
            log.warning(
                "a turn needs %d KV-cache positions, more than the KV budget's %d; it runs alone",
                need,
                self.kv_budget,
            )
            self.over_budget_said = True
        return True

    def _start(self, row: RowState, request: Request, ids: list[int], sampling: Sampling) -> None:
        """Start a turn in its row, count what its slot already holds, and look for a shared start."""
        self.admitted += 1
        had = len(row.cached)
        generator = self.generator(request) if sampling.do_sample else None
        same = row.start(request, ids, sampling, generator, time.perf_counter())
        self.stats["reused_tokens"] += same
        self.stats["prefix_mismatches"] += same < had
        self.stats["prefill_tokens"] += len(ids) - same
        self._find_shared_prefix(row)

    # -- prefix sharing --------------------------------------------------------------------------

    def _find_shared_prefix(self, row: RowState) -> None:
        """Find the row whose slot holds, or will once prefilled, the longest start of this turn's
        prompt beyond what its own slot holds. Rows that wait for a source are not sources, so no
        two rows wait for each other."""
        best = len(row.cached) + MIN_SHARED_PREFIX - 1
        for other in self.rows:
            if other is row or other.source is not None:
                continue
            tokens = other.ids[:-1] if other.phase is Phase.prefill else other.cached
            length = common_length(tokens, row.ids, len(row.ids) - 1)
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
        holds = alive and common_length(source.cached, row.ids, length) == length
        if not holds:
            prefilling = source.phase is Phase.prefill
            if not (alive and prefilling and common_length(source.ids, row.ids, length) == length):
                row.source, row.shared = None, 0
            return
        self.cache.copy(source.slot, row.slot, len(row.cached), length)
        self.stats["shared_tokens"] += length - len(row.cached)
        self.stats["prefill_tokens"] -= length - len(row.cached)
        row.cached = row.ids[:length]
        row.source, row.shared = None, 0
        if not row.remaining:
            row.phase = Phase.decode

    def release(self, row: RowState) -> None:
        """Free a row's slot; the last occupied slot moves into it so occupied slots stay 0..n-1.
        What the freed slot held past the moved row's tokens, and the last slot, hold nothing now:
        the cache gives their memory back."""
        self.idle.pop(row.stream, None)
        last = self.rows.pop()
        if last is not row:
            self.cache.copy(last.slot, row.slot, 0, len(last.cached))
            self.cache.forget(row.slot, len(last.cached))
            last.slot = row.slot
            self.rows[row.slot] = last
        self.cache.forget(len(self.rows))

    # -- the step's passes -----------------------------------------------------------------------

    def prefill_batch(self) -> PrefillBatch | None:
        """One batched chunk of joining prompts, at most `prefill_chunk` tokens: rows of any lengths
        where the pass runs them unpadded (`ragged`), else rows of similar remaining length, padding
        under 20% and within each row's need. Rows waiting for a shared start copy it first, or wait
        for the next step. None when no row has prompt left to prefill."""
        for row in self.rows:
            self._copy_shared_prefix(row)
        group: list[tuple[RowState, int]] = []
        real = 0
        ready = (r for r in self.rows if r.phase is Phase.prefill and r.source is None)
        for row in sorted(ready, key=lambda r: r.remaining):
            chunk = min(row.remaining, self.prefill_chunk)
            if self.ragged:
                if group and real + chunk > self.prefill_chunk:
                    break
            else:
                wider = (len(group) + 1) * chunk
                # Padding is written to the cache too: it must stay within each row's own need.
                past_need = any(len(other.cached) + chunk > other.need for other, _ in group)
                if group and (wider > self.prefill_chunk or wider > 1.2 * (real + chunk) or past_need):
                    break
            group.append((row, chunk))
            real += chunk
        if not group:
            return None
        width = max(chunk for _, chunk in group)
        batch = PrefillBatch(
            rows=[row for row, _ in group],
            chunks=[chunk for _, chunk in group],
            input_ids=[
                row.ids[len(row.cached) : len(row.cached) + chunk]
                + ([] if self.ragged else [self.pad] * (width - chunk))
                for row, chunk in group
            ],
            starts=[len(row.cached) for row, _ in group],
            slots=[row.slot for row, _ in group],
        )
        ends = [start + len(ids) for start, ids in zip(batch.starts, batch.input_ids, strict=True)]
        self.cache.claim(batch.slots, ends)
        return batch

    def prefilled(self, batch: PrefillBatch) -> None:
        """The batch's tokens are in the cache: rows whose prompt is all there start decoding."""
        for row, chunk in zip(batch.rows, batch.chunks, strict=True):
            row.cached += row.ids[len(row.cached) : len(row.cached) + chunk]
            if not row.remaining:
                row.phase = Phase.decode

    def unprefilled(self, batch: PrefillBatch) -> None:
        """Undo `prefilled`: the batch's pass failed, so none of its tokens are in the cache."""
        for row, start in zip(batch.rows, batch.starts, strict=True):
            del row.cached[start:]
            row.phase = Phase.prefill

    @property
    def decoding(self) -> bool:
        """Whether any row takes a token this step."""
        return any(row.phase is Phase.decode for row in self.rows)

    def decode_batch(self) -> DecodeBatch | None:
        """One token for every decoding row (see DecodeBatch); None when no row decodes."""
        if not self.decoding:
            return None
        last = max(row.slot for row in self.rows if row.phase is Phase.decode)
        rows = self.rows[: last + 1]
        starts = [len(row.cached) for row in rows]
        self.cache.claim([row.slot for row in rows], [start + 1 for start in starts])
        return DecodeBatch(
            rows=rows,
            decoding=[row for row in rows if row.phase is Phase.decode],
            input_ids=[[row.next_token if row.phase is Phase.decode else self.pad] for row in rows],
            starts=starts,
        )

    def update(self, batch: DecodeBatch, tokens: Sequence[int], now: float) -> list[Outcome]:
        """Take each decoding row's sampled token; a row ends at a stop id, its max_new_tokens or a
        stop string. Returns the finished turns' replies."""
        done = []
        for row, token in zip(batch.decoding, tokens, strict=True):
            row.cached.append(row.next_token)
            row.generated.append(token)
            row.first_token_at = row.first_token_at or now
            if (
                token in self.text.stop_ids
                or len(row.generated) >= row.sampling.max_new_tokens
                or (row.sampling.stop and self.text.stop_string_in(row.generated, row.sampling.stop))
            ):
                done.append(row)
            else:
                row.next_token = token
        return [self._finish(row, now) for row in done]

    def _finish(self, row: RowState, now: float) -> Outcome:
        """The turn's reply; its slot waits for the conversation's next turn, or is released."""
        request = row.request
        reply = self.text.reply(
            request, len(row.ids), row.generated, now - row.started, row.first_token_at - row.started
        )
        row.request, row.generator, row.phase = None, None, Phase.idle
        if request.continues:
            self.idle[request.stream] = row
        else:
            self.release(row)
        return request, reply

    # -- out of memory ---------------------------------------------------------------------------

    def back_off(self) -> Outcome | None:
        """After a pass ran out of memory: the rows admitted last go back to the queue (their turns
        start again) and batch_size drops to half the rows in flight; returns None, and the pass
        is retried. A row alone that still does not fit ends with `out_of_memory`, returned."""
        busy = [row for row in self.rows if row.phase is not Phase.idle]
        if len(self.rows) <= 1 or self.batch_size == 1:
            if not busy:
                raise RuntimeError("out of memory with no turn in flight")
            row = busy[-1]
            request = row.request
            self.release(row)
            return request, TurnError("out_of_memory", "out of memory even at batch size 1", {})
        self.batch_size = max(len(self.rows) // 2, 1)
        log.warning(
            "out of memory with %d rows in flight: batch_size now %d, the newest turns start again",
            len(self.rows),
            self.batch_size,
        )
        newest = sorted(self.rows, key=lambda r: r.order, reverse=True)
        for row in newest[: len(self.rows) - self.batch_size]:
            if row.request is not None:
                self.queue.appendleft(row.request)
            self.release(row)
        return None


def common_length(first: list[int], second: list[int], limit: int) -> int:
    """How many leading tokens the two lists share, at most `limit`."""
    limit = min(limit, len(first), len(second))
    return next((i for i in range(limit) if first[i] != second[i]), limit)
