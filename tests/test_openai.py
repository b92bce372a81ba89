"""engine=openai: the config composes into exactly the requests a server gets, and, against a real
server (`transformers serve` on the embedded model, one per module) and a fault-injecting proxy in
front of it, the replay survives every fault with the same greedy text, stops at once on a wrong
key, model or address, resumes after kill -9, keeps its key out of the run dir, and starts and stops
its own server with engine.serve."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from test_cli import PROJECT, read_jsonl

from runner.config.compose import to_run_config
from runner.engines.openai import request_body
from runner.engines.protocol import Request, Sampling
from runner.engines.remote.faults import retry_after
from runner.engines.remote.pacing import RateLimits
from runner.engines.remote.server import free_port
from runner.errors import ConfigError
from runner.inputs.conversation import Message
from runner.loading import served_model

TRANSFORMERS_CLI = Path(sys.executable).parent / "transformers"
SERVE = f"{TRANSFORMERS_CLI} serve {{model}} --port {{port}} --host 127.0.0.1 --device cpu"


def questions(count: int, start: int = 0) -> list[dict]:
    """MT-bench question lines: two turns each, the second answered with the model's own history."""
    return [
        {
            "question_id": 81 + n,
            "category": "writing",
            "turns": [f"Name a city with {n} in its name.", "Why?"],
        }
        for n in range(start, start + count)
    ]


# --- what the config composes into (no server) ----------------------------------------------------


def test_a_preset_asks_the_server_for_its_hub_name(compose_config):
    cfg = to_run_config(
        compose_config("engine=openai", "engine.base_url=http://h:8000/v1", "model=llama3_8b")
    )
    assert served_model(cfg) == "meta-llama/Meta-Llama-3-8B-Instruct"  # the name `vllm serve` gives it
    cfg = to_run_config(
        compose_config("engine=openai", "engine.base_url=http://h/v1", "model=server", "model.id=x/y")
    )
    assert served_model(cfg) == "x/y"


def test_greedy_and_sampled_turns_become_these_requests():
    messages = (Message("system", "Be brief."), Message("user", "Hi"))
    greedy = request_body("m", Request(messages, seed=7), Sampling(max_new_tokens=16, stop=("\n",)))
    assert greedy == {
        "model": "m",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 16,
        "temperature": 0.0,
        "stop": ["\n"],
    }
    sampling = Sampling(16, min_new_tokens=2, do_sample=True, temperature=0.7, top_p=0.9, top_k=40)
    sampled = request_body("m", Request(messages, seed=7), sampling)
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"]) == (0.7, 0.9, 7)  # the turn's own seed
    assert sampled["extra_body"] == {"top_k": 40, "min_tokens": 2}  # what vLLM, SGLang, llama.cpp, TGI read


def test_engine_extra_body_reaches_every_request(compose_config):
    cfg = to_run_config(
        compose_config("engine=openai", "engine.base_url=http://h/v1", "+engine.extra_body={ignore_eos:true}")
    )
    body = request_body(
        "m", Request((Message("user", "Hi"),), seed=1), Sampling(8, min_new_tokens=8), cfg.engine.extra_body
    )
    assert body["extra_body"] == {"ignore_eos": True, "min_tokens": 8}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["precision=bf16"], "precision=bf16 cannot apply here"),
        (["quant=int4"], "quant=int4 cannot apply here"),
        (["device=cpu"], "device=cpu cannot apply here"),
        (["generation.prompt_lookup_num_tokens=3"], "generation.prompt_lookup_num_tokens"),
        (["engine.batch_size=4"], "set engine.concurrency, not engine.batch_size"),
        (["engine.serve='x --port {port}'"], "needs one of engine.base_url"),
        (["engine.base_url=null", "engine.serve='vllm serve {model}'"], "put {port} in the command"),
        (["engine.api_key_env=sk-proj-abc123"], "the NAME of an environment variable"),
        (["engine.concurrency=0"], "engine.concurrency must be > 0"),
    ],
)
def test_what_does_not_apply_to_a_server_is_one_config_error(compose_config, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_run_config(compose_config("engine=openai", "engine.base_url=http://h/v1", *overrides))


def test_model_server_needs_engine_openai(compose_config):
    with pytest.raises(ConfigError, match="add engine=openai"):
        to_run_config(compose_config("model=server", "model.id=anything"))


def test_rate_limits_spread_requests_and_tokens_over_the_minute():
    now = [100.0]
    limits = RateLimits(requests_per_minute=120, tokens_per_minute=None, clock=lambda: now[0])
    assert [limits.reserve(10) for _ in range(3)] == [0.0, 0.5, 1.0]  # 2 a second, no burst
    tokens = RateLimits(requests_per_minute=None, tokens_per_minute=600, clock=lambda: now[0])
    assert tokens.reserve(100) == 0.0 and tokens.reserve(100) == 10.0  # 100 tokens = 10 s of 600/min
    tokens.settle(estimated=100, spent=40)  # the server counted fewer: the next goes sooner
    assert tokens.reserve(1) == pytest.approx(14.0)


def test_retry_after_reads_seconds_milliseconds_and_dates():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after({"retry-after": date}) <= 30
    assert retry_after({}) is None


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_plan_says_there_is_nothing_to_plan_here(write_jsonl, tmp_path):
    source = write_jsonl(questions(2))
    done = run_cli(
        "engine=openai", "engine.base_url=http://127.0.0.1:9/v1", f"input.path={source}", "plan=true"
    )
    assert done.returncode == 0, done.stderr
    assert "nothing to plan on this machine" in done.stdout


# --- against a real server -----------------------------------------------------------------------


def _wait_for(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "transformers serve exited"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def server(embedded_dir):
    """`transformers serve` on the embedded model (fp32, CPU, one request at a time), for the module."""
    port = free_port()
    command = SERVE.format(model=embedded_dir, port=port).split()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", process, 180)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def replay(server_url: str, source: Path, run_dir: Path, *overrides: str, model: str) -> dict:
    import runner

    return runner.run(
        [
            "engine=openai",
            f"engine.base_url={server_url}",
            "model=server",
            f"model.id={model}",
            f"input.path={source}",
            "generation.max_new_tokens=8",
            *overrides,
        ],
        run_dir,
    )


@pytest.fixture(scope="module")
def clean_run(server, embedded_dir, tmp_path_factory):
    """Six MT-bench questions replayed straight to the server: what every faulty run must equal."""
    directory = tmp_path_factory.mktemp("clean")
    source = directory / "mt_bench.jsonl"
    source.write_text("".join(json.dumps(q) + "\n" for q in questions(6)))
    summary = replay(f"{server}/v1", source, directory / "run", model=str(embedded_dir))
    return source, summary, read_jsonl(directory / "run" / "chats" / "mt_bench.jsonl")


@pytest.mark.slow
def test_mt_bench_replays_turn_by_turn_with_the_models_own_history(clean_run, embedded_dir):
    _, summary, records = clean_run
    assert [r["question_id"] for r in records] == list(range(81, 87))
    for record in records:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        first, second = record["replay"]["turns"]
        # The second prompt holds the first reply: the server counted more tokens for it.
        assert second["prompt_tokens"] > first["prompt_tokens"] + first["new_tokens"]
        for turn in (first, second):
            assert 0 < turn["new_tokens"] <= 8 and turn["finish_reason"] in ("stop", "length")
            assert turn["server_model"] == str(embedded_dir) and turn["seconds"] > 0
    assert summary["engine"] == "openai" and summary["status"] == "completed"
    assert summary["requests"] == {
        "sent": 12,
        "answered": 12,
        "retried": {},
        "failed": {},
        "rate_limit_wait_seconds": 0.0,
    }
    assert summary["server"]["answered_as"] == [str(embedded_dir)]
    assert summary["roofline"] is None and summary["memory_plan"] is None


@pytest.mark.slow
def test_every_fault_is_retried_and_counted_with_the_same_greedy_text(
    clean_run, server, embedded_dir, tmp_path
):
    source, _, clean = clean_run
    faults = {1: "429", 2: "500", 4: "503", 6: "drop", 8: "hold"}
    # The held request outlasts the timeout; a loaded machine's normal answers stay well inside it.
    with FaultProxy(server, fault=lambda number, body: faults.get(number), hold_s=14) as proxy:
        summary = replay(
            proxy.url,
            source,
            tmp_path,
            "engine.timeout_s=10",
            "engine.concurrency=2",
            model=str(embedded_dir),
        )
    records = read_jsonl(tmp_path / "chats" / "mt_bench.jsonl")
    assert [r["messages"] for r in records] == [r["messages"] for r in clean]  # once each, same text
    assert summary["requests"]["retried"] == {
        "rate_limited": 1,
        "server_error": 2,
        "connection": 1,
        "timeout": 1,
    }
    assert summary["requests"]["failed"] == {} and summary["errors"] == {}
    # The 429 said Retry-After: 1, and its request came back no sooner.
    first_at, _, first_body = proxy.arrivals[0]
    again = next(at for at, number, body in proxy.arrivals[1:] if body == first_body)
    assert again - first_at >= 1.0


@pytest.mark.slow
def test_a_request_that_keeps_failing_ends_its_conversation_and_the_run_goes_on(
    clean_run, server, embedded_dir, tmp_path
):
    source, _, clean = clean_run

    def fault(number, body):
        text = body["messages"][0]["content"]
        return "500" if " 2 " in text else "context" if " 4 " in text else None

    with FaultProxy(server, fault=fault) as proxy:
        summary = replay(proxy.url, source, tmp_path, "engine.max_retries=2", model=str(embedded_dir))
    records = read_jsonl(tmp_path / "chats" / "mt_bench.jsonl")
    errors = {r["question_id"]: r["replay"]["error"] for r in records if r["replay"]["error"]}
    assert {key: error["code"] for key, error in errors.items()} == {
        83: "server_error",
        85: "context_overflow",
    }
    assert (
        summary["errors"] == {"server_error": 1, "context_overflow": 1} and summary["status"] == "completed"
    )
    assert summary["requests"]["retried"] == {"server_error": 2}  # max_retries=2, then given up
    assert summary["requests"]["failed"] == {"server_error": 1, "context_overflow": 1}
    assert [r["messages"] for r in records if not r["replay"]["error"]] == [
        r["messages"] for r in clean if r["question_id"] not in errors
    ]
    assert [m["role"] for m in records[2]["messages"]] == ["user", "user"]  # the whole conversation kept


@pytest.mark.slow
def test_rate_limits_space_the_requests_the_server_sees(clean_run, server, embedded_dir, tmp_path):
    source, _, _ = clean_run
    with FaultProxy(server) as proxy:
        summary = replay(
            proxy.url,
            source,
            tmp_path,
            "engine.requests_per_minute=240",
            "engine.concurrency=6",
            model=str(embedded_dir),
        )
    arrivals = sorted(at for at, _, _ in proxy.arrivals)
    assert len(arrivals) == 12
    assert arrivals[-1] - arrivals[0] >= 11 * 0.25 - 0.05  # 240 a minute, spread evenly
    assert min(b - a for a, b in itertools.pairwise(arrivals)) >= 0.15
    assert summary["requests"]["rate_limit_wait_seconds"] > 0


@pytest.mark.slow
def test_the_key_goes_to_the_server_and_never_into_the_run_dir(
    clean_run, server, embedded_dir, tmp_path, monkeypatch
):
    source, _, _ = clean_run
    key = "sk-test-0123456789abcdef"
    monkeypatch.setenv("CHAT_RUNNER_TEST_KEY", key)
    with FaultProxy(server, key=key) as proxy:
        replay(
            proxy.url, source, tmp_path, "engine.api_key_env=CHAT_RUNNER_TEST_KEY", model=str(embedded_dir)
        )
    assert set(proxy.authorizations) == {f"Bearer {key}"}
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and not [path for path in written if key.encode() in path.read_bytes()]


@pytest.mark.slow
def test_a_wrong_key_model_or_address_stops_the_run_in_one_line(clean_run, server, embedded_dir, tmp_path):
    source, _, _ = clean_run
    common = ("engine=openai", "model=server", f"input.path={source}", "generation.max_new_tokens=4")
    with FaultProxy(server, key="the-right-key") as proxy:
        wrong_key = run_cli(
            *common,
            f"engine.base_url={proxy.url}",
            f"model.id={embedded_dir}",
            "engine.api_key_env=CHAT_RUNNER_TEST_KEY",
            f"hydra.run.dir={tmp_path / 'key'}",
            env={"CHAT_RUNNER_TEST_KEY": "a-wrong-key-42"},
        )
    wrong_model = run_cli(
        *common,
        f"engine.base_url={server}/v1",
        "model.id=meta-llama/Nope",
        f"hydra.run.dir={tmp_path / 'model'}",
    )
    # transformers serve refuses fields it does not know: generation=sampling's top_k=50 is one.
    unknown_field = run_cli(
        *common,
        f"engine.base_url={server}/v1",
        f"model.id={embedded_dir}",
        "generation=sampling",
        f"hydra.run.dir={tmp_path / 'field'}",
    )
    started = time.monotonic()
    # A hub preset through a server: no tokenizer or weights are looked for (no hub here), the
    # server is asked first.
    unreachable = run_cli(
        "engine=openai",
        "model=llama3_8b",
        f"input.path={source}",
        f"engine.base_url=http://127.0.0.1:{free_port()}/v1",
        f"hydra.run.dir={tmp_path / 'url'}",
    )
    assert time.monotonic() - started < 30
    for done, words in (
        (wrong_key, "refused the key in $CHAT_RUNNER_TEST_KEY (401)"),
        (wrong_model, f"does not offer model 'meta-llama/Nope'; it offers: {embedded_dir}"),
        (unknown_field, "requests and answered none (422): Unexpected fields"),  # 3 or more at once
        (unreachable, "cannot reach the server at http://127.0.0.1:"),
    ):
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert words in done.stderr.strip().splitlines()[-1]
    assert "a-wrong-key-42" not in wrong_key.stderr + wrong_key.stdout


@pytest.mark.slow
def test_kill_9_then_resume_sends_the_lost_turns_again_and_writes_nothing_twice(
    clean_run, server, embedded_dir, tmp_path
):
    source, _, clean = clean_run
    chats = tmp_path / "chats" / "mt_bench.jsonl"
    command = [
        *(sys.executable, "-m", "runner", "engine=openai", f"engine.base_url={server}/v1", "model=server"),
        *(f"model.id={embedded_dir}", f"input.path={source}", "generation.max_new_tokens=8"),
        *("engine.concurrency=2", f"hydra.run.dir={tmp_path}"),
    ]
    started = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (chats.exists() and chats.read_bytes().count(b"\n") >= 2):
        time.sleep(0.1)
    started.send_signal(signal.SIGKILL)
    started.wait()
    kept = [json.loads(line) for line in chats.read_bytes().split(b"\n")[:-1]]
    assert 2 <= len(kept) < 6
    resumed = subprocess.run(
        [*command, "resume=true"], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_jsonl(chats)
    assert records[: len(kept)] == kept
    assert [r["messages"] for r in records] == [r["messages"] for r in clean]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _server_pid(run_dir: Path) -> int:
    """The pid of the server the run dir's latest session started."""
    log = (run_dir / "chat-runner.log").read_text()
    return int(log.rsplit("started the server (pid ", 1)[1].split(")")[0])


def _wait_for_records(chats: Path, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (chats.exists() and chats.read_bytes().count(b"\n") >= count):
        time.sleep(0.1)


@pytest.mark.slow
def test_engine_serve_starts_its_own_server_and_no_way_of_ending_leaves_it_behind(clean_run, tmp_path):
    source, _, clean = clean_run
    chats = tmp_path / "chats" / "mt_bench.jsonl"
    command = [
        *(sys.executable, "-m", "runner", "engine=openai", f"engine.serve='{SERVE}'", f"input.path={source}"),
        *("generation.max_new_tokens=8", "engine.concurrency=1", f"hydra.run.dir={tmp_path}"),
    ]
    quiet = {"cwd": PROJECT, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    first = subprocess.Popen(command, **quiet)
    _wait_for_records(chats, 1, 180)
    pid = _server_pid(tmp_path)
    assert _alive(pid)
    first.send_signal(signal.SIGTERM)
    assert first.wait(60) != 0 and not _alive(pid)  # SIGTERM: the run stops its server
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"
    second = subprocess.Popen([*command, "resume=true"], **quiet)
    _wait_for_records(chats, 3, 180)
    pid = _server_pid(tmp_path)
    second.send_signal(signal.SIGKILL)
    second.wait()
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)  # kill -9: the kernel told the server its runner died
    third = subprocess.run(
        [*command, "resume=true"], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert [r["messages"] for r in read_jsonl(chats)] == [r["messages"] for r in clean]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["server"]["started_with"][0] == str(TRANSFORMERS_CLI)
    assert not _alive(_server_pid(tmp_path))  # and at the end
    assert (tmp_path / "server.log").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "serve, words",
    [
        ("bash {script} {port}", "exited with code 3 before answering"),
        ("sleep 30 {port}", "did not answer on port"),
    ],
)
def test_a_server_that_exits_or_never_answers_is_one_line_with_its_log(write_jsonl, tmp_path, serve, words):
    source = write_jsonl(questions(1))
    script = tmp_path / "server.sh"
    script.write_text("echo no such model >&2; exit 3\n")
    started = time.monotonic()
    done = run_cli(
        "engine=openai",
        f"engine.serve='{serve.replace('{script}', str(script))}'",
        "engine.serve_timeout_s=3",
        f"input.path={source}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert words in done.stderr and time.monotonic() - started < 60
    if "script" in serve:
        assert "no such model" in done.stderr  # the server's last log lines
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in processes if line.startswith("sleep 30 ")]  # stopped after the wait


LLAMA_DIR = Path(os.environ.get("CHAT_RUNNER_CACHE", "~/.cache/chat-runner")).expanduser() / "llama.cpp"
LLAMA_SERVER, LLAMA_GGUF = LLAMA_DIR / "build" / "bin" / "llama-server", LLAMA_DIR / "smollm2-135m-f32.gguf"


@pytest.mark.slow
@pytest.mark.skipif(
    not (LLAMA_SERVER.exists() and LLAMA_GGUF.exists()),
    reason="no llama-server (benchmarks/build_llama_server.sh)",
)
def test_llama_cpps_server_started_by_engine_serve(tmp_path, write_jsonl):
    source = write_jsonl(questions(2))
    serve = f"{LLAMA_SERVER} -m {LLAMA_GGUF} --host 127.0.0.1 --port {{port}} --alias smollm2 -np 2 -c 2048"
    done = run_cli(
        "engine=openai",
        f"engine.serve='{serve}'",
        "model=server",
        "model.id=smollm2",
        f"input.path={source}",
        "generation.max_new_tokens=8",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(tmp_path / "run" / "chats" / source.name)
    assert [[m["role"] for m in r["messages"]] for r in records] == [["user", "assistant"] * 2] * 2
    assert {turn["server_model"] for r in records for turn in r["replay"]["turns"]} == {"smollm2"}
