"""Side-by-side throughput: the seed's way (a bare TextGenerationPipeline loop) against the runner.

Each contender runs in its own process on the same conversations with the same forced number of
new tokens (min_new_tokens = max_new_tokens), so generated tokens/s and peak RSS compare fairly:

    .venv/bin/python benchmarks/throughput.py --input ../shared/data/mt_bench_questions.jsonl \\
        --conversations 16 --new-tokens 64

It prints tokens/s of each, the ratio to the seed's way, peak RSS, the measured memory bandwidth,
the batch-1 roofline (bandwidth / weight bytes) and the fraction of it each reached, and how many
replies are identical to the seed's way. The speculative row compares batch-1 latency per turn
with prompt lookup decoding (`lookup`) against batch 1 without it (`batch1`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
CONTENDERS = {
    "seed": "bare TextGenerationPipeline loop, batch 1 (the seed's way)",
    "pipeline": "python -m runner engine=pipeline",
    "batched": "python -m runner engine=batched",
    "batch1": "python -m runner engine.batch_size=1 (the speculative rows' baseline)",
    "lookup": "python -m runner generation.prompt_lookup_num_tokens=N (batch 1)",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="any JSONL the runner reads")
    parser.add_argument("--conversations", type=int, default=16, help="the first N conversations")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced new tokens per turn")
    parser.add_argument("--batch-size", help="engine.batch_size for engine=batched (default: the config's)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"any of {','.join(CONTENDERS)}")
    parser.add_argument("--lookup-tokens", type=int, default=3, help="N of the lookup contender")
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override, e.g. precision=bf16"
    )
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_contender(args)))
        return

    from runner.model import memory_bandwidth

    bandwidth = memory_bandwidth("cpu", Path(tempfile.mkdtemp()))  # measured afresh for this run
    results = {}
    for name in args.contenders.split(","):
        command = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, check=False)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    report(results, bandwidth, args)


def run_contender(args: argparse.Namespace) -> dict:
    """Load the model as the runner does, replay, and measure; runs in a child process."""
    from hydra import compose, initialize_config_dir

    from runner import engine, model
    from runner.conversations import load_conversations, resolve_input_files
    from runner.replay import replay_all
    from runner.schema import register_configs, to_run_config

    register_configs()
    engine_choice = {"seed": "pipeline", "pipeline": "pipeline"}.get(args.child, "batched")
    overrides = [
        f"engine={engine_choice}",
        f"generation.max_new_tokens={args.new_tokens}",
        f"generation.min_new_tokens={args.new_tokens}",
        *args.override,
    ]
    if args.child == "batched" and args.batch_size:
        overrides.append(f"engine.batch_size={args.batch_size}")
    if args.child == "batch1":
        overrides.append("engine.batch_size=1")
    if args.child == "lookup":
        overrides.append(f"generation.prompt_lookup_num_tokens={args.lookup_tokens}")
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT / "conf")):
        cfg = to_run_config(compose(config_name="config", overrides=overrides))
    conversations = load_conversations(resolve_input_files(args.input))[: args.conversations]

    load_start = time.perf_counter()
    hardware, arguments = model.prepare(cfg)
    pipe = model.load_pipeline(
        arguments.load, engine.ChatReplayPipeline, model.load_tokenizer(arguments.load)
    )
    load_seconds = time.perf_counter() - load_start

    start = time.perf_counter()
    turn_seconds, speculative = [], None
    if args.child == "seed":
        replies = seed_way(pipe, conversations, args.new_tokens)
        generated = len(replies) * args.new_tokens  # min_new_tokens forces every reply's length
    else:
        batch_size = model.resolve_batch_size(cfg, hardware)
        chat_engine = engine.create_engine(cfg, pipe, arguments.generate, batch_size)
        replies, generated = [], 0
        for result in replay_all(conversations, chat_engine, cfg.replay.mode, run_seed=0):
            replies += [result.messages[turn.message_index].content for turn in result.turns]
            generated += sum(turn.new_tokens for turn in result.turns)
            turn_seconds += [(position, turn.seconds) for position, turn in enumerate(result.turns)]
        speculative = chat_engine.speculation.summary() if chat_engine.speculation else None
    seconds = time.perf_counter() - start
    return {
        "turn_seconds": turn_seconds,
        "speculative": speculative,
        "replies": replies,
        "generated_tokens": generated,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "weights_bytes": pipe.model.get_memory_footprint(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def seed_way(pipe, conversations, new_tokens: int) -> list[str]:
    """The chat pipeline guide's loop: one pipeline call per user turn, the whole history re-sent."""
    replies = []
    for conversation in conversations:
        history = []
        for message in conversation.messages:
            if message.role == "assistant":
                continue  # regenerate: the model's own replies form the history
            history.append(message.as_dict())
            if message.role == "user":
                out = pipe(history, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                history = out[0]["generated_text"]
                replies.append(history[-1]["content"])
    return replies


def report(results: dict[str, dict], bandwidth: float, args: argparse.Namespace) -> None:
    weights = next(iter(results.values()))["weights_bytes"]
    roofline = bandwidth / weights
    baseline = results.get("seed")
    print(
        f"workload: {args.input}, first {args.conversations} conversations, {args.new_tokens} new tokens "
        f"per turn; overrides: {' '.join(args.override) or 'none'}"
    )
    print(
        f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weights / 1e6:.0f} MB; "
        f"batch-1 roofline {roofline:.1f} tokens/s"
    )
    header = f"{'contender':<10} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs seed':>8} {'roofline':>9} "
    print(header + f"{'peak RSS':>9} {'same text':>10}  what")
    for name, result in results.items():
        speed = result["generated_tokens"] / result["seconds"]
        ratio = f"{speed / (baseline['generated_tokens'] / baseline['seconds']):.2f}x" if baseline else "-"
        same = (
            f"{sum(a == b for a, b in zip(result['replies'], baseline['replies'], strict=True))}"
            f"/{len(baseline['replies'])}"
            if baseline
            else "-"
        )
        rss = result["peak_rss_bytes"] / 2**30
        print(
            f"{name:<10} {result['generated_tokens']:>7} {result['seconds']:>8.1f} {speed:>8.1f} "
            f"{ratio:>8} {speed / roofline:>8.0%} {rss:>7.2f}G {same:>10}  {CONTENDERS[name]}"
        )
    if "batch1" in results and "lookup" in results:
        plain, lookup = results["batch1"]["turn_seconds"], results["lookup"]["turn_seconds"]
        accepted = results["lookup"]["speculative"]
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
