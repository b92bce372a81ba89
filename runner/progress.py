"""The replay's progress: a labelled bar on a terminal, a log line every ~30 s or 5% elsewhere.

Both count turns against the run's planned total, starting from the turns a resumed run kept, and
compute rates and the ETA from this session's turns alone.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm import tqdm

from runner.replay import Turn

log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0
LOG_EVERY_FRACTION = 0.05


class Progress:
    def __init__(self, planned: int, kept: int, *, terminal: bool | None = None):
        self.planned, self.kept = planned, kept
        self.done = kept
        self.new_tokens = 0
        self._start = self._logged_at = time.perf_counter()
        self._logged_turns = kept
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bar = (
            tqdm(total=planned, initial=kept, desc="replay", unit="turn", dynamic_ncols=True)
            if terminal
            else None
        )

    def update(self, turn: Turn | None) -> None:
        """One turn ended (None: a conversation ended in an error, its remaining turns dropped)."""
        self.done += 1
        self.new_tokens += turn.new_tokens if turn is not None else 0
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tokens_per_second:.1f} tokens/s", refresh=False)
            self._bar.update()
            return
        now = time.perf_counter()
        if (
            now - self._logged_at >= LOG_EVERY_SECONDS
            or self.done - self._logged_turns >= max(1, LOG_EVERY_FRACTION * self.planned)
            or self.done == self.planned
        ):
            self._logged_at, self._logged_turns = now, self.done
            log.info("%s", self.line())

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """'replay: 12/40 turns (4 kept), 8 new in 3.1 s, 2.58 turns/s, 97.4 tokens/s, ETA 12 s'"""
        new, seconds = self.done - self.kept, self.seconds
        rate = new / seconds if seconds > 0 else 0.0
        eta = f"{(self.planned - self.done) / rate:.0f} s" if rate > 0 else "?"
        kept = f" ({self.kept} kept)" if self.kept else ""
        return (
            f"replay: {self.done}/{self.planned} turns{kept}, {new} new in {seconds:.1f} s, "
            f"{rate:.2f} turns/s, {self.tokens_per_second:.1f} tokens/s, ETA {eta}"
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
