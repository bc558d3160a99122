"""Data parallelism with `mx.distributed`: rank/world, cross-rank averages, failure handling.

Under `mlx.launch` (ring over TCP, or MPI) every process calls `init()`; a plain `python` run gets a
single-process group, so the same training code serves both. `launch.py` starts N ranks on this machine
(ring backend on 127.0.0.1) for `nanogpt-mlx train --ranks N`.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import signals
from .console import LAUNCHER_ENV, LOST_PEER, NOT_CONNECTED, last_line, lines_file
from .errors import UserError

# Environment variables that mean "this process was started as one rank of several".
_LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_JACCL_COORDINATOR")


@dataclass
class Dist:
    """This process's place in the data-parallel group."""

    group: mx.distributed.Group | None = None
    rank: int = 0
    world: int = 1
    timeout: float = 300.0  # seconds a collective may block before we give up on the peers
    local: int = 1  # ranks on this machine, sharing its memory (launch_local's; mlx.launch's are not known)
    slowest: float = 0.0  # seconds the longest sync took: a step that long here is not a lost peer

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float, at_least: float = 0.0) -> float:
        """Sum of a Python number over ranks, waited for under the watchdog (for at least `at_least` seconds)."""
        return self._reduced(mx.distributed.all_sum, value, at_least)

    def max(self, value: float) -> float:
        """Largest of a Python number over ranks, waited for under the watchdog."""
        return self._reduced(mx.distributed.all_max, value)

    def _reduced(self, reduce, value: float, at_least: float = 0.0) -> float:
        if self.world == 1:
            return value
        x = reduce(mx.array(value, dtype=mx.float32), group=self.group)
        self.sync(x, at_least=at_least)
        return x.item()

    def mean(self, value: float) -> float:
        return self.sum(value) / self.world

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.world == 1 else mx.distributed.all_sum(x, group=self.group)

    def average_gradients(self, grads):
        """One fused all-reduce per ~32 MB of gradients, then divide by the world size."""
        return grads if self.world == 1 else nn.average_gradients(grads, group=self.group)

    def submit(self, *arrays: mx.array) -> None:
        """Start evaluating `arrays`: in one process without waiting (the host goes on to build the next graph
        while the device computes), with several ranks to the end under the watchdog (sync)."""
        if self.world == 1:
            mx.async_eval(*arrays)
        else:
            self.sync(*arrays)

    def sync(self, *arrays: mx.array, at_least: float = 0.0) -> None:
        """mx.eval under a watchdog: a dead or stuck peer becomes a clear error, not a hang. What it waits for
        includes this rank's own work (a micro-step's forward and backward), so the limit is the timeout or 3x
        the longest sync so far, whichever is longer (or `at_least` seconds)."""
        if self.world == 1:
            mx.eval(*arrays)
            return
        limit, start = max(self.timeout, 3 * self.slowest, at_least), time.monotonic()
        with watchdog(limit, f"rank {self.rank}: no answer from the other ranks in {limit:.0f} s (if a step takes "
                             f"that long here, raise {TIMEOUT_ENV})"):
            try:
                mx.eval(*arrays)
            except RuntimeError as e:
                raise UserError(f"rank {self.rank}: {LOST_PEER} ({e}); stopping") from None
        if not at_least:  # a wait for another rank's save is not a step
            self.slowest = max(self.slowest, time.monotonic() - start)

    def barrier(self, at_least: float = 0.0) -> None:
        """Wait until every rank gets here (for at least `at_least` seconds, where one may be saving)."""
        if self.world > 1:
            self.sync(self.all_sum(mx.array(0.0)), at_least=at_least)


TIMEOUT_ENV = "NANOGPT_MLX_DIST_TIMEOUT"


def launched() -> bool:
    """Whether this process was started as one rank of a group (mlx.launch, mpirun, launch_local)."""
    return any(k in os.environ for k in _LAUNCH_ENV)


def _timeout_from_env() -> float:
    value = os.environ.get(TIMEOUT_ENV, "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= threading.TIMEOUT_MAX:  # a nan fails this too
        raise UserError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds > 0 and <= {threading.TIMEOUT_MAX:.0f}")
    return seconds


def init(timeout: float | None = None) -> Dist:
    """Join the group started by mlx.launch / mpirun (by whichever backend MLX finds), or a single-process group
    otherwise.

    `timeout` (default: $NANOGPT_MLX_DIST_TIMEOUT, else 300 s) bounds how long any collective may wait.
    """
    timeout = timeout or _timeout_from_env()
    if not launched():
        return Dist(timeout=timeout)
    if LAUNCHER_ENV in os.environ:
        _stop_with_launcher(int(os.environ[LAUNCHER_ENV]))
    # Ctrl-C, SIGTERM or SIGHUP while connecting ends the process at once: nothing to save yet, and MLX's connect, a
    # C++ call that Python's handler cannot interrupt, retries for half a minute (nohup's ignored SIGHUP stays so)
    with signals.handlers(dict.fromkeys(signals.stops(), signal.SIG_DFL)), \
            _connect_watch(timeout, f"{NOT_CONNECTED} within {timeout:.0f} s"):
        try:
            group = mx.distributed.init(strict=True, backend="any")
        except RuntimeError as e:
            raise UserError(f"distributed init failed: {e}") from None
    return Dist(group=group, rank=group.rank(), world=group.size(), timeout=timeout,
                local=group.size() if LAUNCHER_ENV in os.environ else 1)


# The watchdog of MLX's connect, a process of its own: mx.distributed.init holds the GIL (MLX's binding releases it
# for no call), so no thread of the rank can run until it returns, which may be never (a peer's port that accepts and
# stays silent). Its argv: seconds, the rank's pid, its last line and lines_file(). It ends at EOF on stdin (the rank
# connected, or ended); at the deadline it says the line as last_line would and kills the rank. It counts 1 s ticks:
# stopped with the rank (Ctrl-Z stops a rank's process group), it counts that time as 1 s at most.
_CONNECT_WATCH = """import os, select, signal, sys
seconds, rank, line, lines = sys.argv[1:]
for _ in range(int(seconds)):
    if select.select([0], [], [], 1.0)[0]:
        sys.exit()
if os.getppid() == int(rank):  # (not if it ended meanwhile)
    try:  # (a full disk or a gone directory must not spare the rank)
        with open(lines or 2, "a") as f:
            f.write(line + "\\n")
    except OSError:
        pass
    os.kill(int(rank), signal.SIGKILL)
"""


@contextlib.contextmanager
def _connect_watch(seconds: float, message: str) -> Iterator[None]:
    """The body (MLX's connect) within `seconds`, else `message` as the rank's last line and the rank killed
    (_CONNECT_WATCH; no site, to start fast). Ctrl-C is blocked as it starts, so that the watch inherits it blocked:
    a terminal's Ctrl-C to the rank's process group is the rank's alone (one that came meanwhile follows)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        watch = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CONNECT_WATCH, str(math.ceil(seconds)),
                                  str(os.getpid()), f"nanogpt-mlx: error: {message}", lines_file() or ""],
                                 stdin=subprocess.PIPE)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    with watch:  # (its stdin closed, then waited for)
        try:
            yield
        finally:
            watch.kill()  # (stopped, it would not see the EOF)


def _stop_with_launcher(launcher: int) -> None:
    """In a rank that launch_local started: Ctrl-C this process once the launcher is gone (killed with -9, say),
    so that the ranks save and stop instead of training on as orphans that hold OUT's lock. On Linux the launcher's
    death also continues this process, which it may have left stopped (Ctrl-Z), so that this watch can run."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGCONT))  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


class watchdog:
    """Context manager: if the body is still running after `seconds`, print `message` and exit(1).

    A collective whose peer died or froze can block forever inside MLX; os._exit is the only
    reliable way out of a blocked C++ call. Time this process spent stopped (Ctrl-Z, then `fg`) does not count:
    its peers were stopped with it.
    """

    TICK = 1.0  # seconds between the watching thread's looks at the clock
    STOPPED = 5.0  # a look this much later than due means the process was stopped (or the machine slept)

    def __init__(self, seconds: float, message: str):
        self.seconds, self.message = seconds, message
        self._done = threading.Event()

    def _watch(self) -> None:
        last = time.monotonic()
        deadline = last + self.seconds
        while not self._done.wait(min(self.TICK, self.seconds)):
            now = time.monotonic()
            if now - last > self.TICK + self.STOPPED:
                deadline += now - last
            last = now
            if now > deadline:
                last_line(f"nanogpt-mlx: error: {self.message}")
                os._exit(1)

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

