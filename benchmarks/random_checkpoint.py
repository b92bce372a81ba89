"""A checkpoint of another's shape with random weights: its config.json, tokenizer, chat template and
generation config copied, its weights drawn afresh (seeded). benchmarks/gpu_check.sh runs the
engines on it where the real weights cannot travel: speeds are the real model's, texts are not.

    python benchmarks/random_checkpoint.py LIKE_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("like", type=Path, help="a checkpoint directory (config.json and tokenizer files)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.like))
    model.generation_config = GenerationConfig.from_pretrained(args.like)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.like).save_pretrained(args.out)
    print(f"{args.out}: random weights of {args.like}'s shape, {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
