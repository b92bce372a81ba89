"""Client-side rate limits for hosted APIs: requests and tokens per minute, spread evenly.

Each request reserves its start on a schedule per limit: after a request of cost c, the next may
start c * 60 / limit seconds later. A request's token cost is estimated before it goes (prompt
characters / 4 + max_tokens) and corrected by the usage the server reports, so the schedule follows
what was really spent. No burst: the strictest reading of a per-minute limit, and the gentlest on
servers that enforce it over shorter windows."""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimits:
    """engine.requests_per_minute and engine.tokens_per_minute (None: no limit)."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.request_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.token_interval = 60.0 / tokens_per_minute if tokens_per_minute else 0.0
        self.clock = clock
        self.next_request_at = self.next_token_at = 0.0

    @property
    def active(self) -> bool:
        return bool(self.request_interval or self.token_interval)

    def reserve(self, tokens: int) -> float:
        """Book a request of `tokens` estimated tokens; returns the seconds to wait before sending."""
        if not self.active:
            return 0.0
        now = self.clock()
        start = max(now, self.next_request_at, self.next_token_at)
        self.next_request_at = start + self.request_interval
        self.next_token_at = start + tokens * self.token_interval
        return start - now

    def settle(self, estimated: int, spent: int) -> None:
        """Correct a booked request's token cost by what the server says it spent."""
        if self.token_interval:
            self.next_token_at += (spent - estimated) * self.token_interval


def estimated_tokens(messages: list[dict[str, str]], max_tokens: int) -> int:
    """A request's tokens before the server counts them: about 4 characters a token, plus a few per
    message for the template, plus the reply's budget (what hosted APIs count against the limit)."""
    return sum(len(message["content"]) // 4 + 4 for message in messages) + max_tokens
