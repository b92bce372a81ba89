"""The official openai client (async) on an event loop of its own thread, so that the replay's
synchronous steps can keep engine.concurrency requests in flight; each request retried by cause.

The client's own retries are off (max_retries=0): they do not say why they retried, and summary.json
counts retries by cause. Here 429s wait for the server's Retry-After, other retryable faults back off
from 0.5 s doubling, with jitter, up to engine.max_retries per request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from runner.engines.remote.faults import Fault, backoff, classify
from runner.engines.remote.pacing import RateLimits

T = TypeVar("T")


@dataclass
class RequestCounts:
    """summary.json's `requests` section: attempts sent, answers, and faults by cause."""

    sent: int = 0  # attempts, retries included
    answered: int = 0
    retried: Counter[str] = field(default_factory=Counter)  # attempts retried, by cause
    failed: Counter[str] = field(default_factory=Counter)  # requests given up on, by cause
    rate_limit_wait_seconds: float = 0.0  # waited for engine.requests_per_minute / tokens_per_minute


class ServerClient:
    """AsyncOpenAI for one server, run on a private event loop; `submit` and `run` from any thread."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_retries: int, limits: RateLimits):
        self.base_url, self.timeout_s, self.max_retries, self.limits = (
            base_url,
            timeout_s,
            max_retries,
            limits,
        )
        self.counts = RequestCounts()
        for name in ("httpx", "httpx2"):  # a line per request otherwise; the summary counts them
            logging.getLogger(name).setLevel(logging.WARNING)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-client", daemon=True)
        self.thread.start()
        self.client = self.run(self._open(api_key))

    async def _open(self, api_key: str) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=api_key, base_url=self.base_url, timeout=self.timeout_s, max_retries=0)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.submit(coroutine).result()

    async def model_ids(self, timeout_s: float) -> list[str] | Fault:
        """What /v1/models offers, or why it did not answer (one attempt)."""
        from openai import APIError

        try:
            page = await self.client.with_options(timeout=timeout_s).models.list()
        except APIError as error:
            return classify(error)
        return [model.id for model in page.data]

    async def complete(self, body: dict[str, Any], estimated_tokens: int) -> Any | Fault:
        """POST /v1/chat/completions with retries: the completion, or the fault that ended it."""
        from openai import APIError

        attempt = 0
        while True:
            attempt += 1
            wait = self.limits.reserve(estimated_tokens)
            if wait:
                self.counts.rate_limit_wait_seconds += wait
                await asyncio.sleep(wait)
            self.counts.sent += 1
            try:
                completion = await self.client.chat.completions.create(**body)
            except APIError as error:
                fault = classify(error)
                if fault.retryable and attempt <= self.max_retries:
                    self.counts.retried[fault.cause] += 1
                    await asyncio.sleep(backoff(attempt, fault, random.uniform(0.5, 1.0)))
                    continue
                self.counts.failed[fault.cause] += 1
                return fault
            self.counts.answered += 1
            usage = completion.usage
            if usage is not None:
                self.limits.settle(estimated_tokens, usage.total_tokens)
            return completion

    def close(self) -> None:
        """Cancel what is in flight, close the connections, end the loop's thread."""
        if not self.loop.is_running():
            return

        async def shut() -> None:
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()
            await self.client.close()

        with contextlib.suppress(concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            self.submit(shut()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
