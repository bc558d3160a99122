"""Signals around a block of work (signals.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
    assert e.value.status == 128 + signal.SIGTERM and cleaned == [True] and str(e.value) == "stopped by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.like_ctrl_c():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored, as under nohup
    finally:
        signal.signal(signal.SIGHUP, previous)



def test_ctrl_c_while_the_command_starts_ends_it_without_a_traceback():
    """Ctrl-C in the command's first ~0.2 s (its imports) printed a traceback of whatever import it was in; the
    command now ends silently as a C program does (status 130 in a shell)."""
    code = ("import sys; sys.argv[0] = '/bin/nanogpt-mlx'; import nanogpt_mlx, os, signal, time; "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(30); print('not ended')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (-signal.SIGINT, "", "")


@pytest.mark.parametrize("argv, orig_argv, quiet", [
    (["/usr/bin/nanogpt-mlx", "train"], ["python", "/usr/bin/nanogpt-mlx", "train"], True),
    (["/x/nanogpt_mlx/__main__.py"], ["python", "-X", "dev", "-m", "nanogpt_mlx", "train"], True),
    (["-m"], ["python", "-m", "nanogpt_mlx"], True),  # (argv[0] while runpy imports the package)
    (["/x/pytest"], ["python", "-m", "pytest", "nanogpt_mlx"], False),  # a program that imports nanogpt_mlx
    (["-c"], ["python", "-c", "import nanogpt_mlx"], False)])
def test_only_the_command_starts_without_ctrl_c_and_main_takes_it_back(monkeypatch, argv, orig_argv, quiet):
    from nanogpt_mlx.cli import main

    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    try:
        signals.quiet_start()
        assert (signal.getsignal(signal.SIGINT) is signal.SIG_DFL) == quiet
        with pytest.raises(SystemExit):
            main(["--version"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # KeyboardInterrupt: saves, one line
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_the_command_ignores_a_stop_once_its_work_is_done(monkeypatch):
    """A SIGTERM while Python and MLX shut down, after the command's last line ("done: step 5"), ended a finished run
    with 143 (SIGTERM's default action; with --ranks, "rank 0 was killed by SIGTERM")."""
    from nanogpt_mlx import cli

    monkeypatch.setattr(cli, "main", lambda: 0)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        assert cli.command() == 0
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_a_signal_after_the_ranks_agreed_to_stop_keeps_the_signal_they_agreed_on():
    """A SIGTERM to one rank after the ranks agreed on a stop by SIGHUP (or Ctrl-C) changed that rank's signal alone:
    the ranks then exited 129 and 143 (130 and 143)."""
    from nanogpt_mlx.stops import Stops

    class TwoRanks:  # this rank, and another that saw no signal
        world, rank = 2, 0

        def sum(self, value, at_least=0.0):
            return value

        def max(self, value):
            return max(value, -1)

    stops = Stops(TwoRanks())
    stops.on_signal(signal.SIGHUP, None)  # (with several ranks, no handler changes: it does not escalate)
    assert stops.agreed() and stops.by == signal.SIGHUP
    stops.on_signal(signal.SIGTERM, None)
    assert stops.by == signal.SIGHUP and stops.stopped("saved").status == 128 + signal.SIGHUP
