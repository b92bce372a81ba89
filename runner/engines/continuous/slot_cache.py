"""A KV cache of fixed slots for the continuous engine, as a transformers `Cache`.

Each layer holds keys and values of shape [slots, kv_heads, capacity, head_dim], allocated once (on
the layer's own device, at its first write) and grown by whole chunks when a row needs more room,
never per step. Before each forward pass the engine says which slots the batch rows are and where
each row's new tokens go (`plan`); the model's attention layers then write there and read the
slots' first `kv_length` positions back. Masks and positions are the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class StepPlan:
    """Where one forward pass reads and writes: `slots` is a contiguous range from slot 0 (read as a
    view, no copy) or an index tensor (read as a gathered copy); `positions` is [rows, tokens] and
    `rows` the slot of each of those tokens."""

    slots: slice | torch.Tensor
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
        self.keys = key_states.new_zeros((slots, key_states.shape[1], capacity, key_states.shape[3]))
        self.values = value_states.new_zeros((slots, value_states.shape[1], capacity, value_states.shape[3]))
        self.is_initialized = True

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

    def grow(self, capacity: int) -> None:
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def copy(self, source: int, target: int, start: int, stop: int) -> None:
        if self.is_initialized:
            self.keys[target, :, start:stop] = self.keys[source, :, start:stop]
            self.values[target, :, start:stop] = self.values[source, :, start:stop]


class SlotCache(Cache):
    """`slots` rows of KV storage, `capacity` tokens each. Capacity grows in whole chunks and by at
    least a quarter, so the copies that growing takes add up to a few times the final size."""

    def __init__(self, num_layers: int, slots: int, chunk: int = 64):
        self.slots, self.chunk, self.capacity = slots, chunk, 4 * chunk
        self.step: StepPlan | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    def plan(self, slots: slice | torch.Tensor, positions: torch.Tensor, kv_length: int) -> None:
        """Set where the next forward pass writes (`positions`, [rows, tokens], none at or past
        `kv_length`) and how much it reads."""
        self.reserve(kv_length)
        if isinstance(slots, slice):
            rows = torch.arange(slots.start, slots.stop, device=positions.device)
        else:
            rows = slots
        self.step = StepPlan(slots, positions, rows[:, None].expand_as(positions), kv_length)

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Make room for `length` tokens in every slot (in whole chunks, copying what is there)."""
        if length <= self.capacity:
            return
        wanted = max(length, self.capacity + self.capacity // 4)
        self.capacity = -(-wanted // self.chunk) * self.chunk
        for layer in self.layers:
            layer.grow(self.capacity)

    @torch.inference_mode()
    def copy(self, source: int, target: int, start: int, stop: int) -> None:
        """Copy positions start..stop-1 of a slot into another slot (to keep occupied slots
        contiguous, or to share the KV of a prompt's start that both slots' tokens agree on)."""
        for layer in self.layers:
            layer.copy(source, target, start, stop)

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)
