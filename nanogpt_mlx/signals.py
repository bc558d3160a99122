"""Signals around a block of work: handlers of its own for it, or signals held back until it ends."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from .errors import Stopped


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


def like_ctrl_c() -> contextlib.AbstractContextManager:
    """SIGTERM (kill, a scheduler, `timeout`) and SIGHUP (the terminal closed; not under nohup) stop the body as
    Ctrl-C does, with Stopped (exit status 128 + signal): for commands that write files, whose `finally` blocks then
    remove their temporary ones (the default actions end the process where it stands)."""
    def stop(signum: int, _frame) -> None:
        raise Stopped(signum)

    hup = {signal.SIGHUP: stop} if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else {}
    return handlers({signal.SIGTERM: stop, **hup})
