"""fp32 linear layers on a CPU through oneDNN, with weights packed once into its blocked layout.

Why: at the small row counts of decoding (one token per row) MKL's GEMM streams the weights at a
fraction of the memory bandwidth on some CPUs, and oneDNN on plain weights re-blocks them on every
call; weights packed once skip both costs (the README's "On a CPU" has the measured figures).
Results agree with PyTorch's to float rounding, and a row's result does not depend on the rows
beside it. Only plain `nn.Linear` layers with fp32 weights on the CPU are packed; quantized,
half-precision and GPU layers are left as they are.

Memory: oneDNN keeps every shape's compiled kernels in two caches of 1,024 entries by default, and a
continuous engine's passes come in many shapes (rows x tokens): on a 1,000-conversation replay of
the embedded model they grew to ~0.9 GB. Both are bounded here (CACHED_SHAPES each, ~0.1 GB), unless
the environment already sets them. A packed weight replaces the plain one, except where the plain
one is shared with another module (an lm_head tied to the embeddings keeps both). Weights memory-
mapped from a safetensors file give their resident pages back as they are packed, so the process
never holds both copies; tied embeddings then read back from the file only the rows they look up.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from runner.engines.continuous.mapped_zeros import give_back

# Entries of oneDNN's kernel caches: a decode pass's five linear shapes at a dozen row counts.
CACHED_SHAPES = 64


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def use_onednn_linear(model: Any, rows: int) -> int:
    """Pack the model's fp32 CPU `nn.Linear` weights for oneDNN, tuned for `rows` rows a pass (any
    row count works); returns how many layers were packed."""
    if not onednn_available():
        return 0
    bound_kernel_caches()
    shared = {
        parameter.data_ptr()
        for module in model.modules()
        if type(module) is not torch.nn.Linear
        for parameter in module.parameters(recurse=False)
    }
    mapped = file_mappings()
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (
            type(module) is torch.nn.Linear
            and not hasattr(module, "_hf_hook")  # accelerate's offloading hooks own forward
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
        ):
            continue
        blocked = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        release_pages(weight, mapped)
        if weight.data_ptr() not in shared:
            module.weight = torch.nn.Parameter(blocked, requires_grad=False)
        module.forward = functools.partial(_packed_linear, blocked, module.bias)
        packed += 1
    return packed


def bound_kernel_caches() -> None:
    """Bound oneDNN's primitive cache and ideep's computation cache (each read once, at its first
    use in the process) to CACHED_SHAPES entries, where the environment leaves them unset."""
    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(variable, str(CACHED_SHAPES))


def _packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's private file mappings (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/") and fields[1].endswith("p"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages under a weight memory-mapped from a file once it is packed: otherwise
    they count in the process's memory until the whole file is unmapped. Only whole pages inside
    the tensor, and only of private file mappings: a page touched again reads back from the file,
    which holds the same weights (inference never writes them), so nothing is lost."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if any(low <= start and end <= high for low, high in mapped):
        give_back(start, end)
