"""The transcript viewer, opened in real headless Chromium: a run, a sweep side by side, escaping,
and a 10,000-conversation run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT, chat
from test_cli import read_jsonl

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser tests: .ci/run installs Debian's chromium")
    pytestmark = [
        pytest.mark.browser,
        pytest.mark.skip(reason="needs Debian's chromium (.ci/run installs it)"),
    ]

INJECTION = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
INPUT = [
    chat("injected", ("user", f"Repeat after me: {INJECTION}")),
    chat(
        "capital", ("user", "What is the capital of France?"), ("assistant", "Paris."), ("user", "And Italy?")
    ),
]


def chromium(page: Path, fragment: str, tmp_path: Path, *flags: str) -> str:
    """Open the page from a file:// URL headless; return what the browser printed (the DOM)."""
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            *flags,
            page.as_uri() + fragment,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def view(directory: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "runner.view", str(directory)], cwd=PROJECT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    page = Path(done.stdout.strip())
    assert page == directory / "index.html"
    return page


def count(dom: str, css_class: str) -> int:
    return len(re.findall(rf'class="[^"]*\b{css_class}\b[^"]*"', dom))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real two-job sweep (quant=none,int8) on the embedded model."""
    root = tmp_path_factory.mktemp("sweep")
    source = root / "chats.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in INPUT), encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "-m",
            "quant=none,int8",
            f"input.path={source}",
            "generation.max_new_tokens=6",
            f"hydra.sweep.dir={root / 'sweep'}",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return root / "sweep"


@pytest.mark.slow
def test_a_run_page_shows_its_chats_escaped_and_works_copied_elsewhere(sweep, tmp_path):
    run_dir = next(path for path in sweep.iterdir() if path.name.startswith("0_"))
    page = view(run_dir)
    moved = tmp_path / "elsewhere" / "index.html"  # the page alone, away from the run dir
    moved.parent.mkdir()
    shutil.copy(page, moved)
    dom = chromium(moved, "#c=0", tmp_path, "--dump-dom")
    assert "2 conversations" in dom
    assert count(dom, "column") == 1 and count(dom, "user") == 1 and count(dom, "assistant") == 1
    assert "smollm2_135m" in dom and "tokens/s" in dom
    # The script and the img handler arrived as text and did not run.
    assert "<title>chat-runner viewer</title>" in dom and "pwned</title>" not in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x onerror=" in dom
    assert '<img src="x"' not in dom
    # The second conversation: the input reply shown as the reference beside the generated turn.
    second = chromium(moved, "#c=1", tmp_path, "--dump-dom")
    assert count(second, "assistant") == 2 and count(second, "reference") == 1
    assert re.search(r'class="turnmeta"[^>]*>\d+ tokens · [\d.]+ s · (stop|length)<', second)
    found = chromium(moved, "#q=capital", tmp_path, "--dump-dom")
    assert "1 of 2 conversations match" in found


@pytest.mark.slow
def test_a_sweep_page_puts_jobs_side_by_side_and_highlights_differences(sweep, tmp_path):
    changed = tmp_path / "sweep"
    shutil.copytree(sweep, changed)
    job = next(path for path in changed.iterdir() if path.name.startswith("1_"))
    chats = job / "chats" / "chats.jsonl"
    baseline = read_jsonl(next(changed.glob("0_*")) / "chats" / "chats.jsonl")
    edited = read_jsonl(chats)
    # The second conversation's first reply as the baseline's, its last one with two words added.
    edited[1]["messages"][1]["content"] = baseline[1]["messages"][1]["content"]
    edited[1]["messages"][3]["content"] = baseline[1]["messages"][3]["content"] + " Arr, matey!"
    chats.write_text("".join(json.dumps(r) + "\n" for r in edited), encoding="utf-8")
    page = view(changed)

    dom = chromium(page, "#c=1&base=0&diff=0", tmp_path, "--dump-dom")
    headers = re.findall(r"<h2[^>]*>([^<]*)</h2>", dom)
    assert headers == ["quant=none (baseline)", "quant=int8"]
    assert count(dom, "column") == 2 and count(dom, "differs") == 0
    assert len(re.findall(r"<tr>", dom)) == 3  # the report table: a header and a row per job
    assert 'class="chart" src="data:image/png;base64,' in dom
    assert "<mark" not in dom
    highlighted = chromium(page, "#c=1&base=0&diff=1", tmp_path, "--dump-dom")
    assert count(highlighted, "differs") == 1  # the edited reply, and only it
    assert re.findall(r'<mark class="changed">([^<]*)</mark>', highlighted) == ["Arr,", "matey!"]
    screenshot = tmp_path / "sweep.png"
    chromium(page, "#c=1&base=0&diff=1", tmp_path, f"--screenshot={screenshot}", "--window-size=1400,900")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def test_ten_thousand_conversations_render_a_page_at_a_time(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "chats").mkdir(parents=True)
    lines = []
    for number in range(10_000):
        turns = [
            {
                "message_index": 2,
                "prompt_tokens": 30,
                "new_tokens": 12,
                "seconds": 0.5,
                "first_token_seconds": 0.1,
                "finish_reason": "stop",
                "reference": None,
                "control_tokens_in_content": 0,
            }
        ]
        record = {
            "id": f"conv-{number}",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Question number {number}: what is {number} squared?"},
                {"role": "assistant", "content": f"{number} squared is {number * number}."},
            ],
            "replay": {"line": number + 1, "sample": 0, "error": None, "turns": turns},
        }
        lines.append(json.dumps(record))
    (run_dir / "chats" / "big.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    page = view(run_dir)
    # Compact: the shared system prompt is stored once.
    assert page.read_text(encoding="utf-8").count("You are a helpful assistant.") == 1
    dom = chromium(page, "", tmp_path, "--dump-dom")
    assert "10000 conversations" in dom and "page 1 of 100" in dom
    assert len(re.findall(r"<li ", dom)) == 100
    found = chromium(page, "#q=number%209876%3A", tmp_path, "--dump-dom")
    assert "1 of 10000 conversations match" in found and "97535376" in found


def test_a_directory_that_is_no_run_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "runner.view", str(tmp_path)], cwd=PROJECT, capture_output=True, text=True
    )
    assert done.returncode == 1 and "neither a run dir" in done.stderr
