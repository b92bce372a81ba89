"""What the memory plan reads, without loading weights: a model's architecture figures (the preset's,
or counted on the meta device from its config.json) and the free memory of the devices it would use."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import convert_file_size_to_int

from runner.config.schema import ArchitectureConfig, DeviceKind, RunConfig
from runner.errors import ConfigError, ModelLoadError
from runner.model.hardware import Hardware


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
