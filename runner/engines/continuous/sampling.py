"""The next token of each row from its logits: every knob per row, each row drawing from its own
generator, so a row's text does not depend on which rows share its batch.

The order and arithmetic follow transformers' generate: repetition penalty and min_new_tokens on
the float32 logits, then (sampling) temperature, top-k and top-p, then a draw from the softmax;
greedy rows take the argmax. The sampling rows are filtered together, as one tensor (one sort for
all of them, not one per row); only the draw is per row, from the row's own generator. The tokens
come back to the host once, at the end: on a GPU no step waits on the device row by row.
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
    short = [index for index, row in enumerate(rows) if len(row.generated) < row.sampling.min_new_tokens]
    if short:  # rows below their min_new_tokens cannot stop yet: one write for all of them
        scores[torch.tensor(short, device=scores.device)[:, None], stop_ids] = -torch.inf
    tokens = scores.argmax(-1)
    sampling = [index for index, row in enumerate(rows) if row.sampling.do_sample]
    if sampling:
        index = torch.tensor(sampling, device=scores.device)
        drawn = _draw(scores.index_select(0, index), [rows[i] for i in sampling])
        tokens = tokens.index_copy(0, index, drawn)
    return tokens.tolist()


def _plain_greedy(row: SamplingRow) -> bool:
    sampling = row.sampling
    return not sampling.do_sample and sampling.repetition_penalty == 1.0 and sampling.min_new_tokens == 0


def _draw(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature, top-k, top-p (keeping at least one token) over all sampling rows at once, then
    one draw per row from its softmax with the row's generator; [rows] token ids, on the device."""
    device, vocab = scores.device, scores.shape[-1]
    knobs = [row.sampling for row in rows]
    if any(knob.temperature != 1.0 for knob in knobs):
        scores = scores / torch.tensor([[knob.temperature] for knob in knobs], device=device)
    top_k = [knob.top_k if 0 < knob.top_k < vocab else 0 for knob in knobs]
    if any(top_k):
        values = torch.topk(scores, max(top_k)).values
        kth = values.gather(1, torch.tensor([[max(k, 1) - 1] for k in top_k], device=device))
        threshold = torch.where(torch.tensor([[k > 0] for k in top_k], device=device), kth, -torch.inf)
        scores = scores.masked_fill(scores < threshold, -torch.inf)
    if any(knob.top_p < 1.0 for knob in knobs):
        # A row without top-p drops nothing: no cumulative probability is <= -1.
        limits = [[1 - knob.top_p if knob.top_p < 1.0 else -1.0] for knob in knobs]
        limit = torch.tensor(limits, device=device)
        ordered, order = torch.sort(scores)
        drop = ordered.softmax(-1).cumsum(-1) <= limit
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
    probabilities = scores.softmax(-1)
    return torch.cat(
        [torch.multinomial(probabilities[i], 1, generator=row.generator) for i, row in enumerate(rows)]
    )
