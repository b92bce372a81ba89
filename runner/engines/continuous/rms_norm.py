"""RMSNorm in one kernel: PyTorch's `rms_norm` in place of transformers' five operations (upcast,
square, mean, rsqrt, scale) for the norms of Llama-family models, two per layer and one at the end.

Only fp32 norms of the classes below are replaced: their arithmetic is `weight * x / sqrt(mean(x^2)
+ eps)`, and in fp32 PyTorch's CPU kernel gives the same bits (tests/test_engine.py compares the
logits). In half precision transformers rounds the normalised value before scaling it, so those
keep transformers' own code, as do Gemma's norms (`1 + weight`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

LLAMA_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def use_fused_rms_norm(model: Any) -> int:
    """Run the model's fp32 Llama-family RMSNorms as one kernel each; returns how many."""
    fused = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_NORMS and module.weight.dtype == torch.float32:
            epsilon = getattr(module, "variance_epsilon", None) or module.eps
            module.forward = functools.partial(_rms_norm, module.weight, epsilon)
            fused += 1
    return fused


def _rms_norm(weight: torch.Tensor, epsilon: float, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(hidden, weight.shape, weight, epsilon)
