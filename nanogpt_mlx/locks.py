"""A directory that one process writes at a time (a run's OUT, prepare's OUT): DIRECTORY/.lock, held while it writes.

A second process started into the same directory by mistake (the same command twice, a scheduler's retry of a job
still alive) would interleave its files with the first's; it is refused with one line that names the writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from .errors import UserError
from .files import cannot, make_dirs

LOCK_FILE = ".lock"
_locked: dict[Path, IO[str]] = {}  # directory -> its lock file, held by this process


def lock_dir(directory: Path, writer: str) -> bool:
    """Hold DIRECTORY/.lock while this process writes there (until unlock_dir, or the process ends however it
    ends). `writer` ("run", "prepare") names it, in the lock file, for the refusal of another. Returns whether this
    call took the lock (False: this process held it already)."""
    key = directory.resolve()
    if key in _locked:
        return False
    fresh = not directory.exists()
    make_dirs(directory)

    def cannot_lock(e: OSError) -> UserError:
        if fresh:  # a directory made for a lock it cannot hold (a full disk) is not left behind, empty
            with contextlib.suppress(OSError):
                (directory / LOCK_FILE).unlink(missing_ok=True)
                directory.rmdir()
        return cannot("write", directory / LOCK_FILE, e)

    try:
        f = open(directory / LOCK_FILE, "a+")
    except OSError as e:
        raise cannot_lock(e) from None
    try:
        # a POSIX lock, not flock(): a forked child (prepare's tokenizer workers) does not inherit it, so a
        # killed process's lock ends with it, not with its last worker
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _held(directory, f) from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{writer} (pid {os.getpid()})\n")
        f.flush()
    except OSError as e:  # a full disk (the message had no path)
        with contextlib.suppress(OSError):  # close() flushes the same line again, and fails again, but closes
            f.close()  # and the lock with it
        raise cannot_lock(e) from None
    _locked[key] = f
    return True


def _held(directory: Path, f: IO[str]) -> UserError:
    """The refusal of a directory whose lock file `f` (closed here) another process holds."""
    f.seek(0)
    holder = f.read().strip()  # "run (pid 123)"; an earlier version's "pid 123"
    f.close()
    if not holder or holder.startswith("pid "):
        holder = f"process ({holder or 'its pid unknown'})"
    return UserError(f"{directory} is being written by another {holder}; wait for it to end, or write to another "
                     "directory")


def refuse_locked(directory: Path) -> None:
    """Refuse (UserError, as lock_dir) a directory whose lock another process holds, taking no lock and making no
    file: before what it holds is judged (a live run's OUT was told to pass --overwrite, then refused as live)."""
    if directory.resolve() in _locked:  # this process's: closing another descriptor of it would give it up
        return
    try:
        f = open(directory / LOCK_FILE, "r+")
    except OSError:  # none (nobody writes there), or one that cannot be opened, which lock_dir will say
        return
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise _held(directory, f) from None
    f.close()  # (and the lock taken to test it with it)


def unlock_dir(directory: Path) -> None:
    f = _locked.pop(directory.resolve(), None)
    if f is not None:
        f.close()
