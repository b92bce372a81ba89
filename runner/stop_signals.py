"""Stop signals: SIGTERM raises Interrupted as Ctrl-C raises KeyboardInterrupt, so a run can say
what it kept; a section that must not be cut in two (a record written and counted) holds them
until it ends."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from runner.errors import Interrupted

_holding = 0
_pending: list[int] = []


def on_stop_signal(signum: int, frame: object) -> None:
    """The SIGTERM (and SIGINT) handler: raise at once, or after the section being held."""
    if _holding:
        _pending.append(signum)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Install `on_stop_signal` for SIGTERM, and for SIGINT where Python's own Ctrl-C handler is
    in place (a process started in the background ignores SIGINT, and goes on ignoring it); the
    previous handlers come back afterwards. Handlers live in the main thread: elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_stop_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """A stop signal arriving inside is delivered as the section ends, whichever way it ends."""
    global _holding
    _holding += 1
    try:
        yield
    finally:
        _holding -= 1
        if not _holding and _pending:
            signum = _pending[0]
            _pending.clear()
            signal.raise_signal(signum)  # through the handler in place now, before this returns
