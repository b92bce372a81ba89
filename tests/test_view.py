"""The transcript viewer, opened in real headless Chromium: a run, a sweep side by side, escaping,
each filter's count on a sweep with known answers, keys, the record and config panel, the layout
measured at 420 and 1400 px, the report chart's labels, and a 10,000-conversation run."""

from __future__ import annotations

import base64
import copy
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
        "capital",
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And Italy?"),
        topic="geography",
        meta={"source": "a test", "level": 1},
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


class Browser:
    """Headless Chromium driven as a user would, over the DevTools protocol on a pipe (commands in
    on fd 3, replies out on fd 4; no package needed): a window of a given width, key presses,
    clicks, measurements taken with JavaScript, screenshots."""

    def __init__(self, profile: Path) -> None:
        self._log = profile / "chromium.log"  # a file: a pipe nobody reads could fill and stall chromium
        commands, self._to_browser = os.pipe()
        self._from_browser, replies = os.pipe()
        self.process = subprocess.Popen(
            [
                *("bash", "-c", f'exec "$0" "$@" 3<&{commands} 4>&{replies} 2>"{self._log}"', CHROMIUM),
                *("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"),
                *("--disable-background-networking", "--disable-component-update", "--remote-debugging-pipe"),
                f"--user-data-dir={profile}",
            ],
            pass_fds=(commands, replies),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        os.close(commands)
        os.close(replies)
        self._sent, self._buffer, self._session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium ended: {self._log.read_text()[-2000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, **params) -> dict:
        self._sent += 1
        message = {"id": self._sent, "method": method, "params": params}
        if self._session and not method.startswith("Target."):
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while (reply := self._message()).get("id") != self._sent:
            pass  # an event
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def viewport(self, width: int, height: int) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def open(self, page: Path, fragment: str = "", width: int = 1400, height: int = 900) -> None:
        self.viewport(width, height)
        for url in ("about:blank", page.as_uri() + fragment):  # a new fragment alone would not reload
            self.send("Page.navigate", url=url)
            while self._message().get("method") != "Page.loadEventFired":
                pass

    def js(self, expression: str):
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in reply, reply["exceptionDetails"]
        return reply["result"].get("value")

    def press(self, key: str) -> None:
        code = {"ArrowRight": 39, "ArrowLeft": 37, "/": 191}.get(key) or ord(key.upper())
        text = {} if len(key) > 1 else {"text": key}
        self.send("Input.dispatchKeyEvent", type="keyDown", key=key, windowsVirtualKeyCode=code, **text)
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key, windowsVirtualKeyCode=code)

    def type(self, text: str) -> None:
        self.send("Input.insertText", text=text)

    def box(self, selector: str) -> dict:
        return self.js(f"document.querySelector({json.dumps(selector)}).getBoundingClientRect().toJSON()")

    def texts(self, selector: str) -> list[str]:
        return self.js(f"[...document.querySelectorAll({json.dumps(selector)})].map((e) => e.textContent)")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        if full_page:  # the window as tall as the page: everything a user scrolls through
            self.viewport(self.js("innerWidth"), self.js("document.documentElement.scrollHeight"))
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.send("Browser.close")
        self.process.wait(timeout=30)
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opened = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield opened
    opened.close()


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


@pytest.fixture(scope="module")
def counted(sweep, tmp_path_factory) -> Path:
    """The real sweep made one with known answers. Ten conversations c0..c9, each the real
    "capital" record (two generated replies) with job 1's replies set to the baseline's, every
    finish reason "stop", and then:
    - replies that differ: c1 (second reply, two words added), c4 (first reply, 40 lines longer),
      c7 (both): 3;
    - errors: c2 in job 1 and c5 in the baseline, each without its last reply: 2 (c5's job 1 reply
      has no baseline reply to differ from, so c5 does not differ);
    - hit max_new_tokens: c3 (baseline), c4 (job 1), c6 (both): 3.
    """
    root = tmp_path_factory.mktemp("counted") / "sweep"
    shutil.copytree(sweep, root, ignore=shutil.ignore_patterns("index.html"))
    jobs = [next(root.glob("0_*")), next(root.glob("1_*"))]
    real = [
        next(r for r in read_jsonl(job / "chats" / "chats.jsonl") if r["id"] == "capital") for job in jobs
    ]
    records: list[list[dict]] = [[], []]
    for number in range(10):
        for job in (0, 1):
            record = copy.deepcopy(real[job])
            record["id"] = f"c{number}"
            record["messages"] = copy.deepcopy(real[0]["messages"])
            for turn in record["replay"]["turns"]:
                turn["finish_reason"] = "stop"
            records[job].append(record)

    def reply(number: int, job: int, turn: int) -> dict:
        record = records[job][number]
        return record["messages"][record["replay"]["turns"][turn]["message_index"]]

    reply(1, 1, 1)["content"] += " Arr, matey!"
    reply(4, 1, 0)["content"] = "\n".join(["A much longer first reply, line after line."] * 40)
    reply(7, 1, 0)["content"], reply(7, 1, 1)["content"] = "Rome.", "About three million."
    for number, job in ((2, 1), (5, 0)):
        record = records[job][number]
        record["messages"], record["replay"]["turns"] = (
            record["messages"][:-1],
            record["replay"]["turns"][:-1],
        )
        record["replay"]["error"] = {
            "code": "context_overflow",
            "message": "a test's overflow",
            "details": {},
        }
    records[0][3]["replay"]["turns"][0]["finish_reason"] = "length"
    records[1][4]["replay"]["turns"][1]["finish_reason"] = "length"
    for job in (0, 1):
        records[job][6]["replay"]["turns"][1]["finish_reason"] = "length"
    for job, chats in zip(jobs, records, strict=True):
        (job / "chats" / "chats.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in chats), encoding="utf-8"
        )
    view(root)
    return root


@pytest.mark.slow
def test_a_run_page_shows_its_chats_escaped_and_works_copied_elsewhere(sweep, tmp_path):
    run_dir = next(path for path in sweep.iterdir() if path.name.startswith("0_"))
    page = view(run_dir)
    moved = tmp_path / "elsewhere" / "index.html"  # the page alone, away from the run dir
    moved.parent.mkdir()
    shutil.copy(page, moved)
    dom = chromium(moved, "#c=0", tmp_path, "--dump-dom")
    assert "2 conversations" in dom
    assert count(dom, "jobhead") == 0 and count(dom, "user") == 1 and count(dom, "assistant") == 1
    assert "smollm2_135m" in dom and "tokens/s" in dom
    # Precision and device as they resolved, the config's choice beside them.
    summary = json.loads((run_dir / "summary.json").read_text())
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[summary["loaded"]["dtype"]]
    assert f"precision <b>{dtype} (auto)</b>" in dom
    assert f"device <b>{summary['loaded']['device']} (auto)</b>" in dom
    # The script and the img handler arrived as text and did not run.
    assert "<title>chat-runner viewer</title>" in dom and "pwned</title>" not in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x onerror=" in dom
    assert '<img src="x"' not in dom
    # The second conversation: the input reply shown as the reference beside the generated turn.
    second = chromium(moved, "#c=1", tmp_path, "--dump-dom")
    assert count(second, "assistant") == 2 and count(second, "reference") == 1
    assert re.search(r'class="turnmeta[^"]*"[^>]*>\d+ tokens · [\d.]+ s · (stop|length)<', second)
    found = chromium(moved, "#q=capital", tmp_path, "--dump-dom")
    assert "1 of 2 conversations shown" in found and 'id="n-search">1<' in found
    # The match marked in the list, the conversation's title and its text.
    assert '<div class="id"><mark class="hit">capital</mark></div>' in found
    assert '<span class="convid"><mark class="hit">capital</mark></span>' in found
    assert 'What is the <mark class="hit">capital</mark> of France?' in found


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
    # A row per message: the input's messages once across both jobs, each job's replies side by side.
    assert count(dom, "cell shared") == 3  # the two user messages and the reference
    assert len(re.findall(r'class="cell" data-message="\d" data-job="\d"', dom)) == 4
    assert count(dom, "turn assistant differs") == 0
    assert len(re.findall(r"<tr>", dom)) == 3 + 2  # the report table (a header and a row per job), extra keys
    assert "<mark" not in dom
    highlighted = chromium(page, "#c=1&base=0&diff=1", tmp_path, "--dump-dom")
    assert count(highlighted, "turn assistant differs") == 1  # the edited reply, and only it
    assert re.findall(r'<mark class="changed">([^<]*)</mark>', highlighted) == ["Arr,", "matey!"]


@pytest.mark.slow
def test_each_filter_counts_and_shows_its_conversations(counted, browser):
    page = counted / "index.html"
    browser.open(page)
    counts = {
        key: browser.js(f"document.getElementById('n-{key}').textContent")
        for key in ("differ", "errors", "length")
    }
    assert counts == {"differ": "3", "errors": "2", "length": "3"}
    assert (
        browser.js("document.getElementById('filters').textContent").count("only ") == 3
    )  # and nothing else
    shown = lambda: browser.texts("#list li .id")  # noqa: E731
    assert (
        len(shown()) == 10
        and browser.js("document.getElementById('count').textContent") == "10 conversations"
    )
    for key, ids in (
        ("differ", ["c1", "c4", "c7"]),
        ("errors", ["c2", "c5"]),
        ("length", ["c3", "c4", "c6"]),
    ):
        browser.js(f"document.getElementById('only-{key}').click()")
        assert shown() == ids, key
        assert (
            browser.js("document.getElementById('count').textContent")
            == f"{len(ids)} of 10 conversations shown"
        )
        browser.js(f"document.getElementById('only-{key}').click()")
    # Filters combine, are kept in the link, and the baseline's other job has the same differences.
    browser.js(
        "document.getElementById('only-differ').click(); document.getElementById('only-length').click()"
    )
    assert shown() == ["c4"] and "only=differ%2Clength" in browser.js("location.hash")
    browser.open(page, "#base=1&only=differ")
    assert (
        shown() == ["c1", "c4", "c7"] and browser.js("document.getElementById('n-differ').textContent") == "3"
    )
    # Search: its own count, and each match marked where it is.
    browser.open(page, "#c=0")
    browser.press("/")
    browser.type("MATEY")
    assert shown() == ["c1"] and browser.js("document.getElementById('n-search').textContent") == "1"
    assert browser.texts("#chat mark.hit") == ["matey"]
    assert browser.texts("#chat .turn.assistant mark.hit") == ["matey"]


@pytest.mark.slow
def test_keys_step_through_the_conversations_shown(counted, browser):
    browser.open(counted / "index.html", "#c=0&only=length")
    selected = lambda: browser.js("document.querySelector('#list li.selected .id').textContent")  # noqa: E731
    convid = lambda: browser.js("document.querySelector('#chat .convid').textContent")  # noqa: E731
    assert selected() == convid() == "c3"  # c0 is not shown: the first one that is
    browser.press("j")
    assert selected() == convid() == "c4"
    browser.press("ArrowRight")
    assert selected() == convid() == "c6"
    browser.press("j")  # the last one: it stays
    assert convid() == "c6" and browser.js("document.getElementById('nextconv').disabled")
    browser.press("k")
    browser.press("ArrowLeft")
    assert selected() == convid() == "c3" and "c=3" in browser.js("location.hash")
    browser.js("document.getElementById('nextconv').click()")
    assert convid() == "c4"


@pytest.mark.slow
def test_the_panel_shows_the_record_its_extra_keys_and_the_run_config(counted, browser):
    browser.open(counted / "index.html", "#c=7")
    rows = "[...document.querySelectorAll('#panel table.extra tr')]"
    extra = browser.js(f"{rows}.map((row) => [...row.cells].map((cell) => cell.textContent))")
    assert extra == [["topic", "geography"], ["meta", '{"source":"a test","level":1}']]
    jobs = [next(counted.glob("0_*")), next(counted.glob("1_*"))]
    written = [next(r for r in read_jsonl(job / "chats" / "chats.jsonl") if r["id"] == "c7") for job in jobs]
    raw = browser.texts("#panel details[data-panel=raw] pre")
    assert [json.loads(text) for text in raw] == written
    assert [list(json.loads(text)) for text in raw] == [
        list(record) for record in written
    ]  # in its key order
    configs = browser.texts("#panel details[data-panel=config] pre")
    assert len(configs) == 2 and all("# overrides\n" in config for config in configs)
    assert "method: none" in configs[0] and "method: int8" in configs[1]


@pytest.mark.slow
def test_the_layout_at_420_and_1400_px(counted, browser, tmp_path):
    """Measured where a user would look; the screenshots are for a person to look at too."""
    page = counted / "index.html"
    browser.open(page, "#c=4&diff=1", width=1400)
    chat, nav = browser.box("#chat"), browser.box("nav")
    assert nav["right"] <= chat["left"] and chat["width"] >= 1000  # the list beside the chat
    # Turns line up across the jobs: after job 1's 40-line first reply, both second replies start level.
    first = [browser.box(f'.cell[data-message="1"][data-job="{job}"]') for job in (0, 1)]
    second = [browser.box(f'.cell[data-message="3"][data-job="{job}"]') for job in (0, 1)]
    assert first[1]["height"] > 5 * first[0]["height"]
    assert first[0]["top"] == first[1]["top"] and second[0]["top"] == second[1]["top"]
    assert second[0]["left"] < second[1]["left"] and second[0]["right"] <= second[1]["left"]  # side by side
    # The chart at full size, its jobs labelled as the table and the columns are, and what they ran on.
    labels = browser.js(
        "[...document.querySelectorAll('.chartlabel')].map((label) => label.firstChild.textContent)"
    )
    table = browser.js(
        "[...document.querySelectorAll('table.report tr')].slice(1).map((r) => r.cells[0].textContent)"
    )
    assert labels == table == ["quant=none", "quant=int8"]
    assert browser.texts("h2.jobhead") == ["quant=none (baseline)", "quant=int8"]
    assert all(
        re.fullmatch(r"(fp32|bf16|fp16)/(cpu|cuda:\d)", setup) for setup in browser.texts(".chartlabel small")
    )
    assert browser.box(".chart")["width"] >= 400
    wide = browser.screenshot(tmp_path / "viewer-1400.png")

    browser.open(page, "#c=4&diff=1", width=420)
    chat, nav = browser.box("#chat"), browser.box("nav")
    assert chat["width"] >= 300 and nav["bottom"] <= chat["top"]  # the list folded above the chat
    assert browser.js("document.documentElement.scrollWidth") <= 420  # nothing sticks out sideways
    assert browser.js("getComputedStyle(document.getElementById('list')).display") == "none"
    browser.js("document.getElementById('togglelist').click()")
    assert browser.box("#list")["height"] > 0
    # One job's reply under the other's, each as wide as the chat.
    cells = [browser.box(f'.cell[data-message="3"][data-job="{job}"]') for job in (0, 1)]
    assert all(cell["width"] >= 300 for cell in cells) and cells[0]["bottom"] <= cells[1]["top"]
    assert browser.texts(".jobtag")[:2] == ["quant=none (baseline)", "quant=int8"]
    narrow = browser.screenshot(tmp_path / "viewer-420.png", full_page=True)
    for shot in (wide, narrow):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@pytest.mark.slow
def test_the_report_chart_labels_jobs_as_the_viewer_with_resolved_precision_and_device(sweep, tmp_path):
    from runner.tools.report import _chart, chart_labels, job_rows

    rows = job_rows(sweep)
    setups = []
    for row in rows:
        loaded = json.loads((sweep / row["job"] / "summary.json").read_text())["loaded"]
        setups.append(
            {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[loaded["dtype"]]
            + "/"
            + loaded["device"]
        )
    assert chart_labels(rows, sweep) == [f"quant=none\n{setups[0]}", f"quant=int8\n{setups[1]}"]
    assert [row["precision"] for row in rows] == ["auto", "auto"]  # what the config said, not what ran
    shutil.copytree(sweep, tmp_path / "sweep")
    chart = tmp_path / "sweep" / "report.svg"  # the same drawing, its text kept as comments
    _chart(rows, chart)
    text = re.findall(r"<!-- (.*?) -->", chart.read_text())
    assert {"quant=none", "quant=int8", setups[0], setups[1]} <= set(text)
    assert not any("auto" in line or line.startswith(("0_", "1_")) for line in text)
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert "1 of 10000 conversations shown" in found and "97535376" in found


def test_a_directory_that_is_no_run_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "runner.view", str(tmp_path)], cwd=PROJECT, capture_output=True, text=True
    )
    assert done.returncode == 1 and "neither a run dir" in done.stderr
