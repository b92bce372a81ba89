"""The base of engines that produce a whole reply per call (engine=pipeline): a queue of turns, and
`step` generating the oldest of them, up to `batch_size` at a time."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from runner.engines.protocol import Outcome, Reply, Request, TurnError


class WholeTurnEngine:
    """Base of engines that produce a whole reply per call: subclasses define `generate`."""

    batch_size: int

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._queued: deque[Request] = deque()

    def free_slots(self) -> int:
        return max(self.batch_size - len(self._queued), 0)

    def submit(self, request: Request) -> None:
        self._queued.append(request)

    def step(self) -> list[Outcome]:
        """Generate the oldest queued turns, up to `batch_size` of them."""
        requests = [self._queued.popleft() for _ in range(min(self.batch_size, len(self._queued)))]
        return list(zip(requests, self.generate(requests), strict=True)) if requests else []

    def generate(self, requests: Sequence[Request]) -> list[Reply | TurnError]:
        raise NotImplementedError
