"""Signals around a block of work: handlers of its own for it, or signals held back until it ends."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from .errors import Stopped

# seconds a save may hold a stop back (minutes for a large model): the other ranks wait this long for rank 0's, and
# launch.py for a rank that its GROUP_END did not end (with several ranks, a save finishes first: deferred)
SAVE_WAIT = 1800.0
# launch.py's signal to the ranks left in a group that cannot finish (one of them ended with an error): end now, or
# once the save in progress is done. Its default action ends the process, as SIGTERM's did; SIGTERM itself is a stop
# request to every rank, which a scheduler sends them all at once (Slurm at a job's time limit or scancel). A
# real-time signal, which no scheduler's convention uses (Slurm's --signal=USR1@N and Lightning's "checkpoint soon"
# take SIGUSR1); macOS has none
GROUP_END = getattr(signal, "SIGRTMIN", signal.SIGUSR2)
# the signals that stop a command, or a run with a save, in the order that ranks agreeing on one prefer them: the
# SIGTERM that a scheduler sends every process of a job over the Ctrl-C that a launcher forwards for its own
STOPPING = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


@contextlib.contextmanager
def handlers(installed: dict) -> Iterator[None]:
    """`installed` (signal -> handler) for the body, the previous ones after it. Only the main thread can set
    them: elsewhere (a notebook's worker thread) the body runs without."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, h) for s, h in installed.items()}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred(*signums: int) -> Iterator[None]:
    """Hold `signums` (default: Ctrl-C and SIGTERM) back while the body runs, then raise them as if they came at
    its end, also when it raised: for work that must not stop halfway (replacing a set of files, stopping worker
    processes). One whose handler is the default (SIGTERM's: end the process) raises SystemExit(128 + signal)
    instead, so that the `finally` blocks around it still clean up."""
    caught: list[int] = []
    try:
        with handlers(dict.fromkeys(signums or (signal.SIGINT, signal.SIGTERM), lambda n, _frame: caught.append(n))):
            yield
    finally:
        for n in dict.fromkeys(caught):
            if signal.getsignal(n) == signal.SIG_DFL:
                raise SystemExit(128 + n)
            signal.raise_signal(n)


def stops(*signums: int) -> tuple[int, ...]:
    """The signals that a stop handler takes: `signums` (default: STOPPING's), less SIGHUP (a closed terminal)
    where it is ignored (nohup)."""
    hangup_ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    return tuple(s for s in signums or STOPPING if not (s == signal.SIGHUP and hangup_ignored))


def like_ctrl_c() -> contextlib.AbstractContextManager:
    """SIGTERM (kill, a scheduler, `timeout`) and SIGHUP (the terminal closed; not under nohup) stop the body as
    Ctrl-C does, with Stopped (exit status 128 + signal): for commands that write files, whose `finally` blocks then
    remove their temporary ones (the default actions end the process where it stands)."""
    def stop(signum: int, _frame) -> None:
        raise Stopped(signum)

    return handlers(dict.fromkeys(stops(signal.SIGTERM, signal.SIGHUP), stop))


_quiet_start = False  # whether quiet_start took Ctrl-C from Python


def quiet_start() -> None:
    """For the `nanogpt-mlx` command (or `python -m nanogpt_mlx`): a Ctrl-C while its imports run ends it as Ctrl-C
    ends a C program, silently with status 130, where Python printed a traceback of whatever import it was in.
    `ctrl_c_back` gives Ctrl-C back to Python (KeyboardInterrupt) once the command can handle it."""
    global _quiet_start
    argv = getattr(sys, "orig_argv", [])
    command = os.path.basename(sys.argv[0]) == "nanogpt-mlx" if sys.argv else False
    module = any(a == "-m" and b == "nanogpt_mlx" for a, b in zip(argv, argv[1:]))
    if (command or module) and signal.getsignal(signal.SIGINT) is signal.default_int_handler \
            and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _quiet_start = True


def ignore_stops() -> None:
    """For a command whose work is done: a SIGTERM or SIGHUP while Python and MLX shut down is ignored, so that its
    exit status is the work's (a finished run said "done", then ended by SIGTERM's default action: 143)."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


def ctrl_c_back() -> None:
    """Python's Ctrl-C (KeyboardInterrupt) again, where quiet_start took it."""
    global _quiet_start
    if _quiet_start and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _quiet_start = False
