"""A training run's directory (OUT) as one Trainer writes it: whose it is, and when it is locked.

Another process must not write OUT while a Trainer sets up or trains there (locks.lock_dir: the same command
twice, a scheduler's retry of a job still alive), but between two train() calls OUT is free. So before each write a
Trainer's RunDir checks that OUT is still its own: no newer Trainer of OUT was made in this process (a notebook's
cell run again), and no other process wrote or removed OUT's checkpoints since this one last saved or resumed.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

from . import checkpoint
from .errors import UserError
from .files import check_writable, mlx_path, remove_stale_temps
from .locks import lock_dir, unlock_dir

# the RunDir of each OUT in this process, the latest made: an older one's Trainer would write that run's
# checkpoints and logs with its own
_NEWEST: weakref.WeakValueDictionary[Path, RunDir] = weakref.WeakValueDictionary()

# the RunDirs of each OUT in this process that hold its lock (RunDir.hold): the last of them to go unlocks it
_HOLDERS: collections.Counter[Path] = collections.Counter()

# the OUTs whose Trainer is inside train() in this process (a notebook's thread): no other may be made of it meanwhile
_TRAINING: set[Path] = set()


def _release(out: Path) -> None:
    """A RunDir of OUT is gone (or its Trainer refused to start): unlock OUT for other processes if it was the
    last here."""
    _HOLDERS[out] -= 1
    if _HOLDERS[out] <= 0:
        del _HOLDERS[out]
        unlock_dir(out)


def _found(ckpt: Path) -> tuple[Path, int, int]:
    """A checkpoint directory as found: its path, inode and modification time (a checkpoint written anew under the
    same name differs in one, even where the filesystem gives it the inode of the one removed)."""
    stat = ckpt.stat()
    return ckpt, stat.st_ino, stat.st_mtime_ns


class RunDir:
    """OUT, as the Trainer that holds this writes it (see the module's docstring)."""

    def __init__(self, out: Path):
        self.out = out
        self._holding: weakref.finalize | None = None  # gives OUT's lock back when this RunDir goes (hold)
        self._saved: tuple[Path, int, int] | None = None  # the checkpoint last saved or resumed from, as found

    def hold(self) -> None:
        """Lock OUT from now until unlock() (the end of train()), or until this RunDir and every other of OUT in
        this process are gone."""
        lock_dir(self.out, "run")
        if self._holding is None:
            _HOLDERS[self.out] += 1
            self._holding = weakref.finalize(self, _release, self.out)

    def release(self) -> None:
        """Give back the hold (a refused start leaves OUT to the next: in a notebook this process lives on)."""
        if self._holding:
            self._holding()

    def unlock(self) -> None:
        unlock_dir(self.out)

    def check(self, resumed: Path | None, overwrite: bool, main: bool) -> None:
        """Refuse a fresh run into an OUT holding another run, unless overwriting; an OUT that a Trainer of this
        process is training (in another thread: both trained until the older one's next save, their logs
        interleaved); and an OUT this process cannot write, now rather than at the first checkpoint."""
        self._refuse_while_training("make this one")
        if resumed is None and not overwrite:
            checkpoint.refuse_replacing(self.out)
        mlx_path(self.out)  # its checkpoints are MLX's files: refused now, not at the first save
        if main:
            check_writable(self.out)

    def claim(self, resumed: Path | None) -> None:
        """Lock OUT until train() ends, before anything in it is removed: what a killed run left half-written, and
        for a fresh run (resumed None: --overwrite) the old run's checkpoints and its model, which sample would
        load. A resumed run's model is its latest checkpoint's again (a kill between the two left the one
        before)."""
        self.hold()
        remove_stale_temps(self.out)
        if resumed is not None:
            checkpoint.publish_latest(self.out)
            return
        for old in checkpoint.checkpoints(self.out):
            shutil.rmtree(old)
        for old in checkpoint.MODEL_FILES:
            (self.out / old).unlink(missing_ok=True)

    def own(self, resumed: Path | None) -> None:
        """Make this the newest RunDir of OUT in this process, its checkpoint the one resumed from (if any)."""
        self._saved = _found(resumed) if resumed is not None else None
        _NEWEST[self.out] = self

    def saved(self, ckpt: Path) -> None:
        self._saved = _found(ckpt)

    @property
    def saved_step(self) -> int:
        """The step of the checkpoint last saved or resumed from (0, a fresh run's start, before any)."""
        return checkpoint.step_of(self._saved[0]) if self._saved else 0

    def check_newest(self) -> None:
        """Refuse to write OUT from a Trainer older than the newest of OUT in this process: it would write that
        run's checkpoints and model with its own (a notebook's cell run again)."""
        if _NEWEST.get(self.out) is not self:
            raise UserError(f"a newer Trainer of {self.out} was made in this process: use that one (or continue "
                            f"from {self.out}'s last checkpoint with Trainer(cfg, resume=True))")

    def check_latest(self) -> None:
        """Refuse to write OUT where another process has written a checkpoint since this Trainer last saved or
        resumed (between its train() calls, when OUT is unlocked): it would train that run's steps again, and its
        checkpoints, model and logs would replace theirs. Checkpoints removed (by hand) leave this Trainer's state
        the only copy: it may save it."""
        found = checkpoint.checkpoints(self.out)
        if found and (latest := _found(found[-1])) != self._saved:
            mine = f"this Trainer's {self._saved[0].name}" if self._saved else "this Trainer started"
            raise UserError(f"{self.out}'s latest checkpoint is {latest[0].name}, written by another run since {mine}: "
                            "continue from it with Trainer(cfg, resume=True)")

    def _refuse_while_training(self, then: str) -> None:
        if self.out in _TRAINING:
            raise UserError(f"a Trainer of {self.out} is training in this process (another thread): {then} once its "
                            "train() has returned")

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """While this Trainer's train() runs: no other Trainer of OUT may be made, nor train() entered again."""
        self._refuse_while_training("call train()")
        _TRAINING.add(self.out)
        try:
            yield
        finally:
            _TRAINING.discard(self.out)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """While a checkpoint is saved outside train(): OUT checked to be this Trainer's still, and locked."""
        self.check_newest()
        took = lock_dir(self.out, "run")  # another process may be writing OUT now
        try:
            self.check_latest()
            yield
        finally:
            if took:
                unlock_dir(self.out)
