"""This run's memory plan (runner/planning/plan.py's arithmetic) from its config, its model's figures
and its devices, with the precision/quant alternatives to advise."""

from __future__ import annotations

import dataclasses

import torch

from runner.config.schema import ArchitectureConfig, DeviceKind, QuantMethod, RunConfig, VllmEngineConfig
from runner.model.arguments import DTYPE_NAMES, draft_model, resolve_dtype
from runner.model.hardware import Hardware
from runner.planning.figures import architecture, plan_devices
from runner.planning.plan import (
    USABLE_FRACTION,
    MemoryPlan,
    kv_budget,
    kv_bytes_per_token,
    make_plan,
    weights_bytes,
)


def memory_plan(
    cfg: RunConfig,
    hardware: Hardware,
    arch: ArchitectureConfig,
    batch_rows: int,
    context_tokens: int,
    context_from: str,
) -> MemoryPlan:
    """This run's memory plan (see runner/plan.py), with precision/quant alternatives to advise."""
    dtype = resolve_dtype(cfg.precision.dtype, hardware)
    alternatives = {}
    for other in [dtype] + ([torch.bfloat16] if dtype == torch.float32 else []):
        for method in QuantMethod:
            if other == dtype and method is cfg.quant.method:
                continue
            name = f"precision={DTYPE_NAMES[other]} " if other != dtype else ""
            name += f"quant={method.value}"
            alternatives[name] = (other.itemsize, dataclasses.replace(cfg.quant, method=method))
    devices, offload = plan_devices(cfg, hardware)
    draft_bytes = 0
    if cfg.generation.assistant_model:  # its weights, and its own KV cache for the one row
        draft_cfg, load = draft_model(cfg, hardware)
        draft = architecture(draft_cfg, load)
        draft_bytes = weights_bytes(draft, dtype.itemsize, draft_cfg.quant)
        draft_bytes += min(context_tokens, draft.context_length) * kv_bytes_per_token(draft, dtype.itemsize)
    return make_plan(
        model=cfg.model.name,
        arch=arch,
        dtype=DTYPE_NAMES[dtype],
        dtype_bytes=dtype.itemsize,
        quant=cfg.quant,
        batch_rows=batch_rows,
        context_tokens=context_tokens,
        context_from=context_from,
        devices=devices,
        offload_bytes=offload,
        alternatives=alternatives,
        draft_bytes=draft_bytes,
        usable_fraction=_usable_fraction(cfg, hardware),
        kv_budget_bytes=_kv_budget(cfg, devices, weights_bytes(arch, dtype.itemsize, cfg.quant)),
    )


def _kv_budget(cfg: RunConfig, devices: dict[str, int], weights: int) -> int | None:
    """engine.kv_cache_gb of the continuous engine, resolved as it will be (no other engine has one)."""
    setting = getattr(cfg.engine, "kv_cache_gb", None)
    return kv_budget(setting, devices["cpu"] if set(devices) == {"cpu"} else None, weights)


def _usable_fraction(cfg: RunConfig, hardware: Hardware) -> float:
    """engine=vllm reserves its own share: engine.gpu_memory_utilization of a GPU, and on a CPU at
    most half of the free memory (as runner/engines/vllm.py asks of it); other engines 90%."""
    if not isinstance(cfg.engine, VllmEngineConfig):
        return USABLE_FRACTION
    share = cfg.engine.gpu_memory_utilization
    on_cpu = hardware.cuda_devices == 0 or cfg.device.kind is DeviceKind.cpu
    return min(share, 0.5) if on_cpu else share
