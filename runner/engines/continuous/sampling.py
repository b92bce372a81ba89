"""The next token of each row from its logits: every knob per row, each row drawing from its own
generator, so a row's text does not depend on which rows share its batch.

The order and arithmetic follow transformers' generate: repetition penalty and min_new_tokens on
the float32 logits, then (sampling) temperature, top-k and top-p, then a draw from the softmax;
greedy rows take the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from runner.engines.protocol import Sampling


class SamplingRow(Protocol):
    sampling: Sampling
    ids: list[int]  # the prompt
    generated: list[int]  # this turn's new tokens so far
    generator: torch.Generator | None  # set when the row samples


def next_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow], stop_ids: torch.Tensor) -> list[int]:
    """One token per row of `logits` ([rows, vocab])."""
    scores = logits.to(torch.float32)
    if all(_plain_greedy(row) for row in rows):
        return scores.argmax(-1).tolist()
    scores = scores.clone()
    for index, row in enumerate(rows):
        penalty = row.sampling.repetition_penalty
        if penalty != 1.0:
            seen = torch.tensor(row.ids + row.generated, device=scores.device)
            chosen = scores[index].gather(0, seen)
            scores[index].scatter_(0, seen, torch.where(chosen < 0, chosen * penalty, chosen / penalty))
        if len(row.generated) < row.sampling.min_new_tokens:
            scores[index, stop_ids] = -torch.inf
    tokens = scores.argmax(-1).tolist()
    for index, row in enumerate(rows):
        if row.sampling.do_sample:
            tokens[index] = _draw(scores[index], row.sampling, row.generator)
    return tokens


def _plain_greedy(row: SamplingRow) -> bool:
    sampling = row.sampling
    return not sampling.do_sample and sampling.repetition_penalty == 1.0 and sampling.min_new_tokens == 0


def _draw(scores: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Temperature, top-k, top-p (keeping at least one token), then one draw from the softmax."""
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        threshold = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, -torch.inf)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), -torch.inf)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
