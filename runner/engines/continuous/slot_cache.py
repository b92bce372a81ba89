"""A KV cache of slots for the continuous engine, as a transformers `Cache`.

Each layer holds keys and values of shape [slots, kv_heads, capacity, head_dim], allocated on the
layer's own device at its first write. Both sizes follow the rows in flight rather than the batch
size: `fit` grows the slots (in steps of `slot_sizes`) and the capacity (in whole chunks) when rows
join that need them, never per step, and gives memory back when the rows' needs fall to half of
what is held (after a long conversation leaves, say; to a quarter with CUDA graphs, which are
recorded again after every resize). Before each forward pass the engine says which slots the batch
rows are and where each row's new tokens go (`plan`); the model's attention layers then write
there and read the slots' first `kv_length` positions back. Masks and positions are the engine's
business.

On a CPU the rectangle holds memory only where rows wrote (mapped_zeros.py): the cache keeps each
slot's extent, the positions written to, so a resize copies only those, and a slot whose
conversation left gives its pages back (`forget`). What the memory holds then follows the rows'
own lengths, not the longest row's times the slots, and so does the KV budget there (`cells`).
There a larger rectangle costs address space only, so the cache is taken once: every slot, as long
as the memory plan's context per row (`context`), and never shrunk. A resize would copy what every
slot holds into pages taken afresh, and a fresh page costs the process a fault of 2-30 µs on a VM
(40,000 of a forced 16-conversation replay's 160,000 faults were resizes). Before a pass, the
chunk each row writes in is taken in one call (`claim`), dropping the zero-page mappings that a
decode pass's reads past a shorter row's end left there, which would be copied at the first write.
"""

from __future__ import annotations

import mmap
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from runner.engines.continuous.mapped_zeros import claim, forget, mapped_zeros


@dataclass
class StepPlan:
    """Where one forward pass reads and writes: `slots` is a contiguous range from slot 0 (read as a
    view, no copy), an index tensor (read as a gathered copy) or None (a ragged pass: each row reads
    its own slot from the whole tensors); `positions` is [rows, tokens] and `rows` the slot of each
    of those tokens."""

    slots: slice | torch.Tensor | None
    positions: torch.Tensor
    rows: torch.Tensor
    kv_length: int


class SlotLayer(CacheLayerMixin):
    """One attention layer's slots."""

    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        slots, capacity = self.cache.slots, self.cache.capacity
        shape = (slots, key_states.shape[1], capacity, key_states.shape[3])
        self.keys = mapped_zeros(shape, key_states.dtype, key_states.device)
        self.values = mapped_zeros(shape, value_states.dtype, value_states.device)
        self.is_initialized = True
        self.cache.peak_bytes = max(self.cache.peak_bytes, self.cache.nbytes)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.cache.step
        # Layers of a model split over GPUs live on different devices; .to() is free on the same one.
        rows, positions = plan.rows.to(self.keys.device), plan.positions.to(self.keys.device)
        # keys[row, :, position] = new key of that row's token: [rows, tokens, heads, dim] on both sides.
        self.keys[rows, :, positions] = key_states.transpose(1, 2)
        self.values[rows, :, positions] = value_states.transpose(1, 2)
        length = plan.kv_length
        if plan.slots is None:
            return self.keys, self.values
        if isinstance(plan.slots, slice):
            return self.keys[plan.slots, :, :length], self.values[plan.slots, :, :length]
        index = plan.slots.to(self.keys.device)
        return self.keys[:, :, :length].index_select(0, index), self.values[:, :, :length].index_select(
            0, index
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.step.kv_length, 0

    def get_seq_length(self) -> int:
        return self.cache.step.kv_length if self.cache.step is not None else 0

    def get_max_length(self) -> int:
        return self.cache.capacity

    def resize(self, slots: int, capacity: int, extents: list[int]) -> None:
        """Reallocate at `slots` x `capacity`, keeping what fits of each slot's first `extents[slot]`
        positions (only what was written: the rest of a new CPU tensor holds no memory)."""
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = mapped_zeros((slots, old.shape[1], capacity, old.shape[3]), old.dtype, old.device)
            for slot, extent in enumerate(extents[: min(slots, old.shape[0])]):
                keep = min(extent, capacity, old.shape[2])
                if keep:
                    new[slot, :, :keep] = old[slot, :, :keep]
            setattr(self, name, new)
            del old  # this layer's old tensor goes before the next is allocated

    def forget(self, slot: int, start: int) -> None:
        """Give back the memory of a slot's positions from `start` on (see mapped_zeros.forget)."""
        if not self.is_initialized:
            return
        for tensor in (self.keys[slot], self.values[slot]):  # [heads, capacity, head_dim]
            if start == 0:
                forget(tensor, 0, tensor.numel())
                continue
            for head in tensor:
                forget(head, start * head.shape[1], head.numel())

    def claim(self, slot: int, start: int, stop: int) -> None:
        """Take the memory of a slot's positions start..stop-1 now (see mapped_zeros.claim)."""
        if not self.is_initialized:
            return
        for tensor in (self.keys[slot], self.values[slot]):  # [heads, capacity, head_dim]
            for head in tensor:
                claim(head, start * head.shape[1], stop * head.shape[1])

    def copy(self, source: int, target: int, start: int, stop: int) -> None:
        if self.is_initialized:
            self.keys[target, :, start:stop] = self.keys[source, :, start:stop]
            self.values[target, :, start:stop] = self.values[source, :, start:stop]


class SlotCache(Cache):
    """Up to `max_slots` rows of KV storage, `capacity` tokens each. Capacity grows in whole chunks
    and by at least a quarter where the budget allows, so the copies that growing takes add up to
    a few times the final size; the slots held are the smallest of `slot_sizes` that covers the
    rows asked for. Memory is given back where the rows need at most 1/`shrink_at` of what is held.

    `written_only`: the tensors hold memory only where rows write (mapped_zeros.py, on a CPU), so
    the budget counts each row's own need, and the rectangle may outgrow it. The cache then holds
    all `max_slots` slots from the start, `context` tokens each (the plan's context per row), grows
    to at least twice its capacity if a row needs more, and is never shrunk (see the module
    docstring)."""

    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        chunk: int = 64,
        slot_sizes: list[int] | None = None,
        written_only: bool = False,
        shrink_at: int = 2,
        context: int = 0,
    ):
        self.chunk, self.capacity, self.written_only = chunk, 4 * chunk, written_only
        self.shrink_at = shrink_at
        self.slot_sizes = sorted({*(slot_sizes or range(4, max_slots, 4)), max_slots})
        if written_only:  # taken once: what is not written holds no memory
            self.slot_sizes, self.capacity = [max_slots], max(self.capacity, self.chunks(context))
        self.slots = self.slot_sizes[0]
        self.version = 0  # counts reallocations: tensors recorded into a CUDA graph moved
        self.peak_bytes = 0
        self.extents = [0] * self.slots  # per slot: the positions written, 0..extent-1
        self.claimed = [0] * self.slots  # per slot: positions whose memory is taken (`claim`)
        self.peak_written_bytes = 0
        self.step: StepPlan | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def plan(
        self,
        slots: slice | torch.Tensor | None,
        positions: torch.Tensor,
        kv_length: int,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Set where the next forward pass writes (`positions`, [rows, tokens], none at or past
        `kv_length`) and how much it reads; a ragged pass (`slots` None) gives each token's slot
        (`rows`, shaped as `positions`) and reads each row's slot itself."""
        self.reserve(kv_length)
        if rows is None:
            if isinstance(slots, slice):
                rows = torch.arange(slots.start, slots.stop, device=positions.device)
            else:
                rows = slots
            rows = rows[:, None].expand_as(positions)
        self.step = StepPlan(slots, positions, rows, kv_length)

    def wrote(self, slots: Iterable[int], ends: Iterable[int]) -> None:
        """Note that each of `slots` is written up to position `end` - 1 (what a resize keeps)."""
        for slot, end in zip(slots, ends, strict=True):
            self.extents[slot] = max(self.extents[slot], end)
        self.peak_written_bytes = max(self.peak_written_bytes, self.written_bytes)

    def forget(self, slot: int, start: int = 0) -> None:
        """The slot's positions from `start` on hold nothing the rows need: give their memory back."""
        if max(self.extents[slot], self.claimed[slot]) > start:
            for layer in self.layers:
                layer.forget(slot, start)
            self.extents[slot] = min(self.extents[slot], start)
            self.claimed[slot] = min(self.claimed[slot], start)

    def claim(self, slots: Iterable[int], stops: Iterable[int]) -> None:
        """Before a pass writes each slot's positions up to `stops` - 1: take the memory of the
        slot's unwritten positions up to there, to the end of their chunk (`written_only`; see
        mapped_zeros.claim), so that a chunk's pages are taken in one call, not a fault each. A decode
        pass reads every slot up to its longest row, which maps a shorter row's next pages to the
        zero page: they would be copied at their first write."""
        if not self.written_only or not self.layers[0].is_initialized:
            return
        taken = False
        for slot, stop in zip(slots, stops, strict=True):
            start, end = max(self.claimed[slot], self.extents[slot]), min(self.chunks(stop), self.capacity)
            if end > start:
                for layer in self.layers:
                    layer.claim(slot, start, end)
                self.claimed[slot], taken = end, True
        if taken:  # (most passes take nothing: a chunk lasts 64 steps)
            self.peak_written_bytes = max(self.peak_written_bytes, self.written_bytes)

    def reserve(self, length: int) -> None:
        """Make room for `length` tokens in every slot (in whole chunks, copying what is there)."""
        if length > self.capacity:
            wanted = max(length, self._grown())
            self._resize(self.slots, self.chunks(wanted))

    def fit(self, rows: int, length: int, most: int | None = None) -> None:
        """Hold at least `rows` slots of `length` tokens, growing capacity by at least a quarter
        (within `most` cells, if given; twice `written_only`); give memory back where these rows
        need at most 1/`shrink_at` of what is held (never `written_only`). Contents of slots below
        `rows` and of their first `length` positions are kept."""
        slots = next(size for size in self.slot_sizes if size >= rows)
        capacity = self.chunks(max(length, 1))
        most = None if self.written_only else most  # the budget bounds what rows write, not this
        if slots > self.slots or capacity > self.capacity:  # (slots past the rows hold nothing)
            if most is None or self.slots * capacity <= most:
                # Growing one size keeps the other: every resize copies what the slots hold (0.44 s
                # for a full 0.9 GB on the development machine), and rows that just left are soon
                # replaced.
                slots = max(slots, self.slots)
            roomy = self._grown() if capacity > self.capacity else self.capacity
            if most is not None:
                roomy = min(roomy, most // slots // self.chunk * self.chunk)
            self._resize(slots, max(capacity, roomy))
        elif not self.written_only and self.shrink_at * slots * capacity <= self.slots * self.capacity:
            self._resize(slots, capacity)

    def _grown(self) -> int:
        """The least capacity a growth takes: a quarter more, or twice as much `written_only`."""
        return 2 * self.capacity if self.written_only else self.capacity + self.capacity // 4

    def cells(self, needs: list[int]) -> int:
        """KV positions the memory holds for rows of these needs (tokens each): slots x the longest,
        or, `written_only`, each row's own in whole chunks."""
        if self.written_only:
            return sum(self.chunks(max(need, 1)) for need in needs)
        slots = next(size for size in self.slot_sizes if size >= len(needs))
        return slots * self.chunks(max(needs, default=1))

    def chunks(self, length: int) -> int:
        """`length` tokens rounded up to whole chunks."""
        return -(-length // self.chunk) * self.chunk

    @torch.inference_mode()
    def _resize(self, slots: int, capacity: int) -> None:
        self.extents = [min(extent, capacity) for extent in self.extents[:slots]]
        self.extents += [0] * (slots - len(self.extents))
        self.claimed = list(self.extents)  # the new tensors hold what is copied into them
        self.slots, self.capacity = slots, capacity
        self.version += 1
        for layer in self.layers:
            layer.resize(slots, capacity, self.extents)
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    @torch.inference_mode()
    def copy(self, source: int, target: int, start: int, stop: int) -> None:
        """Copy positions start..stop-1 of a slot into another slot (to keep occupied slots
        contiguous, or to share the KV of a prompt's start that both slots' tokens agree on)."""
        for layer in self.layers:
            layer.copy(source, target, start, stop)
        self.wrote([target], [stop])

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    @property
    def written_bytes(self) -> int:
        """The bytes of the slots' written (or claimed) positions, in whole pages on a CPU (what the
        memory holds there; on other devices the whole cache is held, `nbytes`)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers or layers[0].keys.device.type != "cpu":
            return self.nbytes
        # Per layer its heads and one position of one head in bytes: usually the same for all.
        shapes = Counter(
            (layer.keys.shape[1], layer.keys.shape[3] * layer.keys.element_size()) for layer in layers
        )
        total = 0
        for (heads, row), count in shapes.items():
            held = map(max, self.extents, self.claimed)
            pages = sum(-(-extent * row // mmap.PAGESIZE) for extent in held)
            total += count * 2 * heads * pages * mmap.PAGESIZE
        return total
