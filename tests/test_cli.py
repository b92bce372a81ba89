"""End to end: `python -m runner ...` as a user runs it, on the real embedded model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, chat

from runner.rundir.layout import unique_dir

INPUT = [
    chat(
        "persona",
        ("system", "You are a pirate."),
        ("user", "Who are you?"),
        ("user", "Where do you sail?"),
        topic="persona",
    ),
    chat(2, ("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")),
]


def run_cli(*args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_replay_end_to_end(quant, write_jsonl, tmp_path, embedded_dir):
    source = write_jsonl(INPUT, name="my_chats.jsonl")
    run_dir = tmp_path / "run"
    done = run_cli(
        f"quant={quant}", f"input.path={source}", "generation.max_new_tokens=4", f"hydra.run.dir={run_dir}"
    )
    assert done.returncode == 0, done.stderr
    assert {p.name for p in run_dir.iterdir()} == {
        ".hydra",
        "chats",
        "summary.json",
        "manifest.json",
        "chat-runner.log",
        ".lock",  # left in place, unlocked: the OS lock died with the process
    }
    assert (run_dir / ".lock").read_text().startswith("pid ")
    assert {p.name for p in (run_dir / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["quant"]["method"] == quant
    # Each third-party warning once per run (bitsandbytes' int8 warns at every forward pass).
    for text in (done.stderr, (run_dir / "chat-runner.log").read_text()):
        warnings = [line.split("] - ", 1)[-1] for line in text.splitlines() if "[WARNING]" in line]
        assert len(warnings) == len(set(warnings)), warnings

    records = read_jsonl(run_dir / "chats" / "my_chats.jsonl")
    assert [r["id"] for r in records] == ["persona", 2]
    assert records[0]["topic"] == "persona"
    for record in records:
        messages, turns = record["messages"], record["replay"]["turns"]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        assert [t["message_index"] for t in turns] == [i + 1 for i in users]  # every user turn answered
        for turn in turns:
            reply = messages[turn["message_index"]]
            assert reply["role"] == "assistant" and reply["content"].strip()
            assert 0 < turn["new_tokens"] <= 4 and turn["prompt_tokens"] > 0 and turn["seconds"] > 0
            assert turn["finish_reason"] in ("stop", "length")
        assert len(record["replay"]["chat_template_sha256"]) == 64
    assert records[1]["replay"]["turns"][0]["reference"] == "4"

    summary = json.loads((run_dir / "summary.json").read_text())
    all_turns = [t for r in records for t in r["replay"]["turns"]]
    assert (summary["model"]["name"], summary["quant"], summary["precision"], summary["device"]) == (
        "smollm2_135m",
        quant,
        "auto",
        "auto",
    )
    assert (summary["conversations"], summary["turns"]) == (2, 4)
    assert summary["generated_tokens"] == sum(t["new_tokens"] for t in all_turns)
    assert summary["tokens_per_second"] == pytest.approx(
        summary["generated_tokens"] / summary["replay_seconds"], rel=0.01
    )
    assert summary["load_seconds"] > 0 and summary["peak_memory"]["rss_bytes"] > 0
    # Two conversations: the batch has two rows at most.
    assert (summary["engine"], summary["batch_size"]) == ("continuous", {"configured": 2, "final": 2})
    assert summary["cache"]["reused_tokens"] > 0  # second turns reused the first turns' KV cache
    # On a CPU the KV cache runs within the budget the memory plan printed.
    budget = summary["memory_plan"]["kv_budget_bytes"]
    assert budget > 0 and summary["cache"]["kv_budget_bytes"] == budget
    assert 0 < summary["cache"]["kv_bytes"] <= budget
    steps = summary["steps"]
    assert steps["decode_rows"] == summary["generated_tokens"]  # one token per decoding row per step
    assert 0 < steps["decode_seconds"] + steps["prefill_seconds"] <= steps["step_seconds"]
    assert 0 < summary["first_token_seconds"]["p50"] <= summary["turn_seconds"]["p50"]
    assert all(0 < t["first_token_seconds"] <= t["seconds"] for t in all_turns)
    assert summary["errors"] == {} and all(r["replay"]["error"] is None for r in records)
    roofline, loaded = summary["roofline"], summary["loaded"]
    assert (
        loaded["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * {"none": 4, "int8": 4, "int4": 4}[quant]
    )  # fp32 KV
    assert loaded["weights_bytes"] < roofline["bytes_per_token"] < loaded["weights_bytes"] * 1.1
    assert roofline["batch1_tokens_per_second"] == pytest.approx(
        roofline["memory_bandwidth_bytes_per_second"] / roofline["bytes_per_token"], rel=1e-3
    )
    assert roofline["fraction"] == pytest.approx(
        summary["tokens_per_second"] / roofline["batch1_tokens_per_second"], rel=0.01
    )
    assert summary["environment"]["packages"]["transformers"].startswith("5.")
    # Quantization really happened: the weights shrink against the fp32 checkpoint on disk.
    fp32_bytes = (embedded_dir / "model.safetensors").stat().st_size
    ratio = summary["loaded"]["weights_bytes"] / fp32_bytes
    assert {"none": 0.99 < ratio < 1.01, "int8": ratio < 0.5, "int4": ratio < 0.35}[quant], ratio
    # The memory plan, made before loading, is within 15% of what the loaded weights take.
    plan = summary["memory_plan"]
    assert plan["weights_bytes"] == pytest.approx(loaded["weights_bytes"], rel=0.15)
    assert (plan["verdict"], plan["batch_rows"], plan["quant"]) == ("fits", 2, quant)
    log = (run_dir / "chat-runner.log").read_text()
    assert "verdict: fits" in log
    assert "tokens/s at batch 1; this run" in log
    # The last lines: counts with finish reasons, errors and rejects by code, then where to look.
    finishes = ", ".join(
        f"{reason} {count}"
        for reason, count in sorted(summary["finish_reasons"].items(), key=lambda item: (-item[1], item[0]))
    )
    assert (
        f"done: 2 conversation(s), 4 turn(s) (finish reasons: {finishes}), errors: none, rejected lines: none"
        in log
    )
    last = [line.split("] - ", 1)[-1] for line in log.rstrip().splitlines()[-2:]]
    assert last == [f"outputs: {run_dir}", f"read them: python -m runner.view {run_dir}"]


@pytest.mark.slow
def test_sampling_samples_are_recorded_and_reproducible(write_jsonl, tmp_path):
    source = write_jsonl(INPUT[:1])
    outputs = []
    for name in ("a", "b"):
        done = run_cli(
            "generation=sampling",
            "generation.num_samples=2",
            "generation.max_new_tokens=6",
            "generation.seed=11",
            f"input.path={source}",
            f"hydra.run.dir={tmp_path / name}",
        )
        assert done.returncode == 0, done.stderr
        outputs.append(read_jsonl(tmp_path / name / "chats" / "chats.jsonl"))
    first, second = outputs
    assert [(r["id"], r["replay"]["sample"]) for r in first] == [("persona", 0), ("persona", 1)]
    assert first[0]["replay"]["seed"] != first[1]["replay"]["seed"]
    assert [r["messages"] for r in first] == [r["messages"] for r in second]


@pytest.mark.slow
def test_bad_input_stops_before_loading_with_one_clear_message(write_jsonl, tmp_path):
    source = write_jsonl([INPUT[0], b'{"id": 3, "messages": [{"role": "robot", "content": "x"}]}'])
    done = run_cli(f"input.path={source}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert f"{source}:2: messages[0]: unknown role 'robot'" in done.stderr
    assert "Traceback" not in done.stderr and "loading" not in done.stderr
    assert not (tmp_path / "run" / "chats").exists()


def test_cfg_job_prints_the_composed_config():
    done = run_cli("model=llama3_8b", "quant=int4", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    composed = yaml.safe_load(done.stdout)
    assert composed["model"]["id"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert composed["quant"] == {
        "method": "int4",
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "auto",
    }


def test_mistyped_option_exits_non_zero_with_the_choices():
    done = run_cli("model=lama3")
    assert done.returncode != 0
    assert "Could not find 'model/lama3'" in done.stderr and "llama3_8b" in done.stderr
    assert "_schema" not in done.stderr  # the schemas behind the groups are no options


@pytest.mark.parametrize("plus", ["", "+"])
def test_an_unknown_key_is_refused_naming_the_closest_one(plus):
    done = run_cli(f"{plus}generation.max_new_token=16", "--cfg", "job")
    assert (done.returncode, done.stderr.strip()) == (
        1,
        f"error: unknown config key 'generation.max_new_token' in '{plus}generation.max_new_token=16': "
        "did you mean generation.max_new_tokens?",
    )


def test_keys_a_group_leaves_open_still_take_new_entries():
    done = run_cli("+device.max_memory={0:70GiB,cpu:100GiB}", "device=cuda", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["device"]["max_memory"] == {0: "70GiB", "cpu": "100GiB"}


def test_config_error_is_one_line_without_traceback(tmp_path):
    done = run_cli("generation.num_samples=2", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1
    assert "use generation=sampling" in done.stderr and "Traceback" not in done.stderr


def test_help_shows_the_groups_and_a_project_header():
    done = run_cli("--help")
    assert done.returncode == 0
    assert done.stdout.startswith("chat-runner: replay multi-turn JSONL conversations")
    for group in ("model:", "precision:", "quant:", "device:", "generation:"):
        assert group in done.stdout
    assert "_schema" not in done.stdout


def test_runs_in_the_same_second_get_distinct_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = "outputs/2026-01-01/10-00-00"
    first = unique_dir(base)
    assert unique_dir(base) == first  # the same process resolves the same dir
    (tmp_path / "outputs" / "2026-01-01" / "10-00-00-1").mkdir()  # taken by a third run
    from runner.rundir import layout

    layout._claimed_dirs.clear()  # a second process
    assert unique_dir(base) == base + "-2"


@pytest.mark.slow
def test_skip_mode_rejects_bad_lines_and_replays_the_rest(write_jsonl, tmp_path):
    source = write_jsonl([INPUT[0], b"{not json", INPUT[1], chat("persona", ("user", "dup"))])
    run_dir = tmp_path / "run"
    done = run_cli(
        "input.on_error=skip",
        f"input.path={source}",
        "generation.max_new_tokens=2",
        f"hydra.run.dir={run_dir}",
    )
    assert done.returncode == 0, done.stderr
    rejected = read_jsonl(run_dir / "rejected.jsonl")
    assert [(r["line"], r["code"], r["id"]) for r in rejected] == [
        (2, "invalid_json", None),
        (4, "duplicate_id", "persona"),
    ]
    assert rejected[0]["raw"] == "{not json" and rejected[0]["file"] == str(source)
    assert [r["id"] for r in read_jsonl(run_dir / "chats" / "chats.jsonl")] == ["persona", 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    # Every input line is accounted for exactly once: replayed or rejected.
    assert summary["records"] + sum(summary["rejected"].values()) == 4
    assert summary["rejected"] == {"invalid_json": 1, "duplicate_id": 1}


def test_empty_input_is_an_error_before_the_model_loads(tmp_path):
    source = tmp_path / "empty.jsonl"
    source.write_text("\n\n")
    done = run_cli(f"input.path={source}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert f"no conversations in {source}" in done.stderr and "loading" not in done.stderr


def test_an_input_whose_every_line_is_rejected_ends_before_loading(write_jsonl, tmp_path):
    source = write_jsonl([b"{not json", b"[]"])
    run_dir = tmp_path / "run"
    done = run_cli("input.on_error=skip", f"input.path={source}", f"hydra.run.dir={run_dir}")
    assert done.returncode == 1
    assert "every line of the input was rejected (2)" in done.stderr and "loading" not in done.stderr
    assert [r["code"] for r in read_jsonl(run_dir / "rejected.jsonl")] == ["invalid_json", "not_an_object"]


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last byte (needs root, as on this project's machines)."""
    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        with (mount / "filler").open("wb") as stream, contextlib.suppress(OSError):
            stream.write(b"\0" * 2**20)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_an_unwritable_run_dir_or_a_full_disk_is_one_line_before_anything_starts(full_disk):
    run, sweep = full_disk / "run", full_disk / "sweep"
    for args, expected in [
        (
            ["hydra.run.dir=/proc/no/run"],
            "error: cannot write the run dir /proc/no/run (hydra.run.dir): No such file or directory",
        ),
        (
            [f"hydra.run.dir={run}"],
            f"error: cannot write the run dir {run} (hydra.run.dir): No space left on device",
        ),
        (
            ["-m", f"hydra.sweep.dir={sweep}"],
            f"error: cannot write the sweep dir {sweep} (hydra.sweep.dir): No space left on device",
        ),
    ]:
        done = run_cli(*args, "generation.max_new_tokens=2")
        assert (done.returncode, done.stderr.strip()) == (1, expected)


def _hub_answers() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_saying_how_to_run_offline(tmp_path):
    if _hub_answers():
        pytest.skip("the hub answers from here: this test is for machines without it (CI)")
    started = time.monotonic()
    done = run_cli(
        "model=hub",
        "model.id=Qwen/Qwen2.5-0.5B-Instruct",
        "input.path=conversations",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 1 and time.monotonic() - started < 30
    assert "cannot reach the Hugging Face hub" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert "model=local model.path=" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_local_model_path_must_hold_a_checkpoint_and_never_reaches_the_hub(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, message in [
        ("/no/such/dir", "model.path /no/such/dir is not a directory"),
        (
            "relative/dir",
            f"model.path {tmp_path}/relative/dir is not a directory (relative paths are from {tmp_path})",
        ),
        (
            str(tmp_path / "empty"),
            f"model.path {tmp_path / 'empty'} holds no checkpoint: it has no config.json, weights",
        ),
    ]:
        source = PROJECT / "conversations"
        done = run_cli(
            "model=local",
            f"model.path={path}",
            f"input.path={source}",
            f"hydra.run.dir={tmp_path / 'runs' / path.replace('/', '_')}",
            cwd=tmp_path,
        )
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "huggingface.co" not in done.stderr


@pytest.mark.slow
def test_a_local_checkpoint_directory_runs(embedded_dir, write_jsonl, tmp_path):
    source = write_jsonl([chat("a", ("user", "Hi."))])
    done = run_cli(
        "model=local",
        f"model.path={embedded_dir}",
        f"input.path={source}",
        "generation.max_new_tokens=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["model"]["location"] == str(
        embedded_dir
    )


@pytest.mark.slow
def test_hub_token_from_the_environment_is_written_nowhere(write_jsonl, tmp_path):
    sentinel = "hf_SENTINELsentinelSENTINEL0123456789"
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            f"input.path={write_jsonl(INPUT)}",
            "generation.max_new_tokens=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_TOKEN": sentinel},
    )
    assert done.returncode == 0, done.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) >= 7
    assert not [p for p in files if sentinel.encode() in p.read_bytes()]


@pytest.mark.parametrize(
    "override", ["+hf_token=abc", "+model.token=abc", "model.id=hf_abcdefghijklmnopqrstuvwxyz0"]
)
def test_token_like_overrides_are_refused_before_anything_is_written(override, tmp_path):
    done = run_cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1 and "looks like a secret" in done.stderr
    assert not (tmp_path / "run").exists()


STRICT_TEMPLATE = (  # the embedded template, plus a rule some templates have: no "forbidden" word
    "{% for message in messages %}{% if 'forbidden' in message['content'] %}"
    "{{ raise_exception('this template refuses the word forbidden') }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.slow
def test_chat_template_refusals_are_reported_per_conversation_before_loading(
    write_jsonl, tmp_path, embedded_dir
):
    checkpoint = tmp_path / "strict"
    shutil.copytree(embedded_dir, checkpoint, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(embedded_dir / "model.safetensors", checkpoint / "model.safetensors")
    (checkpoint / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    source = write_jsonl([INPUT[0], chat("bad", ("user", "Say the forbidden word.")), INPUT[1]])
    common = [
        "model=local",
        f"model.path={checkpoint}",
        f"input.path={source}",
        "generation.max_new_tokens=2",
    ]
    failed = run_cli(*common, f"hydra.run.dir={tmp_path / 'fail'}")
    assert failed.returncode == 1 and "loading" not in failed.stderr
    assert (
        f"{source}:2: the model's chat template refuses this conversation: this template refuses"
        in failed.stderr
    )
    skipped = run_cli(*common, "input.on_error=skip", f"hydra.run.dir={tmp_path / 'skip'}")
    assert skipped.returncode == 0, skipped.stderr
    [rejected] = read_jsonl(tmp_path / "skip" / "rejected.jsonl")
    assert (rejected["line"], rejected["id"], rejected["code"]) == (2, "bad", "template_error")
    assert [r["id"] for r in read_jsonl(tmp_path / "skip" / "chats" / "chats.jsonl")] == ["persona", 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prefix", "environment", "source"),
    [
        (["taskset", "-c", "0"], {}, "the process's CPU affinity"),
        ([], {"SLURM_CPUS_PER_TASK": "1"}, "SLURM_CPUS_PER_TASK"),
    ],
)
def test_torch_threads_follow_the_cpus_granted(write_jsonl, tmp_path, prefix, environment, source):
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip("taskset is not installed")
    run_dir = tmp_path / "run"
    arguments = [
        f"input.path={write_jsonl(INPUT[:1])}",
        "generation.max_new_tokens=2",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "runner", *arguments],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **environment},
    )
    assert done.returncode == 0, done.stderr
    assert f"torch uses 1 CPU thread(s), from {source}" in done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["environment"]["torch_threads"] == 1


@pytest.mark.slow
def test_outputs_latest_points_at_the_newest_run_and_the_viewer_takes_it(write_jsonl, tmp_path):
    source = write_jsonl([chat("a", ("user", "Hi."))])
    for _ in range(2):
        assert run_cli(f"input.path={source}", "generation.max_new_tokens=2", cwd=tmp_path).returncode == 0
    runs = sorted(tmp_path.glob("outputs/2*/*"))
    assert len(runs) == 2 and (tmp_path / "outputs" / "latest").resolve() == runs[-1]
    view = subprocess.run(
        [sys.executable, "-m", "runner.view"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert view.returncode == 0 and view.stdout.strip() == "outputs/latest/index.html"
    assert (runs[-1] / "index.html").is_file()


def test_a_run_outside_outputs_leaves_latest_alone_and_report_takes_the_newest_sweep(tmp_path):
    from runner.rundir.layout import LATEST_SWEEP, point_latest

    sweep = tmp_path / "outputs" / "multirun" / "2026-01-01" / "10-00-00"
    sweep.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(tmp_path)  # point_latest's links are relative to the current dir, as the runner's
    try:
        point_latest(LATEST_SWEEP, sweep)
        point_latest(LATEST_SWEEP, elsewhere)  # not under outputs/multirun: ignored
    finally:
        os.chdir(PROJECT)
    assert (tmp_path / LATEST_SWEEP).resolve() == sweep
    report = subprocess.run(
        [sys.executable, "-m", "runner.report"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0 and "0 job(s): outputs/multirun/latest/report.md" in report.stdout
