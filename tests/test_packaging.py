"""The wheel, installed (not editable) into a fresh venv, works from any directory: `chat-runner`
and `python -m runner` compose the repo's configs and replay on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import PROJECT, chat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this checkout. Its dependencies come from the
    test's own environment (a .pth line), so the test needs no network; the project's own files
    (code, configs, launcher plugin, console script) come from the wheel only."""
    root = tmp_path_factory.mktemp("installed")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            root,
            PROJECT,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = root.glob("chat_runner-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            venv / "bin" / "python",
            "install",
            "--quiet",
            "--no-deps",
            wheel,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv


def run_installed(command: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_installed_package_imports_from_the_venv_not_the_checkout(installed, tmp_path):
    done = run_installed(
        [installed / "bin" / "python", "-c", "import runner; print(runner.__file__)"], tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(installed)) and not done.stdout.startswith(str(PROJECT))


@pytest.mark.parametrize("how", ["console script", "python -m runner"])
def test_the_installed_command_replays_from_any_directory(installed, tmp_path, how):
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(chat("only", ("user", "Say hello."))) + "\n")
    command = (
        [installed / "bin" / "chat-runner"]
        if how == "console script"
        else [installed / "bin" / "python", "-m", "runner"]
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_installed(
        [
            *command,
            f"input.path={source}",
            "generation.max_new_tokens=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        elsewhere,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["records"], summary["model"]["name"]) == (
        "completed",
        1,
        "smollm2_135m",
    )


def test_the_installed_configs_are_the_repos(installed, tmp_path):
    overrides = ["--cfg", "job", "model=llama3_8b", "quant=int4", "precision=bf16", "input.path=x.jsonl"]
    repo = subprocess.run(
        [sys.executable, "-m", "runner", *overrides], cwd=PROJECT, capture_output=True, text=True, timeout=120
    )
    wheel = run_installed([installed / "bin" / "chat-runner", *overrides], tmp_path)
    assert repo.returncode == wheel.returncode == 0, wheel.stderr
    assert wheel.stdout == repo.stdout and "method: int4" in wheel.stdout
