"""Stop signals in this process: SIGTERM raises Interrupted, Ctrl-C KeyboardInterrupt, and a held
section (a record written and counted) ends whole before either arrives."""

import os
import signal

import pytest

from runner.errors import Interrupted
from runner.stop_signals import stop_signals_held, stop_signals_raise


@pytest.fixture(autouse=True)
def python_ctrl_c_handler():
    """Python's own Ctrl-C handler, which a process started in the background (as CI) goes without."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("signum", "raised"), [(signal.SIGTERM, Interrupted), (signal.SIGINT, KeyboardInterrupt)]
)
def test_a_signal_inside_a_held_section_arrives_as_it_ends(signum, raised):
    steps = []
    with stop_signals_raise(), pytest.raises(raised):
        with stop_signals_held():
            os.kill(os.getpid(), signum)
            steps.append("written")
            steps.append("counted")
        steps.append("after")  # never reached: the signal arrives as the section ends
    assert steps == ["written", "counted"]


def test_a_signal_outside_a_held_section_arrives_at_once_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_signals_raise(), pytest.raises(Interrupted, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the signal did not arrive")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
