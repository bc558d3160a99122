"""Lines for the user on stderr (warnings, notes, a command's last line), said once however many ranks run it.

Every rank of a data-parallel run runs the same command, so each would print the same warning and the same
error. Warnings and notes come from rank 0 alone. A command's last line (an error, "interrupted") can be a
rank's own, so each rank says it; a rank that `--ranks` started leaves it to its launcher, which shows each
distinct line once (distributed.launch_local).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from tqdm import tqdm

RANK_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # the launchers' names for this process's rank
LAUNCHER_ENV = "NANOGPT_MLX_LAUNCHER"  # set by launch_local: the launcher's pid
LINES_ENV = "NANOGPT_MLX_RANK_LINES"  # set by launch_local: the file this rank leaves its last lines in


def rank() -> int:
    """This process's rank as its launcher set it (0 when not launched as one of several)."""
    for name in RANK_ENV:
        with contextlib.suppress(KeyError, ValueError):
            return int(os.environ[name])
    return 0


def warn(text: str, kind: str = "warning") -> None:
    """`nanogpt-mlx: warning: text` (or another kind: `note`) on stderr, from rank 0 alone; above a progress bar."""
    if rank() == 0:
        with contextlib.suppress(OSError):
            tqdm.write(f"nanogpt-mlx: {kind}: {text}", file=sys.stderr)


def last_line(line: str) -> None:
    """A command's last line on stderr; a rank of `--ranks` gives it to its launcher while that lives. Unless
    stderr is gone too (a closed terminal): the exit status still says it."""
    path = os.environ.get(LINES_ENV)
    if path and str(os.getppid()) == os.environ.get(LAUNCHER_ENV):
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
            return
        except OSError:
            pass
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def new_lines(path: Path, shown: set[str]) -> list[str]:
    """The lines a rank left in `path` (last_line) that are not in `shown` yet, which they join."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    new = [line for line in dict.fromkeys(lines) if line not in shown]
    shown.update(new)
    return new
