"""Decode speed of the continuous engine's forward pass against the memory roofline, on a model of a
preset's shape with random weights (nothing to download): how close a decode step comes to reading
the weights and the KV cache once at the device's memory bandwidth.

    python benchmarks/decode_roofline.py --preset llama3_8b --batch 256 --device cuda --graphs

The model is a Llama of the preset's figures (conf/model/<preset>.yaml `architecture`: layers,
width, heads, vocabulary; the MLP width solved from the parameter count), or of a checkpoint's
config.json (`--like DIR`). Every row prefills `--context` random tokens, then `--steps` decode
steps are timed, each row taking its argmax as the next token (the engine's greedy path). A step
must read the weights once and each row's KV cache: `roofline` is the tokens/s that reading those
bytes at `--bandwidth` allows (4.8 TB/s: an H200's HBM3e), and the last column the share of it
reached. `--graphs` replays the steps as CUDA graphs (engine.cuda_graphs), whose passes read each
slot's whole capacity.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

PROJECT = Path(__file__).resolve().parent.parent


def llama_config(preset: str, layers: int | None):
    """A LlamaConfig of the preset's architecture figures: hidden_size / head_dim query heads, and
    the MLP width that makes the parameter count come out (llama3_8b: 32 heads, 14336, as its
    config.json says)."""
    from transformers import LlamaConfig

    figures = OmegaConf.load(PROJECT / "conf" / "model" / f"{preset}.yaml").get("architecture")
    if figures is None:
        raise SystemExit(f"conf/model/{preset}.yaml has no architecture figures: use --like DIR")
    if figures.get("active_params"):
        raise SystemExit(f"{preset} is a mixture of experts, not a dense Llama: use --like DIR")
    hidden, head_dim, kv_heads = figures.hidden_size, figures.head_dim, figures.kv_heads
    heads = hidden // head_dim
    embeddings = figures.vocab_size * hidden * (1 if figures.tied_embeddings else 2)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    per_layer = (figures.params - embeddings - hidden) / figures.layers - attention - 2 * hidden
    intermediate = round(per_layer / (3 * hidden))
    config = LlamaConfig(
        vocab_size=figures.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=figures.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=figures.context_length,
        tie_word_embeddings=figures.tied_embeddings,
    )
    if layers:
        config.num_hidden_layers = layers
    return config


def random_model(config, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--preset", help="a model preset with architecture figures, e.g. llama3_8b")
    shape.add_argument("--like", type=Path, help="a checkpoint directory whose config.json gives the shape")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape's (a smoke test)")
    parser.add_argument("--batch", type=int, default=256, help="rows decoding together")
    parser.add_argument("--context", type=int, default=512, help="tokens each row holds before decoding")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--graphs", action="store_true", help="decode steps as CUDA graphs")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bandwidth, bytes/s")
    args = parser.parse_args()

    from transformers import AutoConfig

    from runner.engines.continuous import prepare_model
    from runner.engines.continuous.decode_graphs import DecodeGraphs
    from runner.engines.continuous.forward import Forward
    from runner.engines.continuous.slot_cache import SlotCache

    config = llama_config(args.preset, args.layers) if args.preset else AutoConfig.from_pretrained(args.like)
    if args.like and args.layers:
        config.num_hidden_layers = args.layers
    dtype = getattr(torch, args.dtype)
    model = random_model(config, dtype, args.device)
    prepare_model(model, args.batch)  # as engine=continuous runs it
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = SlotCache(config.num_hidden_layers, args.batch)
    cache.fit(args.batch, args.context + args.steps + 4)  # no growth while timed
    forward = Forward(model, cache)
    graphs = (
        DecodeGraphs(forward, args.batch, pad=0, record=args.device.startswith("cuda"))
        if args.graphs
        else None
    )

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, config.vocab_size, (args.batch, args.context), generator=generator).tolist()
    group = max(1, 8192 // args.context)  # rows per prefill pass
    for first in range(0, args.batch, group):
        rows = list(range(first, min(first + group, args.batch)))
        forward([prompts[row] for row in rows], [0] * len(rows), rows)
    tokens = [[prompt[-1]] for prompt in prompts]

    def step(position: int) -> list[list[int]]:
        starts = [position] * args.batch
        logits = graphs(tokens, starts) if graphs else forward(tokens, starts, slice(0, args.batch))
        return [[token] for token in logits.argmax(-1).tolist()]

    position = args.context
    for _ in range(3):  # warm-up (and, with graphs, recording)
        tokens = step(position)
        position += 1
    synchronize = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        tokens = step(position)
        position += 1
    synchronize()
    seconds = time.perf_counter() - started

    text = config.get_text_config()
    kv_heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    read = cache.capacity if graphs else args.context + 3 + args.steps // 2  # keys a step reads per row
    step_bytes = weights + args.batch * read * per_token
    measured = args.batch * args.steps / seconds
    roofline = args.batch / (step_bytes / args.bandwidth)
    result = {
        "shape": args.preset or str(args.like),
        "layers": text.num_hidden_layers,
        "dtype": args.dtype,
        "device": args.device,
        "graphs": bool(graphs and graphs.record),
        "batch": args.batch,
        "context": args.context,
        "weights_gb": round(weights / 1e9, 2),
        "step_gb": round(step_bytes / 1e9, 2),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "tokens_per_s": round(measured, 1),
        "roofline_tokens_per_s": round(roofline, 1),
        "of_roofline": round(measured / roofline, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
