"""A failed request sorted by what to do about it: retry it (and count the cause), end its
conversation with an error code, or stop the run with one line. Imports no openai: it reads the
exception's status code, headers and message, whatever client raised it."""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any

# Retryable causes, as summary.json counts them.
RATE_LIMITED, SERVER_ERROR, CONNECTION, TIMEOUT = "rate_limited", "server_error", "connection", "timeout"

# How servers word a prompt longer than the model's context: OpenAI ("context_length_exceeded"),
# vLLM and SGLang ("maximum context length", "context length"), llama.cpp ("exceeds the available
# context size"), TGI ("must be <= ... tokens").
_CONTEXT_WORDS = re.compile(
    r"context[ _]length|context size|maximum context|max_model_len|max_tokens must be|must be <= \d+",
    re.IGNORECASE,
)
RETRY_AFTER_CAP_S = 300.0  # a longer Retry-After is waited as this long


@dataclass(frozen=True)
class Fault:
    """What went wrong with one attempt: `cause` names it for counts and error codes."""

    # rate_limited | server_error | connection | timeout (retryable), context_overflow | rejected
    # (the conversation's error), auth | not_found (the run's end)
    cause: str
    message: str
    status: int | None = None
    retry_after: float | None = None  # seconds the server asked to wait (Retry-After)

    @property
    def retryable(self) -> bool:
        return self.cause in (RATE_LIMITED, SERVER_ERROR, CONNECTION, TIMEOUT)

    @property
    def fatal(self) -> bool:
        """A wrong key or model: every other request would fail the same way."""
        return self.cause in ("auth", "not_found")


def classify(error: BaseException) -> Fault:
    """An exception of the openai client (or httpx under it) as a Fault."""
    status = getattr(error, "status_code", None)
    message = _message(error)
    name = type(error).__name__
    if status is None:
        return Fault(TIMEOUT if "Timeout" in name else CONNECTION, message or name)
    headers = getattr(getattr(error, "response", None), "headers", None)
    if status == 429:
        return Fault(RATE_LIMITED, message, status, retry_after(headers))
    if status >= 500 or status == 408:
        return Fault(SERVER_ERROR, message, status, retry_after(headers))
    if status in (401, 403):
        return Fault("auth", message, status)
    if status == 404:
        return Fault("not_found", message, status)
    if _CONTEXT_WORDS.search(message) or "context_length_exceeded" in str(getattr(error, "code", "")):
        return Fault("context_overflow", message, status)
    return Fault("rejected", message, status)


def backoff(attempt: int, fault: Fault, jitter: float) -> float:
    """Seconds before retry `attempt` (1, 2, ...): the server's Retry-After where it gave one,
    else 0.5 s doubling up to 30 s, times `jitter` (0.5 to 1, so clients spread out)."""
    if fault.retry_after is not None:
        return min(max(fault.retry_after, 0.0), RETRY_AFTER_CAP_S)
    return min(0.5 * 2 ** (attempt - 1), 30.0) * jitter


def retry_after(headers: Any) -> float | None:
    """Retry-After (or retry-after-ms) in seconds: a number of seconds or an HTTP date."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return float(milliseconds) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else max(email.utils.mktime_tz(parsed) - time.time(), 0.0)


def _message(error: BaseException) -> str:
    """The server's own words where its body has them, else the exception's, on one line."""
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        text = inner.get("message") or inner.get("detail") if isinstance(inner, dict) else inner
        if text:
            return " ".join(str(text).split())
    cause = error.__cause__ or error.__context__
    text = f"{error} ({cause})" if cause is not None and str(cause) else str(error)
    return " ".join(text.split())
