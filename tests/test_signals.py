"""Signals around a block of work (signals.py)."""

from __future__ import annotations

import os
import signal

import pytest

from nanogpt_mlx import signals


def test_deferred_signals_arrive_when_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # held back once, raised once
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_handlers_are_restored_after_the_block():
    seen = []
    with signals.handlers({signal.SIGUSR1: lambda n, _f: seen.append(n)}):
        os.kill(os.getpid(), signal.SIGUSR1)
    assert seen == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
