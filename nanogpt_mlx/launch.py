"""`nanogpt-mlx train --ranks N`: N ranks on this machine (MLX's ring backend on 127.0.0.1), one process to signal.

The launcher starts the ranks in a session of their own and forwards what a terminal sends it (Ctrl-C,
SIGTERM, SIGHUP, Ctrl-Z) to them; it stops the rest of a group that cannot finish, and shows each distinct last
line of its ranks once (console.last_line).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from shutil import rmtree

from tqdm import tqdm

from . import device, signals
from .console import INTERRUPTED, LAUNCHER_ENV, LINES_ENV, NOT_CONNECTED, follows_a_peer, new_lines, say
from .errors import UserError
from .files import owned_temp_dir

# seconds the other ranks have to end by themselves once one ended with an error status before they are stopped:
# a stop they agreed on (a Ctrl-C to one rank, a bad shard, stdout gone) ends them all, rank 0 after its save
END_GRACE = 5.0
# seconds a rank stopped (signals.GROUP_END) has to exit before it is killed: one that lives on is finishing a save
RANK_GRACE = signals.SAVE_WAIT

# `python -m nanogpt_mlx` (__main__.py), but a Ctrl-C while the rank still imports (its first half second) ends it
# with status 130 (the launcher says "interrupted") rather than a traceback from inside MLX's import. __main__.py
# cannot catch it: `-m` imports the package, MLX with it, before __main__.py runs. A KeyboardInterrupt could not be
# caught everywhere either: raised in a __del__ (importlib's ZipFile) Python prints it as "Exception ignored ...
# Traceback" and imports on; raised inside numpy's C import, numpy prints it and raises an ImportError. So until the
# imports are done, a Ctrl-C ends the rank at once. Before that, while Python itself starts (`import site`), a Ctrl-C
# ended it with "Fatal Python error: init_import_site" and a traceback: the rank starts with Ctrl-C blocked (a mask
# survives exec; _Ranks.start), so that one forwarded then waits for this handler, which unblocks it.
_RANK_MAIN = """import os, signal, sys
signal.signal(signal.SIGINT, lambda *_: os._exit(130))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
from nanogpt_mlx.cli import command
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(command())
"""


def _stopped(pid: int) -> bool:
    """Whether a process is stopped (SIGSTOP): its state in /proc (Linux), else as `ps` says (macOS)."""
    return process_state(pid) == "T"


def process_state(pid: int) -> str:
    """A process's state letter (R running, S sleeping, T stopped...; '' if it is gone or cannot be read)."""
    try:
        if sys.platform == "linux":
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        said = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
        return said.stdout.strip()[:1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return ""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _Ranks:
    """The running ranks of one launch: what ended how, what was sent to whom, and when to stop or kill the rest."""

    def __init__(self, work: Path):
        self.work = work
        self.live: dict[int, subprocess.Popen] = {}
        self.failed: dict[int, int] = {}  # rank -> exit status, of the ranks that failed
        self.sent: dict[int, int] = {}  # rank -> the signal this launcher stopped it with
        self.interrupted = 0  # the first signal that stopped the run (Ctrl-C: SIGINT)
        self.shown: set[str] = set()  # the ranks' last lines shown
        self.following: list[str] = []  # the ranks' last lines that only follow from another rank's end (status())
        self.cause_said = False  # whether a line said why the run failed: a rank's error, a rank killed or frozen
        self.stop_at = self.kill_at = math.inf
        self.find_frozen = False  # whether the next poll kills the frozen ranks (they cannot stop by themselves)

    def start(self, r: int, argv: list[str], env: dict[str, str]) -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # the rank's until _RANK_MAIN unblocks it
        try:  # (one to this launcher meanwhile follows: interrupt())
            self.live[r] = subprocess.Popen([sys.executable, "-c", _RANK_MAIN, *argv], start_new_session=True,
                                            env={**env, "MLX_RANK": str(r),
                                                 LINES_ENV: str(self.work / f"rank{r}.lines")})
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if self.interrupted:  # a signal came as it started, before it was among the live ranks that interrupt() tells
            self.live[r].send_signal(self.interrupted)

    def interrupt(self, signum: int = signal.SIGINT, _frame=None) -> None:
        """Ctrl-C, SIGTERM or SIGHUP to the launcher: the same to each rank, a stop that they agree on (Ctrl-C again
        quits without saving; a SIGTERM again, as a scheduler may send, does not). A frozen rank cannot take part in
        the stop (the others would wait for it in their collectives until the timeout): the next poll kills it. (No
        output here: a handler's write can land inside the main loop's.)"""
        self.interrupted = self.interrupted or signum
        self.find_frozen = True
        for p in self.live.values():
            p.send_signal(signum)

    def suspend(self, _signum, _frame) -> None:  # Ctrl-Z: the ranks are not in the terminal's process group
        self._to_groups(signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def resume(self, _signum, _frame) -> None:  # fg / bg
        self._to_groups(signal.SIGCONT)

    def _to_groups(self, signum: int) -> None:
        """`signum` to each live rank's process group: the rank and what it started (its connect's watchdog, whose
        clock stops with it)."""
        for p in self.live.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signum)

    def poll(self) -> None:
        """Note the ranks that ended (and show their last lines); after a failure or a Ctrl-C kill a frozen rank;
        stop the rest END_GRACE after a failure, kill them RANK_GRACE after that."""
        ended = {r: rc for r, p in self.live.items() if (rc := p.poll()) is not None}
        for r, rc in ended.items():
            del self.live[r]
            lines = self.work / f"rank{r}.lines"
            # killed by its connect's watchdog, which said why: that error ended it, not a kill to report (any other
            # SIGKILL is, the OOM killer's most likely, also after the rank's own last line)
            if rc == -signal.SIGKILL and any(NOT_CONNECTED in line for line in new_lines(lines, set())):
                rc = 1
            for line in new_lines(lines, self.shown):
                if follows_a_peer(line):  # (its cause may be seen in a later poll)
                    self.following.append(line)
                else:
                    say(line)
                    self.cause_said = self.cause_said or rc != 0
            if rc == 0:
                continue
            self.failed[r] = rc
            if rc < 0 and -rc != self.sent.get(r):
                # a Ctrl-C, SIGTERM or SIGHUP that a rank took before its handlers (importing, connecting:
                # distributed.init), as a scheduler's to every process of a job or this launcher's forwarded, stopped
                # it: the run stops, and that is no kill to say
                if -rc in signals.STOPPING:
                    self.interrupted = self.interrupted or -rc
                else:
                    oom = " (out of memory?)" if -rc == signal.SIGKILL else ""
                    say(f"nanogpt-mlx: error: rank {r} was killed by {signal.Signals(-rc).name}{oom}")
                    self.cause_said = True
            if not self.sent:  # the run cannot finish: the rest end by themselves, or are stopped
                self.stop_at = min(self.stop_at, time.monotonic() + END_GRACE)
                self.find_frozen = True
        if self.find_frozen:
            self.find_frozen = False
            for q, proc in self.live.items():
                if _stopped(proc.pid):
                    self._kill_frozen(q, proc)
        now = time.monotonic()
        if now > self.stop_at:  # once
            self._stop_rest()
            self.stop_at, self.kill_at = math.inf, now + RANK_GRACE
        if now > self.kill_at:  # once
            for q, proc in self.live.items():
                proc.kill()
                self.sent[q] = signal.SIGKILL
            self.kill_at = math.inf

    def _stop_rest(self) -> None:
        """End the live ranks (signals.GROUP_END: at once, or after the save in progress), SIGKILL a frozen one
        (nothing it could save)."""
        for q, proc in self.live.items():
            if proc.poll() is not None:  # ended too, not by this launcher: seen next time round
                continue
            if _stopped(proc.pid):
                self._kill_frozen(q, proc)
            else:
                proc.send_signal(signals.GROUP_END)
                self.sent[q] = signals.GROUP_END

    def _kill_frozen(self, q: int, proc: subprocess.Popen) -> None:
        say(f"nanogpt-mlx: error: rank {q} was stopped (frozen)")
        self.cause_said = True
        proc.kill()
        self.sent[q] = signal.SIGKILL

    def status(self) -> int:
        """The launch's exit status: a signal that stopped it, else a rank killed by a signal (the cause: the others
        then lose their peer), as a shell reports it, else the first failed rank's status (0 if none failed: a signal
        that came during the last save, which the ranks finished). The ranks' lines that only follow from another
        rank's end are said if nothing else said why the run ended."""
        if not (self.cause_said or self.interrupted):
            for line in self.following:
                say(line)
        if self.interrupted and self.failed:
            if INTERRUPTED not in self.shown:  # ranks Ctrl-C'd while importing say nothing
                say(INTERRUPTED)
            return 128 + self.interrupted
        killed = [-rc for r, rc in self.failed.items() if rc < 0 and -rc != self.sent.get(r)]
        return 128 + killed[0] if killed else next(iter(self.failed.values()), 0)


def check_ranks(n: int) -> int:
    """Refuse n ranks that this machine cannot run; return the cores this process may use (device.cores)."""
    cores = device.cores()
    if n < 1:
        raise UserError(f"--ranks must be >= 1, got {n}")
    if n > cores:  # more would only share cores (slower than fewer ranks), each with its own copy of MLX and the model
        raise UserError(f"--ranks must be at most the {cores} cores this process may use, got {n} (for several "
                        "machines use mlx.launch)")
    return cores


def launch_local(n: int, argv: list[str], threads_per_rank: int | None = None) -> int:
    """Run the `nanogpt-mlx ARGV` command (_RANK_MAIN) as n ring-backend ranks on 127.0.0.1; return the exit code.

    n is at most the cores. Each rank gets `threads_per_rank` BLAS threads (default: cores // n), since MLX's CPU
    backend runs everything but matmuls on one thread, n single-threaded ranks can beat one n-threaded one.
    The ranks run in a session of their own: Ctrl-C (SIGINT), SIGTERM or SIGHUP (the terminal closed) to this
    launcher reaches each of them (they agree on a step, save a checkpoint and stop; a second Ctrl-C quits without
    saving), and Ctrl-Z suspends them with it. If a rank fails, the others are stopped (a frozen one
    too) unless they end by themselves within END_GRACE; if the launcher dies, its ranks stop as on Ctrl-C
    (distributed.init).
    """
    cores = check_ranks(n)
    threads = threads_per_rank or cores // n
    # tqdm makes its write lock at its first use, importing multiprocessing's: a Ctrl-C amid that import broke tqdm
    # for good (the next line said was an AttributeError traceback); made now, before any signal is forwarded
    tqdm.get_lock()
    # the hostfile and each rank's last lines, in a directory named for this launcher: the next launch removes one that
    # a killed launcher left
    work = owned_temp_dir("nanogpt-mlx-ranks-")
    try:
        (work / "hosts.json").write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
        env = {**device.child_env(), "MLX_HOSTFILE": str(work / "hosts.json"), "OPENBLAS_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), LAUNCHER_ENV: str(os.getpid())}
        ranks = _Ranks(work)
        # Ctrl-C reaches the launcher alone (the ranks run in a session of their own) and is forwarded like the
        # others: raised as KeyboardInterrupt while a rank was being started, it ended the launcher and left the ranks
        # running
        handlers = {**dict.fromkeys(signals.stops(), ranks.interrupt), signal.SIGTSTP: ranks.suspend,
                    signal.SIGCONT: ranks.resume}  # (SIGHUP unless ignored: nohup's stays)
        with signals.handlers(handlers):
            for r in range(n):
                if not ranks.interrupted:  # once stopped, no more
                    ranks.start(r, argv, env)
            while ranks.live:
                ranks.poll()
                time.sleep(0.1)
            return ranks.status()
    finally:
        rmtree(work, ignore_errors=True)
