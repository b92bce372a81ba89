"""The decoder of a Llama-family model run op by op, for the continuous engine's passes.

Why: around the operations, transformers' model and layer forwards route keyword arguments, check
masks and positions the engine has already made, record outputs and call each module through its
hooks. On the embedded model that is 2 of a 16-row decode pass's 37 ms, and a quarter of a prefill
pass (16 rows of 60 tokens: 0.75 s through transformers' forward, 0.54 s here).
Here the same operations run in the same order on the same tensors (so the logits are the same
bits; tests/test_engine.py compares them with transformers' own forward), straight from the
layers' weights: the joined q/k/v and gate/up products (fused_projections.py) are sliced where the
model would call each projection, and the final norm and the head see only each row's last token.

Only models that are exactly this shape take the path, else transformers' forward runs: Llama-family
decoder layers with every projection group joined, full attention in every layer, and no module
under an accelerate hook (offloading).
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from runner.engines.continuous.fused_projections import JoinedProduct

LLAMA_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


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
        self.layers = list(decoder.layers)
        first = self.layers[0]
        self.rotate = inspect.getmodule(type(first)).apply_rotary_pos_emb
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(model.config._attn_implementation, None)
        self.heads = model.config.get_text_config().num_attention_heads

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any):
        """Logits of each row's last token, [rows, vocab]: `input_ids` and `positions` are [rows,
        tokens], `mask` the additive attention mask, `cache` the slot cache planned for this pass."""
        rows, tokens = input_ids.shape
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, positions)
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            shape = (rows, tokens, -1, attention.head_dim)
            qkv = _products(attention.q_proj_k_proj_v_proj, layer.input_layernorm(hidden))
            query, key, value = (product.view(shape).transpose(1, 2) for product in qkv)
            query, key = self.rotate(query, key, cos, sin)
            key, value = cache.update(key, value, index)
            output, _ = self.attention(
                attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling
            )
            hidden = hidden + attention.o_proj(output.reshape(rows, tokens, -1).contiguous())
            gate, up = _products(mlp.gate_proj_up_proj, layer.post_attention_layernorm(hidden))
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.head(self.norm(hidden[:, -1:]))[:, -1]


def direct_layers(model: Any, layer_types: set[str]) -> DirectLayers | None:
    """`DirectLayers` for `model` where it is the shape they run (see the module docstring), else None."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layer_types != {"full_attention"} or not layers or not hasattr(model, "lm_head"):
        return None
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "rotary_emb", "norm")):
        return None
    if any(hasattr(module, "_hf_hook") for module in model.modules()):
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


def _products(joined: JoinedProduct, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Each member's columns of a joined product of `inputs`, as the member's own output."""
    product = joined.joined(inputs)
    bounds = joined.bounds
    return [product[..., start:stop] for start, stop in itertools.pairwise(bounds)]
