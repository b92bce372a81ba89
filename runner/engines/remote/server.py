"""engine.serve: the server a run starts for itself, on a free loopback port, and stops at its end.

The command's {port} and {model} are filled in per argument (a path with spaces stays one
argument). The server runs in a session of its own, so stopping it reaches every process it spawned
(vLLM's engine core, Ray workers), and the kernel sends it SIGTERM if the runner dies, kill -9
included, so no server outlives its run. Its output goes to a log file, whose last lines explain a
server that exits or never answers."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from runner.errors import ModelLoadError

log = logging.getLogger(__name__)

LOG_LINES_SHOWN = 15
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(template: str, port: int, model: str) -> list[str]:
    """engine.serve as an argument list, {port} and {model} filled in."""
    return [
        argument.replace("{port}", str(port)).replace("{model}", model) for argument in shlex.split(template)
    ]


class ServerProcess:
    """A started server: `base_url` once it answers; `stop()` ends it and everything it spawned."""

    def __init__(self, command: list[str], port: int, log_path: Path):
        self.command, self.port, self.log_path = command, port, log_path
        self.base_url = f"http://127.0.0.1:{port}/v1"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as output:
            try:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as error:
                raise ModelLoadError(f"engine.serve could not start {command[0]!r}: {error}") from None
        log.info(
            "started the server (pid %d) on port %d: %s; its log: %s",
            self.process.pid,
            port,
            shlex.join(command),
            log_path,
        )

    def wait_until_ready(self, timeout_s: float) -> None:
        """Poll GET /v1/models until the server answers at all; a server that exits or stays silent
        past `timeout_s` is stopped, and the error quotes its last log lines."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ModelLoadError(
                    f"the server exited with code {code} before answering ({shlex.join(self.command)}); "
                    f"the end of {self.log_path}:\n{self.last_lines()}"
                )
            if self._answers():
                log.info("the server answers at %s", self.base_url)
                return
            time.sleep(0.5)
        self.stop()
        raise ModelLoadError(
            f"the server did not answer on port {self.port} within engine.serve_timeout_s={timeout_s:g} s "
            f"({shlex.join(self.command)}); the end of {self.log_path}:\n{self.last_lines()}"
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answers, if not with a list (an API key, no /v1/models)
        except (OSError, ValueError):
            return False

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the server's whole session, SIGKILL after `grace_s`; reaped either way."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):  # what it spawned and left behind
            os.killpg(self.process.pid, signal.SIGKILL)
        log.info("stopped the server (pid %d)", self.process.pid)

    def last_lines(self) -> str:
        try:
            with open(self.log_path, errors="replace") as lines:
                return "".join(deque(lines, LOG_LINES_SHOWN)).rstrip() or "(empty)"
        except OSError as error:
            return f"(unreadable: {error})"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the runner dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
