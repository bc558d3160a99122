"""Lines for the user on stderr (warnings, notes, a command's last line), said once however many ranks run it; and
the command's stdout and stderr (closed at start, or failing to write: named stdout in the error).

The ranks that `train --ranks N` starts on one machine run the same command there, so each would print the same
warning and the same error. Their warnings and notes come from rank 0 alone (ranks on other machines, under
`mlx.launch`, each say their own). A command's last line (an error, "interrupted") can be a rank's own, so each
rank says it, to its launcher, which shows each distinct line once (launch.py).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from .files import devnull_onto

LAUNCHER_ENV = "NANOGPT_MLX_LAUNCHER"  # set by launch.py in its ranks: the launcher's pid
LINES_ENV = "NANOGPT_MLX_RANK_LINES"  # set by launch.py: the file this rank leaves its last lines in
INTERRUPTED = "nanogpt-mlx: interrupted"  # the last line of a command a signal ended
LOST_PEER = "lost a peer rank"  # in the last line of a rank whose collective failed as another rank ended
PEER_FAILED = "failed on another rank"  # in the last line of a rank that stopped for another rank's error
NOT_CONNECTED = "could not connect to the other ranks"  # in the line of a rank that its connect's watchdog killed


def follows_a_peer(line: str) -> bool:
    """Whether a rank's last line only follows from another rank's end (said by that rank, or by its launcher)."""
    return LOST_PEER in line or PEER_FAILED in line


def say(line: str) -> None:
    """A line on stderr, above a progress bar; unless stderr is gone (a closed terminal): exit statuses still speak."""
    with contextlib.suppress(OSError):
        tqdm.write(line, file=sys.stderr)
        sys.stderr.flush()


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Silence a library's logged warnings (`logger`'s below errors) while the body runs: what they say is
    reported once, as one line, or is of no use to the user."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _other_local_rank() -> bool:
    """Whether this process is one of the ranks `--ranks` started, but not rank 0 (which speaks for them)."""
    return LAUNCHER_ENV in os.environ and os.environ.get("MLX_RANK") != "0"


def few(names: list[str], shown: int = 3) -> str:
    """The first `shown` names, with " ..." where there are more: a message names a few of a long list."""
    return ", ".join(names[:shown]) + " ..." * (len(names) > shown)


def counted(n: int, noun: str) -> str:
    """`n noun`, plural unless n is 1: "1 shard", "2,000 shards"."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def byte_unit(n: float) -> tuple[str, float, int]:
    """The unit to write n bytes in, its size and the decimals shown: GB with 2, or MB with 1 below 1 GB (where GB
    would read "0.00")."""
    return ("GB", 1e9, 2) if n >= 1e9 else ("MB", 1e6, 1)


def size(n: float) -> str:
    """n bytes as "1.23 GB", or "12.3 MB" below 1 GB."""
    unit, scale, digits = byte_unit(n)
    return f"{n / scale:.{digits}f} {unit}"


def warn(text: str, kind: str = "warning") -> None:
    """`nanogpt-mlx: warning: text` (or another kind: `note`); of the ranks `--ranks` started, from rank 0 alone."""
    if not _other_local_rank():
        say(f"nanogpt-mlx: {kind}: {text}")


_said: set[str] = set()


def warn_once(text: str, kind: str = "warning") -> None:
    """warn(text) once per process: a directory's loaders, made again (each evaluation, a notebook), say it once."""
    if text not in _said:
        _said.add(text)
        warn(text, kind)


def lines_file() -> str | None:
    """Where a rank that `--ranks` started leaves its last lines for its launcher, while that lives (else None)."""
    path = os.environ.get(LINES_ENV)
    return path if path and str(os.getppid()) == os.environ.get(LAUNCHER_ENV) else None


def last_line(line: str) -> None:
    """A command's last line on stderr; a rank that `--ranks` started gives it to its launcher while that lives
    (without one, its ranks stop as on Ctrl-C: rank 0 alone says "interrupted")."""
    if path := lines_file():
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
            return
        except OSError:
            pass
    if not (line == INTERRUPTED and _other_local_rank()):
        say(line)


def new_lines(path: Path, shown: set[str]) -> list[str]:
    """The lines a rank left in `path` (last_line) that are not in `shown` yet, which they join."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    new = [line for line in dict.fromkeys(lines) if line not in shown]
    shown.update(new)
    return new


# ------------------------------------------------------------------------- the command's streams
def fill_closed_streams() -> None:
    """A stdout or stderr closed at start (`2>&-`) becomes /dev/null: Python leaves sys.stderr None (progress bars
    then fail), and the next file opened would take the number, receiving what MLX writes there itself. What is
    printed to a closed stdout (a command's result) fails as it would in C (`ls >&-`), not gone with status 0;
    warnings and progress to a closed stderr are dropped."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            devnull_onto(fd)
            setattr(sys, name, _ClosedStdout() if fd == 1 else open(fd, "w", closefd=False))


class _ClosedStdout(io.TextIOBase):
    """sys.stdout for a descriptor 1 closed at start: every write fails (named stdout by NamedStdout)."""

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, "it was closed when the command started")

    def fileno(self) -> int:
        return 1


STDOUT = "stdout"  # the file name of an OSError that writing stdout raised (NamedStdout)


class NamedStdout:
    """sys.stdout, whose write errors name it: an OSError from `print` names no file, so a full disk under
    `> out.txt` read as the command's own failure ("No space left on device"), though its work was done."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        with self._named():
            return self._stream.write(text)

    def flush(self) -> None:
        with self._named():
            self._stream.flush()

    @staticmethod
    @contextlib.contextmanager
    def _named() -> Iterator[None]:
        try:
            yield
        except OSError as e:
            e.filename = e.filename or STDOUT
            raise


def bar_off(show: bool) -> bool | None:
    """tqdm's `disable` for a progress bar shown where `show`: on a terminal (None: tqdm's test), and in a Jupyter
    kernel, whose stderr is no terminal (there tqdm's test turned every bar off)."""
    if not show:
        return True
    return False if "ipykernel" in sys.modules else None
