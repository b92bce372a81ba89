"""The decoder of a Llama-family model run op by op, for the continuous engine's passes.

The same operations run in the same order on the same tensors as in transformers' forward (so on
a CPU the logits are the same bits; tests/test_engine.py compares them), straight from the layers'
weights: the joined q/k/v and gate/up products (fused_projections.py) are sliced where the model
would call each projection, and the final norm and the head see only each row's last token.

Why: around the operations, transformers' model and layer forwards route keyword arguments, check
masks and positions the engine has already made, record outputs and call each module through its
hooks. The layers here also rotate q's and k's heads in one go (elementwise, so the same bits).
benchmarks/direct_layers.py times both paths on the embedded model: a 16-row decode pass is
1.08-1.17x as fast (27.2 against 29.4 ms at 64 tokens of context, 30.6 against 35.6 at 200), a
prefill pass 1.01-1.25x.

Only models that are exactly this shape take the path, else transformers' forward runs: Llama-family
decoder layers (their rotary embedding `x * cos + rotate_half(x) * sin`) with every projection
group joined, full attention in every layer, and no hook on any module (accelerate's offloading
included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from runner.engines.continuous.fused_projections import JoinedProduct

LLAMA_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


class LayerOps(NamedTuple):
    """One decoder layer's operations, as the functions its modules run."""

    input_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], torch.Tensor]  # the joined q/k/v product
    attention: Any  # the attention module, which the attention function takes
    o_proj: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    gate_up: Callable[[torch.Tensor], torch.Tensor]  # the joined gate/up product
    act: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]


class RowSpan(NamedTuple):
    """One row of a ragged pass: its tokens are start..stop-1 of the pass, written into `slot`,
    which it reads up to `kv_length`, with `mask` ([1, 1, tokens, kv_length], additive)."""

    start: int
    stop: int
    slot: int
    kv_length: int
    mask: torch.Tensor


class RaggedPass(NamedTuple):
    """A pass of rows of any lengths, their tokens end to end as one row: first `decoding` rows of
    one token each, in slots 0..decoding-1, which attend together as a decode pass's rows do
    (`decode_mask`, [decoding, 1, 1, keys]), then `spans`, each attending to its own slot. `last`:
    the tokens whose logits the pass returns, in order."""

    decoding: int
    decode_mask: torch.Tensor | None
    spans: list[RowSpan]
    last: torch.Tensor


class DirectLayers:
    """`model`'s decoder as one function of tokens, positions, mask and cache (see the module
    docstring); build it with `direct_layers`, which says whether the model fits."""

    def __init__(self, model: Any):
        decoder = model.model
        self.embed, self.rotary, self.norm, self.head = (
            decoder.embed_tokens,
            decoder.rotary_emb,
            decoder.norm,
            model.lm_head,
        )
        # Each module's own forward: direct_layers made sure no hook wraps it.
        self.layers = [
            LayerOps(
                layer.input_layernorm.forward,
                layer.self_attn.q_proj_k_proj_v_proj.joined.forward,
                layer.self_attn,
                layer.self_attn.o_proj.forward,
                layer.post_attention_layernorm.forward,
                layer.mlp.gate_proj_up_proj.joined.forward,
                layer.mlp.act_fn.forward,
                layer.mlp.down_proj.forward,
            )
            for layer in decoder.layers
        ]
        first = decoder.layers[0]
        self.head_dim = first.self_attn.head_dim
        self.query_heads = first.self_attn.q_proj_k_proj_v_proj.bounds[1] // self.head_dim
        self.rotated_heads = first.self_attn.q_proj_k_proj_v_proj.bounds[2] // self.head_dim  # q's and k's
        self.intermediate = first.mlp.gate_proj_up_proj.bounds[1]
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, None)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | RaggedPass,
        cache: Any,
        logits: bool = True,
    ) -> torch.Tensor | None:
        """Logits of each row's last token, [rows, vocab] (None unless `logits`): `input_ids` and
        `positions` are [rows, tokens], `mask` the additive attention mask, `cache` the slot cache
        planned for this pass. A ragged pass is one row of every row's tokens end to end, and
        `mask` says whose they are and which tokens' logits to return (`RaggedPass`)."""
        rows, tokens = input_ids.shape
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [rows, tokens, 1, head_dim]: shared by the heads
        half, queries, rotated = self.head_dim // 2, self.query_heads, self.rotated_heads
        for index, ops in enumerate(self.layers):
            # [rows, tokens, heads, head_dim]: q's heads, then k's, then v's.
            qkv = ops.qkv(ops.input_norm(hidden)).view(rows, tokens, -1, self.head_dim)
            # Rotary embedding of q and k at once: transformers' `q * cos + rotate_half(q) * sin`.
            qk = qkv[:, :, :rotated]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            key, value = cache.update(
                qk[:, :, queries:].transpose(1, 2), qkv[:, :, rotated:].transpose(1, 2), index
            )
            query = qk[:, :, :queries].transpose(1, 2)
            if isinstance(mask, RaggedPass):
                output = self._attend_ragged(ops, query, key, value, mask)
            else:
                output, _ = self.attention(
                    ops.attention, query, key, value, mask, dropout=0.0, scaling=ops.attention.scaling
                )
            hidden = hidden + ops.o_proj(output.reshape(rows, tokens, -1).contiguous())
            gate_up = ops.gate_up(ops.post_norm(hidden))
            hidden = hidden + ops.down(
                ops.act(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :]
            )
        if not logits:
            return None
        if isinstance(mask, RaggedPass):
            return self.head(self.norm(hidden[0].index_select(0, mask.last)))
        return self.head(self.norm(hidden[:, -1:]))[:, -1]

    def _attend_ragged(
        self, ops: LayerOps, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ragged: RaggedPass
    ) -> torch.Tensor:
        """A ragged pass's attention, [1, tokens, heads, head_dim]: `query` is [1, heads, tokens,
        head_dim], `keys` and `values` the layer's whole slot tensors."""
        outputs = []
        if rows := ragged.decoding:
            length = ragged.decode_mask.shape[-1]
            output, _ = self.attention(
                ops.attention,
                query[0, :, :rows, None].transpose(0, 1),  # [rows, heads, 1, head_dim]
                keys[:rows, :, :length],
                values[:rows, :, :length],
                ragged.decode_mask,
                dropout=0.0,
                scaling=ops.attention.scaling,
            )
            outputs.append(output.transpose(0, 1))  # [rows, 1, heads, head_dim] -> [1, rows, ...]
        for span in ragged.spans:
            output, _ = self.attention(
                ops.attention,
                query[:, :, span.start : span.stop],
                keys[span.slot : span.slot + 1, :, : span.kv_length],
                values[span.slot : span.slot + 1, :, : span.kv_length],
                span.mask,
                dropout=0.0,
                scaling=ops.attention.scaling,
            )
            outputs.append(output)
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def direct_layers(model: Any, layer_types: set[str]) -> DirectLayers | None:
    """`DirectLayers` for `model` where it is the shape they run (see the module docstring), else None."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layer_types != {"full_attention"} or not layers or not hasattr(model, "lm_head"):
        return None
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "norm")):
        return None
    hooked = (
        hasattr(module, "_hf_hook") or module._forward_hooks or module._forward_pre_hooks
        for module in model.modules()
    )
    if any(hooked):
        return None
    if ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, None) is None:
        return None
    for layer in layers:
        if type(layer).__name__ not in LLAMA_LAYERS:
            return None
        joined = (
            getattr(layer.self_attn, "q_proj_k_proj_v_proj", None),
            getattr(layer.mlp, "gate_proj_up_proj", None),
        )
        if not all(isinstance(product, JoinedProduct) for product in joined):
            return None
    return DirectLayers(model)
