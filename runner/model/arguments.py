"""Config -> transformers load arguments: a pure function of the run config and the hardware; loads
nothing. The draft model of speculative decoding gets its arguments here too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from runner.config.presets import model_preset
from runner.config.schema import (
    DeviceKind,
    ModelSource,
    Precision,
    QuantConfig,
    QuantMethod,
    RunConfig,
)
from runner.errors import ConfigError
from runner.model.embedded import embedded_dir
from runner.model.hardware import Hardware

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}

DTYPE_NAMES = {dtype: precision.value for precision, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TransformersArguments:
    """What the run passes to transformers to load the model: `pipeline(**load)`, or
    `AutoModelForCausalLM.from_pretrained` with the same values. Decoding settings are
    runner.engines.protocol.Sampling's."""

    load: dict[str, Any]


def resolve_dtype(precision: Precision, hardware: Hardware) -> torch.dtype:
    """`auto`: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU."""
    if precision is not Precision.auto:
        return DTYPES[precision]
    if hardware.cuda_devices == 0:
        return torch.float32
    return torch.bfloat16 if hardware.cuda_bf16 else torch.float16


def transformers_arguments(
    cfg: RunConfig, hardware: Hardware, embedded_dir: Path | None = None
) -> TransformersArguments:
    """Translate the run config into load and generate arguments; loads nothing.

    Args:
        cfg: the typed run config.
        hardware: what `detect_hardware()` found (tests pass one in).
        embedded_dir: the converted checkpoint of an embedded model (`embedded_checkpoint`).
    """
    model = cfg.model
    dtype = resolve_dtype(cfg.precision.dtype, hardware)
    load: dict[str, Any] = {"task": "text-generation"}
    if model.source is ModelSource.hub:
        load.update(model=model.id, revision=model.revision)
    elif model.source is ModelSource.local:
        load["model"] = str(Path(model.path).expanduser().absolute())  # never read as a hub repo id
    else:
        if embedded_dir is None:
            raise ValueError("an embedded model needs its converted checkpoint directory")
        load["model"] = str(embedded_dir)
    load.update(
        trust_remote_code=model.trust_remote_code,
        dtype=dtype,
        device_map=_device_map(cfg, hardware),
    )
    model_kwargs: dict[str, Any] = {}
    quantization = _quantization_config(cfg, dtype, hardware)
    if quantization is not None:
        model_kwargs["quantization_config"] = quantization
    if cfg.device.max_memory:
        model_kwargs["max_memory"] = {
            int(key) if str(key).isdigit() else key: value for key, value in cfg.device.max_memory.items()
        }
    if model_kwargs:
        load["model_kwargs"] = model_kwargs
    return TransformersArguments(load=load)


def _device_map(cfg: RunConfig, hardware: Hardware) -> str:
    kind = cfg.device.kind
    if kind is DeviceKind.cuda and hardware.cuda_devices == 0:
        raise ConfigError("device=cuda but no CUDA GPU is visible: use device=auto or device=cpu")
    if kind is DeviceKind.cuda:
        # Several GPUs named in max_memory: let accelerate split the model over them (no CPU key, so
        # nothing is offloaded); otherwise the whole model goes to the current GPU.
        return "auto" if cfg.device.max_memory else "cuda"
    return kind.value


def _quantization_config(cfg: RunConfig, dtype: torch.dtype, hardware: Hardware) -> BitsAndBytesConfig | None:
    quant = cfg.quant
    if quant.method is QuantMethod.none:
        return None
    if quant.method is QuantMethod.int8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if quant.compute_dtype is Precision.auto else resolve_dtype(quant.compute_dtype, hardware)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type.value,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def draft_model(cfg: RunConfig, hardware: Hardware) -> tuple[RunConfig, dict[str, Any]]:
    """The draft model's run config and load arguments: the main model's device and dtype, never
    quantized (a draft is small)."""
    draft_cfg = dataclasses.replace(
        cfg, model=model_preset(cfg.generation.assistant_model), quant=QuantConfig(method=QuantMethod.none)
    )
    return draft_cfg, transformers_arguments(draft_cfg, hardware, embedded_dir(draft_cfg)).load
