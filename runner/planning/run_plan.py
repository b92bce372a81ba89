"""The memory plan of a run before any weights load: the model's architecture figures (read without
weights), the devices it would load onto, and the precision/quant alternatives to advise."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import convert_file_size_to_int

from runner.config.schema import (
    ArchitectureConfig,
    DeviceKind,
    ModelSource,
    QuantConfig,
    QuantMethod,
    RunConfig,
    model_preset,
)
from runner.errors import ConfigError, ModelLoadError
from runner.model.arguments import DTYPE_NAMES, resolve_dtype, transformers_arguments
from runner.model.embedded import embedded_checkpoint
from runner.model.hardware import Hardware
from runner.planning.plan import MemoryPlan, kv_bytes_per_token, make_plan, weights_bytes


def architecture(cfg: RunConfig, load: dict[str, Any]) -> ArchitectureConfig:
    """The preset's architecture figures, or those read from the checkpoint's config.json.

    Reading counts the parameters of the model built on the meta device: no weights are read.
    """
    if cfg.model.architecture is not None:
        return cfg.model.architecture
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(
            load["model"], revision=load.get("revision"), trust_remote_code=load["trust_remote_code"]
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not read the config of {load['model']!r} for the memory plan: {error} "
            "(or give its figures as model.architecture.*, as the hub presets do)"
        ) from error
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=load["trust_remote_code"])
    params = sum(parameter.numel() for parameter in skeleton.parameters())
    text = config.get_text_config()
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    active = None
    if experts and getattr(text, "num_experts_per_tok", None):
        expert_params = sum(p.numel() for name, p in skeleton.named_parameters() if ".experts." in name)
        active = params - expert_params + expert_params * text.num_experts_per_tok // experts
    heads = text.num_attention_heads
    return ArchitectureConfig(
        params=params,
        active_params=active,
        hidden_size=text.hidden_size,
        layers=text.num_hidden_layers,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        context_length=text.max_position_embeddings,
        vocab_size=text.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def plan_devices(cfg: RunConfig, hardware: Hardware) -> tuple[dict[str, int], int]:
    """Free bytes of each device the model would load onto, and the CPU bytes device_map="auto"
    may offload layers into; device.max_memory caps both."""
    try:
        caps = {str(key): convert_file_size_to_int(value) for key, value in cfg.device.max_memory.items()}
    except ValueError as error:
        raise ConfigError(f"device.max_memory: {error}") from None
    gpus = {
        f"cuda:{index}": min(free, caps.get(str(index), free))
        for index, free in enumerate(hardware.cuda_free)
    }
    cpu = {"cpu": min(hardware.cpu_free, caps.get("cpu", hardware.cpu_free))}
    kind = cfg.device.kind
    if kind is DeviceKind.cpu or not gpus:
        return cpu, 0
    if kind is DeviceKind.cuda and not caps:
        return {"cuda:0": gpus["cuda:0"]}, 0
    if caps and any(key != "cpu" for key in caps):  # max_memory names the GPUs to use
        gpus = {name: free for name, free in gpus.items() if name.removeprefix("cuda:") in caps}
    return gpus, cpu["cpu"] if kind is DeviceKind.auto else 0


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
    )


def draft_model(cfg: RunConfig, hardware: Hardware) -> tuple[RunConfig, dict[str, Any]]:
    """The draft model's run config and load arguments: the main model's device and dtype, never
    quantized (a draft is small)."""
    draft_cfg = dataclasses.replace(
        cfg, model=model_preset(cfg.generation.assistant_model), quant=QuantConfig(method=QuantMethod.none)
    )
    return draft_cfg, transformers_arguments(draft_cfg, hardware, embedded_dir(draft_cfg)).load


def embedded_dir(cfg: RunConfig) -> Path | None:
    """The converted checkpoint of an embedded model (converted now if needed); None for others."""
    if cfg.model.source is not ModelSource.embedded:
        return None
    return embedded_checkpoint(cfg.model.package, Path(cfg.cache_dir).expanduser())
