"""Write a large ShareGPT-format JSONL file for scale checks: `python benchmarks/make_sharegpt.py
OUT --conversations 1000000` gives ~1.2 GB, the size of LMSYS-Chat-1M or WildChat.

Conversations are built from MT-bench's prompts (`--prompts`, one JSON object a line with `turns`)
and deterministic filler, with 1 to 4 exchanges each and lengths spread as real chat logs spread
them (most short, a long tail); the same arguments always write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FILLER = (
    "the model answers each question with care and names the sources it used while the user asks "
    "for more detail about travel history code physics cooking music law health finance and poems"
)
WORDS = tuple(FILLER.split())


def prompts(path: Path) -> list[str]:
    """Every user turn of the prompt file (MT-bench's `turns`, or a line's `text`)."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        found += record.get("turns") or [record["text"]]
    return found


def filler(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def conversation(rng: random.Random, number: int, questions: list[str]) -> dict:
    """One ShareGPT record: 1-4 human/gpt exchanges, a system prompt on one in eight."""
    turns = []
    if rng.random() < 0.125:
        turns.append({"from": "system", "value": "You are a helpful assistant. " + filler(rng, 8)})
    for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 4))):
        question = rng.choice(questions)
        if rng.random() < 0.3:
            question += " " + filler(rng, int(rng.paretovariate(1.5) * 20))
        turns.append({"from": "human", "value": question})
        turns.append({"from": "gpt", "value": filler(rng, min(600, int(rng.paretovariate(1.8) * 15)))})
    return {"id": f"sharegpt-{number:07d}", "conversations": turns}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--prompts", type=Path, default=Path("../shared/data/mt_bench_questions.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, questions = random.Random(args.seed), prompts(args.prompts)
    with args.out.open("w", encoding="utf-8") as stream:
        for number in range(args.conversations):
            stream.write(json.dumps(conversation(rng, number, questions), ensure_ascii=False) + "\n")
    print(f"{args.out}: {args.conversations} conversations, {args.out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
