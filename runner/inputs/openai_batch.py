"""OpenAI Batch API request lines as conversations (what vLLM's `run-batch` reads):
`{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"model", "messages", ...}}`.

`custom_id` is the conversation's id. The request's own `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `seed` and `stop` apply to its conversation over the run's config; `model`,
`user` and `metadata` are recorded (the model is the run's, never picked by a request). Any other
key is refused for its line: the runner cannot honour it, and dropping it silently would change
what the request asked for.
"""

from __future__ import annotations

from typing import Any

from runner.inputs.rejects import LineError

URL = "/v1/chat/completions"
HONOURED = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop")
RECORDED = ("model", "user", "metadata")
DEFAULTS_ONLY = {"n": 1, "stream": False}  # accepted at these values only
MAX_STOP = 4  # as the API


def is_request(record: dict[str, Any]) -> bool:
    return "custom_id" in record and "body" in record


def parse_request(record: dict[str, Any]) -> tuple[str, Any, dict[str, Any], dict[str, Any]]:
    """(id, body.messages, decoding settings over the run's, the keys to record) of one request."""
    custom_id = record["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("invalid_id", "'custom_id' must be a non-empty string")
    if record.get("method", "POST") != "POST" or record.get("url", URL) != URL:
        raise LineError(
            "unsupported_request",
            f"only POST {URL} requests can be replayed (got {record.get('method')} {record.get('url')})",
        )
    unknown = sorted(set(record) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineError("unsupported_option", f"key(s) {', '.join(unknown)} are not part of a Batch request")
    body = record["body"]
    if not isinstance(body, dict):
        raise LineError("invalid_request", "'body' must be an object")
    for key, value in DEFAULTS_ONLY.items():
        if key in body and body[key] != value:
            raise LineError("unsupported_option", f"body.{key}={body[key]!r}: only {value!r} is supported")
    refused = sorted(set(body) - {"messages", *HONOURED, *RECORDED, *DEFAULTS_ONLY})
    if refused:
        raise LineError(
            "unsupported_option",
            f"body.{', body.'.join(refused)}: the runner cannot honour it (it honours "
            f"{', '.join(HONOURED)}; records {', '.join(RECORDED)})",
        )
    settings = _settings(body)
    recorded = {key: record[key] for key in ("method", "url") if key in record}
    recorded["body"] = {key: value for key, value in body.items() if key != "messages"}
    return custom_id, body.get("messages"), settings, recorded


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    """The request's decoding settings as the runner's Sampling fields (+ `seed`)."""
    settings: dict[str, Any] = {}
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise LineError("invalid_request", "body has both max_tokens and max_completion_tokens")
    for key in ("max_completion_tokens", "max_tokens"):
        if key in body:
            settings["max_new_tokens"] = _number(body, key, int, low=1)
    if "temperature" in body:
        temperature = _number(body, "temperature", float, low=0.0, high=2.0)
        settings["do_sample"] = temperature > 0  # 0: greedy, as the API means it
        if temperature > 0:
            settings["temperature"] = temperature
    if "top_p" in body:
        settings["top_p"] = _number(body, "top_p", float, low=0.0, high=1.0, open_low=True)
    if "seed" in body:
        settings["seed"] = _number(body, "seed", int)
    if "stop" in body and body["stop"] is not None:
        stop = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
        if not isinstance(stop, list) or not stop or len(stop) > MAX_STOP:
            raise LineError(
                "invalid_request", f"body.stop must be a string or a list of 1 to {MAX_STOP} strings"
            )
        if not all(isinstance(text, str) and text for text in stop):
            raise LineError("invalid_request", "body.stop must hold non-empty strings")
        settings["stop"] = tuple(stop)
    return settings


def _number(
    body: dict[str, Any],
    key: str,
    kind: type,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
) -> Any:
    value = body[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not isinstance(value, int))
    ):
        raise LineError(
            "invalid_request", f"body.{key} must be {'an integer' if kind is int else 'a number'}"
        )
    if (low is not None and (value <= low if open_low else value < low)) or (
        high is not None and value > high
    ):
        bounds = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise LineError("invalid_request", f"body.{key}={value} is out of range {bounds}")
    return kind(value)
