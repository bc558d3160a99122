"""What stops a training run between steps, saving: Ctrl-C, SIGTERM or SIGHUP, a shard that cannot be read, stdout
gone; and, with several ranks, their agreement on it.

Several ranks must stop at the same step (or the others wait in a collective), so a request is only noted where it
comes and the ranks agree on it once per step (Stops.agreed), and at points amid an evaluation (which changes no
weights: Stops.interruptible). A single process stops at once where it can: between micro-steps, and amid an
evaluation.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import TypeVar

from . import signals
from .console import PEER_FAILED
from .distributed import Dist
from .errors import Stopped

T = TypeVar("T")


class StopEvaluating(Exception):
    """A stop request during an evaluation (Stops.interruptible): it stops at once (several ranks, where they agree
    on it: evaluations.py)."""


class Stops:
    """The stop requested of one train() call, and why."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self.clear()

    def clear(self) -> None:
        """No stop requested (an earlier train()'s was answered by its end)."""
        self.requested = False
        self.by: int | None = None  # the signal that requested it
        # why a stop that is no signal's ended the run, and what to fix before --resume: a shard the loader refused
        # mid-run, stdout on a full disk; the first one said
        self.error: tuple[str, str] | None = None
        self._evaluating = False  # a request ends the evaluation in progress (on_signal, ends_evaluation)
        self._agreed = False  # whether several ranks agreed on the stop, and on `by`, which a later signal keeps

    def request(self, error: tuple[str, str] | None = None) -> None:
        """A stop that is no signal's: an error's (why, fix) or, without one, as on Ctrl-C (stdout's reader gone)."""
        self.requested = True
        self.error = self.error or error

    @property
    def now(self) -> bool:
        """Whether to stop without the other ranks' agreement, between micro-steps or evaluations: a single process
        whose stop was requested."""
        return self.requested and self.dist.world == 1

    @contextlib.contextmanager
    def handled(self) -> Iterator[None]:
        """While steps run: Ctrl-C, SIGTERM and SIGHUP (unless nohup's) request a stop (on_signal)."""
        with signals.handlers(dict.fromkeys(signals.stops(), self.on_signal)):
            yield

    def on_signal(self, signum: int, _frame) -> None:
        """A stop request: saved at the end of the step (at once during an evaluation). No output here: a write
        from a handler can land inside a write to the same stream, or block on a pipe nobody reads."""
        self.requested = True
        if not self._agreed:  # (the stopping signal that the ranks' agreement prefers, of those that came)
            self.by = max(filter(None, [self.by, signum]), key=signals.STOPPING.index)
        if self.escalates(signum):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        if self._evaluating and self.dist.world == 1:
            raise StopEvaluating

    def escalates(self, signum: int) -> bool:
        """Whether the same signal again quits without saving: Ctrl-C's does; with several ranks a SIGTERM or SIGHUP
        does not, as a scheduler may send it to the job again (a rank that quit would leave the others' save)."""
        return signum == signal.SIGINT or self.dist.world == 1

    def agreed(self) -> bool:
        """Whether to stop now: a stop was requested (of any rank: ranks agree on it, all calling this together; a
        request that comes while they agree counts the next time). The ranks agree on whether a rank's stop is an
        error's too, which the others then end with, not as interrupted (status 130), and on the signal: one status,
        one hint."""
        if self.dist.world == 1:
            return self.requested
        world = self.dist.world  # an error counts more than every rank's request together
        total = self.dist.sum(float(self.requested) + world * (self.error is not None))
        if total > world and self.error is None:
            self.error = (f"rank {self.dist.rank}: stopping: the run {PEER_FAILED}", "mend what it says there")
        if total > 0 and self.error is None:  # (on every rank alike)
            first = self.dist.max(signals.STOPPING.index(self.by) if self.by in signals.STOPPING else -1)
            self.by = signals.STOPPING[int(first)] if first >= 0 else None
        self._agreed = total > 0
        self.requested = self.requested or total > 0
        return total > 0

    def ends_evaluation(self) -> bool:
        """Whether a stop was requested of this rank that ends the evaluation in progress (interruptible's): where
        several ranks agree on it, amid their evaluation (evaluations.py)."""
        return self._evaluating and self.requested

    def interruptible(self, evaluation: Callable[[], T]) -> T:
        """evaluation(), which a stop request ends (StopEvaluating): a single process's at once, several ranks' where
        they agree on it (ends_evaluation)."""
        if self.now:
            raise StopEvaluating
        self._evaluating = True
        try:
            return evaluation()
        finally:
            self._evaluating = False

    def saving_line(self) -> str:
        """What a stop by a signal says before its save: how to quit without it, where the same signal again does."""
        again = "Ctrl-C" if self.by == signal.SIGINT else signal.Signals(self.by).name
        return "stopping: saving a checkpoint" + (f" ({again} again to quit without saving)"
                                                  if self.escalates(self.by) else "")

    def stopped(self, saved: str) -> Stopped:
        """The exception that ends a train() stopped by a signal, or as if by Ctrl-C, after `saved`."""
        return Stopped(self.by or signal.SIGINT, saved)

    @contextlib.contextmanager
    def finishing_saves(self, saved: Callable[[str], None] = lambda by: None) -> Iterator[None]:
        """With several ranks, a launcher's end of a group one of whose ranks ended (signals.GROUP_END), or a SIGTERM
        or SIGHUP where it is no stop request (outside `handled`), ends the process once the save in progress is done,
        not amid it, calling `saved(what ended it)` first (the exit said nothing: the user left not knowing that the
        save finished)."""
        if self.dist.world == 1:
            yield
            return
        try:
            with signals.deferred(signal.SIGTERM, signal.SIGHUP, signals.GROUP_END):
                yield
        except (SystemExit, Stopped) as e:  # (default actions; like_ctrl_c's Stopped)
            status = e.status if isinstance(e, Stopped) else e.code
            saved("the launcher, as another rank ended" if status == 128 + signals.GROUP_END
                  else signal.Signals(status - 128).name)
            raise
