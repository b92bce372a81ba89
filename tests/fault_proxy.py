"""An HTTP proxy for the tests, in front of a real OpenAI-compatible server, that injects faults.

Every request is forwarded to the upstream server as it came, except where `fault(number, body)`
names a fault for the `number`-th POST to /v1/chat/completions (1-based):
  "429"     answer 429 with Retry-After: 1 (OpenAI's rate-limit error body)
  "500", "503"  answer that status
  "drop"    close the connection without an answer
  "hold"    keep the request `hold_s` seconds, then close the connection (past the client's timeout)
  "context" answer 400 as vLLM does for a prompt longer than the model's context
With `key`, a request without `Authorization: Bearer <key>` gets 401. `arrivals` lists every chat
request seen: (monotonic time, number, body).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Fault = Callable[[int, dict[str, Any]], str | None]

_STATUS_BODIES = {
    "429": (429, "Rate limit reached for requests", "rate_limit_exceeded"),
    "500": (500, "The server had an error while processing your request", "server_error"),
    "503": (503, "The engine is currently overloaded, please try again later", "server_error"),
    "context": (
        400,
        "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
        "in the messages. Please reduce the length of the messages.",
        "context_length_exceeded",
    ),
}


class FaultProxy:
    """Start with `with FaultProxy(upstream, fault=...) as proxy:`; point clients at `proxy.url`."""

    def __init__(
        self, upstream: str, fault: Fault | None = None, key: str | None = None, hold_s: float = 0.0
    ):
        self.upstream = upstream.rstrip("/")  # http://127.0.0.1:PORT (no /v1)
        self.fault, self.key, self.hold_s = fault or (lambda number, body: None), key, hold_s
        self.arrivals: list[tuple[float, int, dict[str, Any]]] = []
        self.authorizations: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}/v1"

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._serve(None)

            def do_POST(self) -> None:
                self._serve(self.rfile.read(int(self.headers.get("content-length", 0))))

            def _serve(self, payload: bytes | None) -> None:
                authorization = self.headers.get("authorization", "")
                with proxy._lock:
                    proxy.authorizations.append(authorization)
                if proxy.key is not None and authorization != f"Bearer {proxy.key}":
                    error = {"message": "Incorrect API key provided", "code": "invalid_api_key"}
                    return self._answer(401, {"error": error})
                fault = None
                if payload is not None and self.path.endswith("/chat/completions"):
                    body = json.loads(payload)
                    with proxy._lock:
                        number = len(proxy.arrivals) + 1
                        proxy.arrivals.append((time.monotonic(), number, body))
                    fault = proxy.fault(number, body)
                if fault in _STATUS_BODIES:
                    status, message, code = _STATUS_BODIES[fault]
                    headers = {"retry-after": "1"} if status == 429 else {}
                    return self._answer(status, {"error": {"message": message, "code": code}}, headers)
                if fault in ("drop", "hold"):
                    time.sleep(proxy.hold_s if fault == "hold" else 0)
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                return self._forward(payload)

            def _forward(self, payload: bytes | None) -> None:
                request = urllib.request.Request(
                    proxy.upstream + self.path,
                    data=payload,
                    headers={"content-type": "application/json"},
                    method=self.command,
                )
                try:
                    with urllib.request.urlopen(request, timeout=600) as answer:
                        status, content = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, content = error.code, error.read()
                self._answer(status, content)

            def _answer(self, status: int, content: Any, headers: dict[str, str] | None = None) -> None:
                data = content if isinstance(content, bytes) else json.dumps(content).encode()
                try:
                    self.send_response(status)
                    for name, value in {"content-type": "application/json", **(headers or {})}.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a timeout): nothing to answer

        return Handler
