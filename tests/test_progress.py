"""Progress: a labelled bar on a terminal, log lines elsewhere; a resumed run's kept turns are a
starting count, never part of a rate."""

from __future__ import annotations

import logging
import re

from runner.progress import Progress
from runner.replay import Turn


def turn(tokens: int) -> Turn:
    return Turn(
        message_index=1,
        prompt_tokens=10,
        new_tokens=tokens,
        seconds=0.1,
        first_token_seconds=0.01,
        finish_reason="length",
        reference=None,
        control_tokens_in_content=0,
    )


def test_the_terminal_bar_is_labelled_with_turns_and_tokens_per_second(capsys):
    with Progress(planned=4, kept=2, terminal=True) as progress:
        progress.update(turn(8))
    bar = capsys.readouterr().err
    assert re.search(r"replay: +75%.*3/4.*tokens/s", bar), bar


def test_off_a_terminal_a_line_every_5_percent_counts_kept_turns_apart(caplog):
    caplog.set_level(logging.INFO, logger="runner.progress")
    with Progress(planned=100, kept=40, terminal=False) as progress:
        for _ in range(4):
            progress.update(turn(8))
        progress.update(None)  # a conversation's error: a turn less to come
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("replay: 45/100 turns (40 kept), 5 new in ")
    assert progress.new_tokens == 32
