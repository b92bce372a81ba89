"""The memory plan: preset arithmetic against device sizes, the embedded model's real footprint,
and `plan=true` / the refusal as a user meets them."""

from __future__ import annotations

import json
import re

import pytest
from test_cli import run_cli

from runner.config.compose import to_run_config
from runner.config.schema import QuantConfig, QuantMethod
from runner.errors import ConfigError
from runner.model.hardware import Hardware
from runner.planning.figures import architecture
from runner.planning.plan import kv_bytes_per_token, weights_bytes
from runner.planning.run_plan import memory_plan

GB = 10**9
H100 = Hardware(cuda_devices=1, cuda_bf16=True, cuda_free=(80 * GB,), cpu_free=200 * GB)
TWO_H100 = Hardware(cuda_devices=2, cuda_bf16=True, cuda_free=(80 * GB, 80 * GB), cpu_free=200 * GB)
LAPTOP = Hardware(cpu_free=16 * GB)


def plan_for(compose_config, hardware, *overrides, rows=8, context=2048):
    cfg = to_run_config(compose_config(*overrides))
    return memory_plan(cfg, hardware, cfg.model.architecture, rows, context, "test")


def test_llama3_70b_in_bf16_is_refused_on_one_80gb_gpu_and_int4_is_named(compose_config):
    plan = plan_for(compose_config, H100, "model=llama3_70b", "device=cuda")
    assert plan.weights_bytes == 2 * 70_553_706_496 and plan.devices == {"cuda:0": 80 * GB}
    assert plan.verdict == "does_not_fit"
    # int8 (~73 GB) leaves no room in 90% of 80 GB; int4 is the least compressed choice that fits.
    assert plan.advice.startswith("quant=int4 needs ~39.5 GB")
    message = plan.refusal()
    assert (
        message.startswith("llama3_70b in bf16 needs ~141.1 GB for weights")
        and "cuda:0 has 72.0 GB" in message
    )
    assert plan_for(compose_config, H100, "model=llama3_70b", "device=cuda", "quant=int4").verdict == "fits"


def test_device_auto_counts_every_gpu_and_offloads_only_as_a_last_resort(compose_config):
    both = plan_for(compose_config, TWO_H100, "model=llama3_70b", "quant=int8")
    assert both.devices == {"cuda:0": 80 * GB, "cuda:1": 80 * GB} and both.verdict == "fits"
    one = plan_for(compose_config, H100, "model=llama3_70b", "quant=int8")
    assert one.verdict == "fits_with_offload" and one.offload_bytes == 200 * GB
    assert "offloading layers to the CPU" in one.verdict_text()
    capped = plan_for(
        compose_config, TWO_H100, "model=llama3_70b", "device=cuda", "+device.max_memory={0:40GB,1:40GB}"
    )
    assert capped.devices == {"cuda:0": 40 * GB, "cuda:1": 40 * GB} and capped.verdict == "does_not_fit"
    with pytest.raises(ConfigError, match=r"device\.max_memory: `size` plenty is not in a valid format"):
        plan_for(compose_config, TWO_H100, "model=llama3_70b", "+device.max_memory={0:plenty}")


def test_a_batch_that_does_not_fit_gets_the_largest_that_does(compose_config):
    plan = plan_for(
        compose_config,
        Hardware(1, True, (24 * GB,), 64 * GB),
        "model=llama3_8b",
        "device=cuda",
        rows=64,
        context=8192,
    )
    assert plan.verdict == "does_not_fit" and plan.fitting_batch is not None
    assert plan.advice == f"engine.batch_size={plan.fitting_batch} fits"
    fits = plan_for(
        compose_config,
        Hardware(1, True, (24 * GB,), 64 * GB),
        "model=llama3_8b",
        "device=cuda",
        rows=plan.fitting_batch,
        context=8192,
    )
    bigger = plan_for(
        compose_config,
        Hardware(1, True, (24 * GB,), 64 * GB),
        "model=llama3_8b",
        "device=cuda",
        rows=plan.fitting_batch + 1,
        context=8192,
    )
    assert (fits.verdict, bigger.verdict) == ("fits", "does_not_fit")


def test_kv_cache_follows_layers_kv_heads_and_the_context_cap(compose_config):
    plan = plan_for(compose_config, H100, "model=llama3_8b", rows=4, context=100_000)
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB in bf16
    assert plan.context_tokens == 8192  # capped at the model's context
    assert plan.kv_bytes == 4 * 8192 * plan.kv_bytes_per_token


def test_on_a_cpu_the_kv_cache_is_planned_within_its_budget_half_the_ram_the_weights_leave(compose_config):
    server = Hardware(cpu_free=64 * GB)
    fp32 = ("model=llama3_8b", "precision=fp32")
    full = 32 * 8192 * kv_bytes_per_token(architecture_of(compose_config, *fp32), 4)
    auto = plan_for(compose_config, server, *fp32, rows=32, context=8192)
    assert auto.kv_bytes == auto.kv_budget_bytes == (64 * GB - auto.weights_bytes) // 2 < full
    assert f"(engine.kv_cache_gb; 32 row(s) x 8,192 tokens x 256 KiB would take {full / GB:.1f} GB" in (
        "\n".join(auto.lines())
    )
    two = plan_for(compose_config, server, *fp32, "engine.kv_cache_gb=2", rows=32, context=8192)
    assert two.kv_bytes == two.kv_budget_bytes == 2 * GB
    unlimited = plan_for(compose_config, server, *fp32, "engine.kv_cache_gb=null", rows=32, context=8192)
    assert unlimited.kv_budget_bytes is None and unlimited.kv_bytes == full
    gpu = plan_for(compose_config, H100, "model=llama3_8b", "device=cuda", rows=32, context=8192)
    assert gpu.kv_budget_bytes is None and gpu.kv_bytes == 32 * 8192 * gpu.kv_bytes_per_token


def architecture_of(compose_config, *overrides):
    return to_run_config(compose_config(*overrides)).model.architecture


def test_mixture_of_experts_weights_count_every_expert(compose_config):
    plan = plan_for(compose_config, H100, "model=mixtral_8x7b", "device=cuda")
    arch = to_run_config(compose_config("model=mixtral_8x7b")).model.architecture
    assert arch.active_params < arch.params / 3  # read per token: 2 of 8 experts
    assert plan.weights_bytes == 2 * arch.params  # but all of them are resident
    assert plan.advice.startswith("quant=int8")


@pytest.mark.slow
def test_embedded_architecture_is_read_from_its_config_and_matches_the_loaded_model(
    compose_config, smol_pipeline, embedded_dir
):
    cfg = to_run_config(compose_config())
    arch = architecture(cfg, {"model": str(embedded_dir), "trust_remote_code": False})
    loaded = smol_pipeline.model
    assert arch.params == sum(p.numel() for p in loaded.parameters())
    assert arch.tied_embeddings and arch.active_params is None
    assert kv_bytes_per_token(arch, 4) == 2 * loaded.config.num_hidden_layers * 3 * 64 * 4
    fp32 = weights_bytes(arch, 4, QuantConfig(method=QuantMethod.none))
    assert fp32 == pytest.approx(loaded.get_memory_footprint(), rel=0.01)
    # bitsandbytes leaves the (tied) embedding matrix in fp32: int8 is far from a quarter of fp32.
    assert weights_bytes(arch, 4, QuantConfig(method=QuantMethod.int8)) > 0.38 * fp32


@pytest.mark.slow
def test_a_draft_model_is_planned_beside_the_model(compose_config, embedded_dir):
    drafted = plan_for(
        compose_config, H100, "model=llama3_8b", "generation.assistant_model=smollm2_135m", rows=1
    )
    plain = plan_for(compose_config, H100, "model=llama3_8b", rows=1)
    draft_params = architecture(
        to_run_config(compose_config()), {"model": str(embedded_dir), "trust_remote_code": False}
    ).params
    assert drafted.draft_bytes > 2 * draft_params  # bf16 weights, plus its KV cache
    assert drafted.total_bytes == plain.total_bytes + drafted.draft_bytes  # no kept caches at batch 1
    assert any(line.strip().startswith("draft model") for line in drafted.lines())


@pytest.mark.slow
def test_plan_true_prints_the_plan_and_loads_nothing(tmp_path):
    done = run_cli("model=llama3_70b", "plan=true", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("memory plan for llama3_70b in ")
    for label in ("weights", "KV cache", "total", "available", "verdict:"):
        assert label in done.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["model"] == "llama3_70b" and plan["weights_bytes"] > 140 * GB
    assert not (tmp_path / "chats").exists() and "loading" not in done.stderr


@pytest.mark.slow
def test_plan_gpus_plans_for_gpus_this_machine_does_not_have(tmp_path):
    one = run_cli(
        "model=llama3_70b", "device=cuda", "plan=true", "plan_gpus=[80GB]", f"hydra.run.dir={tmp_path / '1'}"
    )
    assert one.returncode == 0, one.stderr
    assert "in bf16:" in one.stdout and "(90% of cuda:0 80.0 GB free)" in one.stdout
    assert "verdict: does not fit; quant=int4 needs" in one.stdout
    two = run_cli("model=llama3_70b", "plan=true", "plan_gpus=[80GB,80GB]", f"hydra.run.dir={tmp_path / '2'}")
    assert two.returncode == 0, two.stderr
    assert "cuda:0 80.0 GB free, cuda:1 80.0 GB free" in two.stdout and "verdict: fits" in two.stdout


@pytest.mark.slow
def test_a_run_that_cannot_fit_is_refused_before_loading_and_the_advice_works(write_jsonl, tmp_path):
    source = write_jsonl([{"id": 1, "messages": [{"role": "user", "content": "Hi!"}]}])
    cap = "+device.max_memory={cpu:400MiB}"  # less than the fp32 weights with their KV caches
    refused = run_cli(
        cap, f"input.path={source}", "generation.max_new_tokens=4", f"hydra.run.dir={tmp_path / 'a'}"
    )
    assert refused.returncode == 1
    error = refused.stderr.strip().splitlines()[-1]
    assert "smollm2_135m in fp32 needs ~538 MB for weights" in error and "cpu has" in error
    assert not (tmp_path / "a" / "chats").exists() and "loading smollm2_135m" not in refused.stderr
    advice = re.search(r"usable: ((?:precision=\w+ )?quant=\w+(?: engine.batch_size=\d+)?) needs", error)
    assert advice, error
    taken = run_cli(
        cap,
        *advice[1].split(),
        f"input.path={source}",
        "generation.max_new_tokens=4",
        f"hydra.run.dir={tmp_path / 'b'}",
    )
    assert taken.returncode == 0, taken.stderr
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["memory_plan"]["verdict"] == "fits"


def test_the_plan_reserves_each_requests_own_max_tokens(compose_config, write_jsonl, embedded_dir):
    from runner.engines.chat_template import template_tokens
    from runner.model.loading import load_tokenizer
    from runner.replay import final_shape
    from runner.workload import estimate_without_template, measure_with_template, read_workload

    request = {"method": "POST", "url": "/v1/chat/completions"}
    lines = [
        {
            "custom_id": f"r{i}",
            **request,
            "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8000},
        }
        for i in range(3)
    ]
    cfg = to_run_config(compose_config(f"input.path={write_jsonl(lines)}", "generation.max_new_tokens=256"))
    workload = read_workload(cfg)
    estimate_without_template(workload, cfg)
    assert 8000 < workload.context_tokens < 8100  # not 256 + the prompt
    tokenizer = load_tokenizer({"model": str(embedded_dir), "trust_remote_code": False})
    measure_with_template(workload, tokenizer, cfg)
    rendered = template_tokens(tokenizer, final_shape(workload.conversations[0], cfg.replay.mode, fold=False))
    assert workload.context_tokens == rendered + 8000  # the rendered chat, its reply budget on top


@pytest.mark.parametrize(("quant", "figure"), [("int8", "0.49x"), ("int4", "0.98x")])
def test_a_quantization_no_faster_on_a_cpu_says_so_in_the_plan_with_its_figure(compose_config, quant, figure):
    from runner.planning.plan import CPU_QUANT_SPEED

    assert f"{CPU_QUANT_SPEED[quant]:.2f}x" == figure
    plan = plan_for(compose_config, LAPTOP, "model=llama3_8b", f"quant={quant}")
    assert plan.speed_note.startswith(f"quant={quant} shrinks the weights but is no faster on a CPU")
    assert f"at {figure} fp32's tokens/s" in plan.speed_note and f"  note: {plan.speed_note}" in plan.lines()
    assert (
        plan_for(compose_config, H100, "model=llama3_8b", f"quant={quant}", "device=cuda").speed_note is None
    )
    assert plan_for(compose_config, LAPTOP, "model=llama3_8b").speed_note is None


@pytest.mark.slow
def test_a_quantized_cpu_run_closes_with_the_note_and_its_own_speed(write_jsonl, tmp_path):
    source = write_jsonl([{"id": "a", "messages": [{"role": "user", "content": "Hi."}]}])
    done = run_cli(
        "quant=int8", f"input.path={source}", "generation.max_new_tokens=2", f"hydra.run.dir={tmp_path}"
    )
    assert done.returncode == 0, done.stderr
    assert re.search(
        r"quant=int8 shrinks the weights but is no faster on a CPU: .*; this run: [\d.]+ tokens/s",
        done.stderr,
    )


def write_cgroup(directory, files):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_free_ram_is_the_tightest_memory_cgroup_s_room_as_a_slurm_job_sees_it(tmp_path):
    """A SLURM job's `--mem` is its cgroup's limit, far below the node's free RAM: the plan and the
    KV budget must count from it (cgroup v2 and v1, the tightest of the job's cgroup and those
    above it, reclaimable file cache not counted as used)."""
    from runner.model.hardware import cgroup_memory

    root = tmp_path / "cgroup"
    membership = tmp_path / "self_cgroup"
    membership.write_text("0::/system.slice/slurmstepd.scope/job_42/step_0\n")
    scope = root / "system.slice" / "slurmstepd.scope"
    write_cgroup(scope, {"memory.max": "8000000000\n", "memory.current": "1500000000\n", "memory.stat": ""})
    write_cgroup(
        scope / "job_42",
        {
            "memory.max": "4000000000\n",
            "memory.current": "1500000000\n",
            "memory.stat": "anon 900000000\ninactive_file 500000000\nactive_file 100000000\n",
        },
    )
    step = {"memory.max": "max\n", "memory.current": "1", "memory.stat": ""}
    write_cgroup(scope / "job_42" / "step_0", step)
    assert cgroup_memory(root, membership) == (4 * GB, 1 * GB)

    membership.write_text("7:cpu,cpuacct:/slurm/job_7\nnot a cgroup line\n4:memory:/slurm/uid_0/job_7\n")
    write_cgroup(
        root / "memory" / "slurm" / "uid_0" / "job_7",
        {
            "memory.limit_in_bytes": "2000000000\n",
            "memory.usage_in_bytes": "300000000\n",
            "memory.stat": "cache 0\ntotal_inactive_file 0\n",
        },
    )
    # v1 writes "no limit" as 2**63 rounded down to a page
    write_cgroup(
        root / "memory",
        {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "7", "memory.stat": ""},
    )
    assert cgroup_memory(root, membership) == (2 * GB, 300_000_000)

    membership.write_text("4:memory:/\n")
    assert cgroup_memory(root, membership) is None  # no limit anywhere
    assert cgroup_memory(root, tmp_path / "missing") is None  # not Linux, or no cgroups


def test_the_plan_s_free_ram_is_the_cgroup_s_room_where_that_is_less(monkeypatch):
    from runner.model import hardware

    monkeypatch.setattr(hardware, "cgroup_memory", lambda: (2 * GB, GB // 2))
    found = hardware.detect_hardware()
    assert (found.cpu_free, found.cpu_total) == (GB * 3 // 2, 2 * GB)
    monkeypatch.setattr(hardware, "cgroup_memory", lambda: None)
    assert hardware.detect_hardware().cpu_total > 2 * GB  # this machine's RAM, no cgroup limit
