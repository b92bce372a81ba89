"""One forward pass of the continuous engine: a batch of rows' tokens through the model into their
slots of the KV cache, with the positions and attention masks (sliding windows included) that the
slots' contents need; returns the logits of each row's last token. A Llama-family decoder runs op
by op (direct_layers.py), any other model through transformers' forward.

Prompt rows run ragged where the decoder runs op by op: their tokens end to end, unpadded, so the
layers' products (two thirds of a prefill pass) see only real tokens and one pass takes prompts of
any lengths; only attention runs row by row, each over its own slot. On the first 16 MT-bench
conversations (forced 64 tokens) that took the prefill from 10 passes and 1,646 tokens, 13% of
them padding, in 1.35 s, to 6 passes in 1.06 s. A step's decode tokens join that pass (`mixed`),
so one read of the weights serves both.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from runner.engines.continuous.attention import use_grouped_query_sdpa
from runner.engines.continuous.direct_layers import RaggedPass, RowSpan, direct_layers
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
        self, input_ids: list[list[int]], starts: list[int], slots: slice | list[int], logits: bool = True
    ) -> torch.Tensor | None:
        """Write row i's tokens at positions starts[i].. of its slot (`slots[i]`, or the slice's
        i-th) and return the logits of each row's last token, [rows, vocab] (None where `logits` is
        false: a prefill's are not read).

        Rows of one token (decode) are one batch: a slice of slots from 0 is read as a view of the
        cache, a list as a gathered copy. Rows of a prompt run ragged where the decoder runs op by
        op (`ragged`), else as one batch of equal lengths. The index tensors are made once here,
        from the host's lists: nothing in the layers waits on the device.
        """
        rows = list(range(slots.start, slots.stop)) if isinstance(slots, slice) else slots
        if self.ragged and max(len(ids) for ids in input_ids) > 1:
            return self.mixed(input_ids, starts, rows, [], [], logits)
        tokens = len(input_ids[0])
        self.cache.wrote(rows, [start + tokens for start in starts])
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(
            tokens, device=self.device
        )
        if not isinstance(slots, slice):
            slots = torch.tensor(slots, device=self.device)
        kv_length = max(starts) + tokens
        self.cache.plan(slots, positions, kv_length)
        return self.run(torch.tensor(input_ids, device=self.device), positions, kv_length, logits)

    @property
    def ragged(self) -> bool:
        """Whether rows of any lengths run in one pass, unpadded (`mixed`)."""
        return self.direct is not None

    def mixed(
        self,
        prompt_ids: list[list[int]],
        prompt_starts: list[int],
        prompt_slots: list[int],
        decode_ids: list[list[int]],
        decode_starts: list[int],
        logits: bool = True,
    ) -> torch.Tensor | None:
        """One ragged pass: one token for each of slots 0..len(decode_ids)-1 (a decode pass's rows,
        which attend together as there) and prompt chunks of any lengths for `prompt_slots`, all
        tokens end to end, so the layers' products see only real tokens and read the weights once
        for both. Each prompt row attends to its own slot's first start + tokens positions with its
        own causal mask, so its result does not depend on the rows beside it. A decode row's token
        sees what this pass writes before it in its slot (the end of its prompt, say).

        Returns the decode rows' logits, [rows, vocab], where there are any; else each prompt
        row's last token's (None unless `logits`)."""
        decoding = len(decode_ids)
        self.cache.wrote(range(decoding), [start + 1 for start in decode_starts])
        self.cache.wrote(
            prompt_slots, [start + len(ids) for start, ids in zip(prompt_starts, prompt_ids, strict=True)]
        )
        positions = [torch.tensor(decode_starts, dtype=torch.long, device=self.device)]
        owners, spans, offset = list(range(decoding)), [], decoding
        for ids, start, slot in zip(prompt_ids, prompt_starts, prompt_slots, strict=True):
            tokens = len(ids)
            keys = torch.arange(start + tokens, device=self.device)
            at = torch.arange(start, start + tokens, device=self.device)
            mask = self.additive(keys <= at[:, None])[None, None]
            spans.append(RowSpan(offset, offset + tokens, slot, start + tokens, mask))
            positions.append(at)
            owners += [slot] * tokens
            offset += tokens
        positions = torch.cat(positions)[None]
        decode_mask = None
        if decoding:
            decode_mask = self.masks(positions[:, :decoding].T, max(decode_starts) + 1)["full_attention"]
        kv_length = max(span.kv_length for span in spans) if spans else 0
        kv_length = max(kv_length, max(decode_starts, default=-1) + 1)
        self.cache.plan(None, positions, kv_length, torch.tensor(owners, device=self.device)[None])
        flat = [ids[0] for ids in decode_ids] + [token for ids in prompt_ids for token in ids]
        input_ids = torch.tensor(flat, device=self.device)[None]
        last = list(range(decoding)) or [span.stop - 1 for span in spans]
        ragged = RaggedPass(decoding, decode_mask, spans, torch.tensor(last, device=self.device))
        return self.direct(input_ids, positions, ragged, self.cache, logits or decoding > 0)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_length: int, logits: bool = True
    ) -> torch.Tensor | None:
        """The pass the cache's plan describes: logits of each row's last token, [rows, vocab]."""
        masks = self.masks(positions, kv_length)
        if self.direct is not None:
            return self.direct(input_ids, positions, masks["full_attention"], self.cache, logits)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                position_ids=positions,
                attention_mask=masks if len(self.layer_types) > 1 else masks["full_attention"],
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_argument: self.cache},
            )
        return output.logits[:, -1] if logits else None

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
        return {name: self.additive(m) for name, m in allowed.items()}

    def additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask as an additive one in the model's dtype: made once a pass, since eager
        attention needs it this way and SDPA takes it as it is."""
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
