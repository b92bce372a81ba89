"""One forward pass of the continuous engine: a batch of rows' tokens through the model into their
slots of the KV cache, with the positions and attention masks (sliding windows included) that the
slots' contents need; returns the logits of each row's last token. A Llama-family decoder runs op
by op (direct_layers.py), any other model through transformers' forward.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from runner.engines.continuous.attention import use_grouped_query_sdpa
from runner.engines.continuous.direct_layers import direct_layers
from runner.engines.continuous.slot_cache import SlotCache

ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


class Forward:
    """The model and its slot cache, run one pass at a time."""

    def __init__(self, model: Any, cache: SlotCache):
        text = model.config.get_text_config()
        self.layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if not self.layer_types <= ATTENTION_LAYERS:
            raise ValueError(
                f"engine=continuous runs attention-only models; this one has {sorted(self.layer_types)} "
                "layers: use engine=pipeline"
            )
        self.model, self.cache = model, cache
        use_grouped_query_sdpa(model)
        self.direct = direct_layers(model, self.layer_types)  # None: transformers' forward runs
        self.sliding_window = getattr(text, "sliding_window", None)
        self.device = model.device
        # transformers 5.24 renamed the cache argument from past_key_values to cache.
        self.cache_argument = (
            "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        )

    def __call__(
        self, input_ids: list[list[int]], starts: list[int], slots: slice | list[int]
    ) -> torch.Tensor:
        """Write row i's tokens at positions starts[i].. of its slot (`slots[i]`, or the slice's
        i-th) and return the logits of each row's last token, [rows, vocab].

        A slice of slots from 0 is read as a view of the cache; a list as a gathered copy. The index
        tensors are made once here, from the host's lists: nothing in the layers waits on the device.
        """
        tokens = len(input_ids[0])
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            tokens, device=self.device
        )
        rows = range(slots.start, slots.stop) if isinstance(slots, slice) else slots
        self.cache.wrote(rows, [start + tokens for start in starts])
        if not isinstance(slots, slice):
            slots = torch.tensor(slots, device=self.device)
        kv_length = max(starts) + tokens
        self.cache.plan(slots, positions, kv_length)
        return self.run(torch.tensor(input_ids, device=self.device), positions, kv_length)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        """The pass the cache's plan describes: logits of each row's last token, [rows, vocab]."""
        masks = self.masks(positions, kv_length)
        if self.direct is not None:
            return self.direct(input_ids, positions, masks["full_attention"], self.cache)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=masks if len(self.layer_types) > 1 else masks["full_attention"],
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_argument: self.cache},
            )
        return output.logits[:, -1]

    def masks(self, positions: torch.Tensor, kv_length: int) -> dict[str, torch.Tensor]:
        """Additive masks per layer type, [rows, 1, tokens, keys]: a token sees the keys up to its
        position (within the window, for sliding layers)."""
        keys = torch.arange(kv_length, device=self.device)
        visible = keys[None, None, None, :] <= positions[:, None, :, None]
        allowed = {"full_attention": visible}
        if "sliding_attention" in self.layer_types and self.sliding_window:
            allowed["sliding_attention"] = visible & (
                keys > positions[:, None, :, None] - self.sliding_window
            )
        # Additive, made once a pass: eager attention needs them this way, and SDPA takes them as they are.
        dtype = self.model.dtype
        return {
            name: torch.zeros(m.shape, dtype=dtype, device=self.device).masked_fill(
                ~m, torch.finfo(dtype).min
            )
            for name, m in allowed.items()
        }
