"""engine=openai: any OpenAI-compatible server's /v1/chat/completions behind the runner's replay.

Each turn is one request carrying the conversation so far (the server applies its own chat
template), sent the moment the conversation's previous reply is in, engine.concurrency of them in
flight. Retryable faults (429, 5xx, dropped connections, timeouts) are retried and counted by cause;
a request that still fails ends its conversation with an error code and the run goes on, while a
wrong key or model stops it at once. With engine.serve the run starts its own server and stops it
at the end. Loads no torch, weights or tokenizer.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.engines.protocol import Capabilities, EngineCounters, Outcome, Reply, Request, Sampling, TurnError
from runner.engines.remote.client import ServerClient
from runner.engines.remote.faults import Fault
from runner.engines.remote.pacing import RateLimits, estimated_tokens
from runner.engines.remote.server import ServerProcess, free_port, serve_command
from runner.errors import ConfigError, ModelLoadError, RunnerError

if TYPE_CHECKING:
    from runner.config.schema import OpenAIEngineConfig, RunConfig
    from runner.engines.registry import RemoteSetup

log = logging.getLogger(__name__)

CAPABILITIES = Capabilities(remote=True)

NO_KEY = "no-key"  # sent where engine.api_key_env is unset: local servers take any key
REJECTIONS_BEFORE_STOP = 3  # refused requests, with none answered, that stop the run
MODELS_TIMEOUT_S = 10.0  # /v1/models at start: an unreachable server fails within this


class ServerRefused(RunnerError):
    """The server refuses every request of this run (a wrong key or model, an unknown field)."""


def request_body(
    model: str, request: Request, sampling: Sampling, extra_body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One turn as a chat completions request: greedy is temperature 0; a sampled turn sends its
    own seed. Knobs the OpenAI API lacks go as extra body fields (vLLM, SGLang, llama.cpp and TGI
    read them), only where set away from their neutral value, after engine.extra_body's."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [message.as_dict() for message in request.messages],
        "max_tokens": sampling.max_new_tokens,
    }
    if sampling.do_sample:
        body.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=request.seed)
    else:
        body["temperature"] = 0.0
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    extra = extra_fields(sampling)
    if extra or extra_body:
        body["extra_body"] = {**(extra_body or {}), **extra}
    return body


def extra_fields(sampling: Sampling) -> dict[str, Any]:
    """The decoding knobs outside the OpenAI API that this turn sets."""
    extra: dict[str, Any] = {}
    if sampling.do_sample and sampling.top_k:
        extra["top_k"] = sampling.top_k
    if sampling.min_new_tokens:
        extra["min_tokens"] = sampling.min_new_tokens
    if sampling.repetition_penalty != 1.0:
        extra["repetition_penalty"] = sampling.repetition_penalty
    return extra


class OpenAIEngine:
    """The runner's Engine over a server's chat completions (see the module docstring)."""

    supports_system_role = True  # the server's template handles (or refuses) system messages
    chat_template_sha256 = None  # the server's, unknown here

    def __init__(
        self,
        client: ServerClient,
        model: str,
        sampling: Sampling,
        concurrency: int,
        redact: str | None = None,
        server: ServerProcess | None = None,
        extra_body: dict[str, Any] | None = None,
    ):
        self.client, self.model, self.sampling, self.batch_size = client, model, sampling, concurrency
        self.server, self._secret, self.extra_body = server, redact, dict(extra_body or {})
        self.in_flight: dict[concurrent.futures.Future[Reply | TurnError], Request] = {}
        self.server_models: set[str] = set()
        self.rejections = 0
        self.warned_extra = False

    def free_slots(self) -> int:
        return max(self.batch_size - len(self.in_flight), 0)

    def submit(self, request: Request) -> None:
        sampling = request.sampling or self.sampling
        body = request_body(self.model, request, sampling, self.extra_body)
        knobs = extra_fields(sampling)
        if knobs and not self.warned_extra:
            self.warned_extra = True
            log.warning(
                "engine=openai sends %s as extra request fields: vLLM, SGLang, llama.cpp and TGI read "
                "them; a hosted API may ignore or refuse them",
                ", ".join(knobs),
            )
        estimate = estimated_tokens(body["messages"], sampling.max_new_tokens)
        self.in_flight[self.client.submit(self._turn(body, estimate))] = request

    def step(self) -> list[Outcome]:
        """The turns whose answers are in, waiting for at least one (a fatal refusal raises)."""
        done: set[concurrent.futures.Future[Reply | TurnError]] = set()
        while self.in_flight and not done:
            # a short wait, so that a signal (SIGTERM, Ctrl-C) is handled promptly
            done, _ = concurrent.futures.wait(
                self.in_flight, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED
            )
        return [(self.in_flight.pop(future), future.result()) for future in done]

    async def _turn(self, body: dict[str, Any], estimate: int) -> Reply | TurnError:
        started = time.perf_counter()
        answer = await self.client.complete(body, estimate)
        seconds = time.perf_counter() - started
        if isinstance(answer, Fault):
            return await self._failed(answer)
        if not answer.choices:
            return TurnError("server_error", "the server answered with no choices", {})
        choice, usage = answer.choices[0], answer.usage
        self.server_models.add(answer.model)
        return Reply(
            text=choice.message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            new_tokens=usage.completion_tokens if usage else 0,
            finish_reason=choice.finish_reason or "stop",
            seconds=seconds,
            first_token_seconds=seconds,  # not streamed: the first token arrives with the last
            server_model=answer.model,
        )

    async def _failed(self, fault: Fault) -> TurnError:
        """A request given up on: its conversation's error, or the run's end (ServerRefused)."""
        message = self.redact(fault.message)
        if fault.cause == "auth":
            raise ServerRefused(
                f"the server at {self.client.base_url} refused the key ({fault.status}): {message}"
            )
        if fault.cause == "not_found":
            offered = await self.client.model_ids(MODELS_TIMEOUT_S)
            raise ServerRefused(unknown_model(self.client.base_url, self.model, offered, message))
        if fault.cause == "rejected":
            self.rejections += 1
            if self.rejections >= REJECTIONS_BEFORE_STOP and not self.client.counts.answered:
                raise ServerRefused(
                    f"the server at {self.client.base_url} refused the first {self.rejections} requests "
                    f"and answered none ({fault.status}): {message}"
                )
        code = {"rejected": "request_rejected", "connection": "connection_error"}.get(
            fault.cause, fault.cause
        )
        return TurnError(code, f"{code} ({fault.status or 'no answer'}): {message}", {"status": fault.status})

    def redact(self, text: str) -> str:
        """The key never reaches a message, a log or the run dir, even where a server echoes it."""
        return text.replace(self._secret, "***") if self._secret else text

    def describe(self) -> dict[str, Any]:
        import openai

        return {
            "weights_bytes": None,
            "kv_bytes_per_token": None,
            "dtype": None,
            "device_map": {},
            "device": "server",
            "engine_version": openai.__version__,
        }

    def counters(self) -> EngineCounters:
        """summary.json's `requests` (attempts, answers, retries and failures by cause) and `server`
        (where the requests went, what answered them, the command that started it) sections."""
        counts = self.client.counts
        return EngineCounters(
            requests={
                "sent": counts.sent,
                "answered": counts.answered,
                "retried": dict(counts.retried),
                "failed": dict(counts.failed),
                "rate_limit_wait_seconds": round(counts.rate_limit_wait_seconds, 3),
            },
            server={
                "base_url": self.client.base_url,
                "model": self.model,
                "answered_as": sorted(self.server_models),
                "started_with": self.server.command if self.server else None,
            },
        )

    def close(self) -> None:
        """Cancel the requests in flight, close the client, stop the server this run started."""
        self.in_flight.clear()
        self.client.close()
        if self.server is not None:
            self.server.stop()


def unknown_model(base_url: str, model: str, offered: list[str] | Fault, message: str = "") -> str:
    """One line for a model the server does not know, with what it offers."""
    listed = ", ".join(offered) if isinstance(offered, list) else f"unknown ({offered.message})"
    said = f" ({message})" if message else ""
    return (
        f"the server at {base_url} does not offer model '{model}'{said}; it offers: {listed}. Set "
        "model.id=<one of them> (model=server takes any name)"
    )


def api_key(engine: OpenAIEngineConfig) -> str:
    """The key from the environment variable engine.api_key_env names (a placeholder without one)."""
    if engine.api_key_env is None:
        return NO_KEY
    key = os.environ.get(engine.api_key_env, "")
    if not key:
        raise ConfigError(
            f"engine.api_key_env={engine.api_key_env}, but the environment variable {engine.api_key_env} "
            "is not set or empty: export it before the run"
        )
    return key


def build(cfg: RunConfig, setup: RemoteSetup) -> OpenAIEngine:
    """engine=openai: start the server if engine.serve asks, check that it answers, knows the key
    and offers the model, and return the engine sending to it."""
    engine: OpenAIEngineConfig = cfg.engine  # type: ignore[assignment]
    key = api_key(engine)
    try:
        import openai  # noqa: F401
    except ImportError as error:
        raise ModelLoadError(
            f"engine=openai needs the openai client: pip install 'chat-runner[openai]' ({error})"
        ) from None
    server = start_server(engine, setup) if engine.serve else None
    client = None
    try:
        base_url = server.base_url if server else engine.base_url.rstrip("/")
        limits = RateLimits(engine.requests_per_minute, engine.tokens_per_minute)
        client = ServerClient(base_url, key, engine.timeout_s, engine.max_retries, limits)
        sampling = Sampling.from_config(cfg.generation)
        built = OpenAIEngine(
            client, setup.model, sampling, engine.concurrency, key, server, engine.extra_body
        )
        check_server(client, setup.model, built.redact, engine.api_key_env)
        return built
    except BaseException:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
        raise


def start_server(engine: OpenAIEngineConfig, setup: RemoteSetup) -> ServerProcess:
    """engine.serve started on a free loopback port, its log in the run dir, and waited for."""
    port = free_port()
    log_dir = setup.run_dir or Path.cwd()
    server = ServerProcess(serve_command(engine.serve, port, setup.model), port, log_dir / "server.log")
    try:
        server.wait_until_ready(engine.serve_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def check_server(client: ServerClient, model: str, redact: Any, key_env: str | None) -> None:
    """Before any turn: the server answers within seconds, takes the key and offers the model."""
    offered = client.run(client.model_ids(min(MODELS_TIMEOUT_S, client.timeout_s)))
    if isinstance(offered, list):
        if model not in offered:
            raise ServerRefused(unknown_model(client.base_url, model, offered))
        log.info("the server at %s offers %s", client.base_url, model)
        return
    message = redact(offered.message)
    if offered.cause in ("connection", "timeout"):
        raise ServerRefused(f"cannot reach the server at {client.base_url}: {message}")
    if offered.cause == "auth":
        hint = f"the key in ${key_env}" if key_env else "no key: set engine.api_key_env=<the variable's name>"
        raise ServerRefused(f"the server at {client.base_url} refused {hint} ({offered.status}): {message}")
    log.warning(
        "the server at %s lists no models (GET /v1/models: %s %s): model '%s' is not checked before the run",
        client.base_url,
        offered.status,
        message,
        model,
    )
