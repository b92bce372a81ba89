"""Attention for the continuous engine: transformers' SDPA, except where it would copy the KV cache.

Grouped-query models (SmolLM2: 9 query heads over 3 KV heads) serve several query heads from one
key/value head. Given a mask, which the continuous engine always passes, transformers' SDPA path
repeats every KV head once per query head it serves before a prefill pass (`repeat_kv`): the pass
copies, then reads, three times the KV bytes it needs (the 5.19 that vLLM pins does so in decode
passes too). Here a decode pass (one token a row) takes each KV head's query heads as that head's
queries (transformers 5.24's `pack_gqa`, on every version), and a prefill pass on a CPU runs
SDPA's own `enable_gqa`, which reads each KV head once for its query heads, mask included, and
gives the same bits (measured: about twice as fast on a 512-token prefill). On CUDA a mask with
`enable_gqa` falls back to SDPA's math kernel, so a prefill there stays as transformers runs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "continuous_sdpa"


def grouped_query_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: [rows, heads, tokens, dim] in, [rows, tokens,
    heads, dim] out."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, tokens, dim = query.shape
    scale = kwargs.get("scaling")
    if tokens == 1:  # decode: each KV head's query heads as its queries, one mask row for them all
        grouped = query.reshape(rows, heads // groups, groups, dim)
        output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scale)
        return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None
    if query.device.type == "cpu":
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=True
        )
        return output.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_grouped_query_sdpa(model: Any) -> bool:
    """Run the model's attention through `grouped_query_sdpa` where it runs transformers' SDPA."""
    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, grouped_query_sdpa)
    model.set_attn_implementation(NAME)
    return True
