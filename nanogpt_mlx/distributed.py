"""Data parallelism with `mx.distributed`: rank/world, cross-rank averages, failure handling, local launch.

Under `mlx.launch` (ring over TCP, or MPI) every process calls `init()`; a plain `python` run gets a
single-process group, so the same training code serves both. `launch_local` starts N ranks on this
machine (ring backend on 127.0.0.1) for `nanogpt-mlx train --ranks N`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import signals
from .console import LAUNCHER_ENV, LINES_ENV, last_line, new_lines
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

    def sum(self, value: float) -> float:
        """Sum of a Python number over ranks, waited for under the watchdog."""
        if self.world == 1:
            return value
        x = self.all_sum(mx.array(value, dtype=mx.float32))
        self.sync(x)
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

    def sync(self, *arrays: mx.array) -> None:
        """mx.eval under a watchdog: a dead or stuck peer becomes a clear error, not a hang. What it waits for
        includes this rank's own work (a micro-step's forward and backward), so the limit is the timeout or 3x
        the longest sync so far, whichever is longer."""
        if self.world == 1:
            mx.eval(*arrays)
            return
        limit, start = max(self.timeout, 3 * self.slowest), time.monotonic()
        with watchdog(limit, f"rank {self.rank}: no answer from the other ranks in {limit:.0f} s (if a step takes "
                             f"that long here, raise {TIMEOUT_ENV})"):
            try:
                mx.eval(*arrays)
            except RuntimeError as e:
                raise UserError(f"rank {self.rank}: lost a peer rank ({e}); stopping") from None
        self.slowest = max(self.slowest, time.monotonic() - start)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        self.sum(0.0)


TIMEOUT_ENV = "NANOGPT_MLX_DIST_TIMEOUT"
RANK_GRACE = 30.0  # seconds a rank stopped after another failed has to exit before it is killed
# seconds the other ranks have to end by themselves once one ended with an error status before they are stopped:
# a stop they agreed on (a Ctrl-C to one rank, a bad shard, stdout gone) ends them all, rank 0 after its save
END_GRACE = 10.0


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


def init(backend: str = "any", timeout: float | None = None) -> Dist:
    """Join the group started by mlx.launch / mpirun, or a single-process group otherwise.

    `timeout` (default: $NANOGPT_MLX_DIST_TIMEOUT, else 300 s) bounds how long any collective may wait.
    """
    timeout = timeout or _timeout_from_env()
    if not launched():
        return Dist(timeout=timeout)
    if LAUNCHER_ENV in os.environ:
        _stop_with_launcher(int(os.environ[LAUNCHER_ENV]))
    # Ctrl-C while connecting ends the process at once: nothing to save yet, and MLX's connect, a C++ call that
    # Python's handler cannot interrupt, retries for half a minute
    with signals.handlers({signal.SIGINT: signal.SIG_DFL}), \
            watchdog(timeout, f"could not connect to the other ranks within {timeout:.0f} s"):
        try:
            group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise UserError(f"distributed init ({backend}) failed: {e}") from None
    return Dist(group=group, rank=group.rank(), world=group.size(), timeout=timeout,
                local=group.size() if LAUNCHER_ENV in os.environ else 1)


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


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP), where /proc says (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_ranks(live: dict[int, subprocess.Popen], sent: dict[int, int]) -> None:
    """After a rank failed: SIGTERM the others, SIGKILL a frozen one (nothing it could save); `sent` records which."""
    for q, proc in live.items():
        if proc.poll() is not None:  # ended too, not by this launcher: seen next time round
            continue
        if _stopped(proc.pid):
            print(f"nanogpt-mlx: error: rank {q} was stopped (frozen)", file=sys.stderr, flush=True)
            proc.kill()
            sent[q] = signal.SIGKILL
        else:
            proc.terminate()
            sent[q] = signal.SIGTERM


# `python -m nanogpt_mlx` (__main__.py), but a Ctrl-C while the rank still imports (its first half second) ends it
# with status 130 (the launcher says "interrupted") rather than a traceback from inside MLX's import. __main__.py
# cannot catch it: `-m` imports the package, MLX with it, before __main__.py runs
_RANK_MAIN = """import sys
try:
    from nanogpt_mlx.cli import main
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(main())
"""


def launch_local(n: int, argv: list[str], threads_per_rank: int | None = None) -> int:
    """Run the `nanogpt-mlx ARGV` command (_RANK_MAIN) as n ring-backend ranks on 127.0.0.1; return the exit code.

    Each rank gets `threads_per_rank` BLAS threads (default: cores // n), since MLX's CPU backend
    runs everything but matmuls on one thread, n single-threaded ranks can beat one n-threaded one.
    The ranks run in a session of their own: Ctrl-C (SIGINT), SIGTERM or SIGHUP (the terminal closed) to this
    launcher reaches each of them as one Ctrl-C (they agree on a step, save a checkpoint and stop; a second one
    quits without saving), and Ctrl-Z suspends them with it. If a rank fails while the others train, they are
    stopped (a frozen one too) unless they end by themselves within END_GRACE; if the launcher dies, its ranks
    stop as on Ctrl-C. The ranks' last lines (console.last_line: an error, "interrupted") are shown once each, as
    each rank ends.
    """
    if n < 1:
        raise UserError(f"--ranks must be >= 1, got {n}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // n)
    work = Path(tempfile.mkdtemp(prefix="nanogpt-mlx-ranks-"))  # the hostfile, and each rank's last lines
    (work / "hosts.json").write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    env = {**os.environ, "MLX_HOSTFILE": str(work / "hosts.json"), "OPENBLAS_NUM_THREADS": str(threads),
           LAUNCHER_ENV: str(os.getpid())}
    shown: set[str] = set()  # the ranks' last lines shown

    def show(r: int) -> None:
        for line in new_lines(work / f"rank{r}.lines", shown):
            print(line, file=sys.stderr, flush=True)

    live: dict[int, subprocess.Popen] = {}
    interrupted = 0  # the first signal that stopped the run (Ctrl-C: SIGINT)

    def interrupt(signum: int = signal.SIGINT, _frame=None) -> None:
        nonlocal interrupted
        interrupted = interrupted or signum
        for p in live.values():
            p.send_signal(signal.SIGINT)

    def suspend(_signum, _frame) -> None:  # Ctrl-Z: the ranks are not in the terminal's process group
        for p in live.values():
            p.send_signal(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def resume(_signum, _frame) -> None:  # fg / bg
        for p in live.values():
            p.send_signal(signal.SIGCONT)

    handlers = {signal.SIGTERM: interrupt, signal.SIGTSTP: suspend, signal.SIGCONT: resume}
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:  # nohup's stays
        handlers[signal.SIGHUP] = interrupt
    failed: dict[int, int] = {}  # rank -> exit status, of the ranks that failed
    sent: dict[int, int] = {}  # rank -> the signal this launcher stopped it with
    stop_at = kill_at = math.inf
    try:
        with signals.handlers(handlers):
            for r in range(n):
                live[r] = subprocess.Popen([sys.executable, "-c", _RANK_MAIN, *argv], start_new_session=True,
                                           env={**env, "MLX_RANK": str(r), LINES_ENV: str(work / f"rank{r}.lines")})
            while live:
                try:
                    for r, p in list(live.items()):
                        rc = p.poll()
                        if rc is None:
                            continue
                        del live[r]
                        show(r)
                        if rc == 0:
                            continue
                        failed[r] = rc
                        if rc < 0 and -rc != sent.get(r) and not interrupted:
                            oom = " (out of memory?)" if -rc == signal.SIGKILL else ""
                            print(f"nanogpt-mlx: error: rank {r} was killed by {signal.Signals(-rc).name}{oom}",
                                  file=sys.stderr, flush=True)
                        if not interrupted and not sent:  # the run cannot finish: the rest end, or are stopped
                            stop_at = min(stop_at, time.monotonic() + END_GRACE)
                    if time.monotonic() > stop_at and not interrupted:  # once
                        _stop_ranks(live, sent)
                        stop_at, kill_at = math.inf, time.monotonic() + RANK_GRACE
                    if time.monotonic() > kill_at:  # the grace is over: once
                        for q, proc in live.items():
                            proc.kill()
                            sent[q] = signal.SIGKILL
                        kill_at = math.inf
                    time.sleep(0.1)
                except KeyboardInterrupt:  # Ctrl-C reaches the launcher alone (the ranks' own session): forward it
                    interrupt()
            # a rank killed by a signal is the cause (the others then lose their peer): reported as a shell does
            killed = [-rc for r, rc in failed.items() if rc < 0 and -rc != sent.get(r)]
            code = 128 + killed[0] if killed else next(iter(failed.values()), 0)
            if interrupted and "nanogpt-mlx: interrupted" not in shown:  # ranks Ctrl-C'd while importing say nothing
                print("nanogpt-mlx: interrupted", file=sys.stderr, flush=True)
            return 128 + interrupted if interrupted else code
    finally:
        shutil.rmtree(work, ignore_errors=True)
