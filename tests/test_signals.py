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


def test_a_held_signal_is_raised_also_when_the_block_fails():
    with pytest.raises(KeyboardInterrupt):
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            raise OSError(28, "No space left on device")


def test_a_held_sigterm_ends_the_process_through_its_finally_blocks():
    """Its default handler ended the process at once, leaving what the finally blocks would have removed."""
    cleaned = []
    with pytest.raises(SystemExit) as e:
        try:
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
        finally:
            cleaned.append(True)
    assert e.value.code == 128 + signal.SIGTERM and cleaned == [True]


def test_like_ctrl_c_stops_on_sigterm_and_keeps_nohups_sighup():
    """SIGTERM stops the block with Stopped (status 143) through its finally blocks; a SIGHUP that nohup ignores
    stays ignored; the handlers before are back after."""
    from nanogpt_mlx.errors import Stopped

    cleaned = []
    with pytest.raises(Stopped) as e:
        with signals.like_ctrl_c():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                cleaned.append(True)
    assert e.value.status == 128 + signal.SIGTERM and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.like_ctrl_c():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored, as under nohup
    finally:
        signal.signal(signal.SIGHUP, previous)
