"""Checkpoint directories of a run, its resume state and its log, all crash-safe.

Checkpoints are directories `OUT/ckpt-{step:06d}` (weights, optimizer state, trainer state with
the data-loader position and the config), written under a temporary name and renamed, so a
crash mid-save leaves the previous one intact; `OUT/model.safetensors` + `OUT/config.json`
always hold the latest weights for `sample`/`export`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .errors import UserError
from .files import atomic_path, atomic_write_text
from .model import GPT
from .weights import save_model

STATE_FILE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary ones are never listed)."""
    out = Path(out)
    return sorted(p for p in out.glob("ckpt-*") if p.is_dir() and p.name[5:].isdigit()) if out.is_dir() else []


def latest_checkpoint(out: str | os.PathLike) -> Path:
    found = checkpoints(out)
    if not found:
        raise UserError(f"{out}: no checkpoint to resume from (expected {out}/ckpt-NNNNNN/)")
    return found[-1]


def read_state(ckpt: Path) -> dict:
    """The trainer state saved in a checkpoint: step, world, config, data-loader position."""
    return json.loads((ckpt / STATE_FILE).read_text())


def read_optimizer(ckpt: Path):
    """The optimizer state tree saved in a checkpoint."""
    return tree_unflatten(list(mx.load(str(ckpt / OPTIMIZER_FILE)).items()))


def write(out: Path, step: int, model: GPT, optimizer_state, state: dict) -> Path:
    """Write OUT/ckpt-{step} (complete or not at all), point OUT/model.safetensors at it, drop older ones."""
    final = out / f"ckpt-{step:06d}"
    if final.exists():  # a checkpoint of this step holds this very state
        return final
    tmp = out / f".ckpt-{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    with atomic_path(tmp / OPTIMIZER_FILE) as f:
        mx.save_safetensors(str(f), dict(tree_flatten(optimizer_state)))
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1))
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(out)
    _link_or_copy(final / "model.safetensors", out / "model.safetensors")
    atomic_write_text(out / "config.json", (final / "config.json").read_text())
    for old in checkpoints(out)[:-1] + list(out.glob(".ckpt-*.tmp*")):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put src's content at dst atomically, as a hard link when the filesystem allows (no copy)."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunLog:
    """log.txt in build-nanogpt's format (`{step} train {loss:.6f}`, `{step} val {loss:.4f}`,
    `{step} hella {acc:.4f}`) plus log.jsonl with every field; both append-only, one line per event."""

    FORMATS = {"train": ".6f", "val": ".4f", "hella": ".4f"}

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.txt, self.jsonl, self.enabled = out / "log.txt", out / "log.jsonl", enabled
        if enabled:  # drop what a crashed run logged after its last checkpoint (or everything, if fresh)
            self._keep_before(self.txt, start_step, lambda line: int(line.split()[0]))
            self._keep_before(self.jsonl, start_step, lambda line: json.loads(line)["step"])

    @staticmethod
    def _keep_before(path: Path, step: int, step_of) -> None:
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        atomic_write_text(path, "".join(line for line in lines if line.strip() and step_of(line) < step))

    def metric(self, step: int, kind: str, value: float, **extra) -> None:
        self.event(step, kind, **{kind if kind == "hella" else "loss": value, **extra})
        if self.enabled:
            with open(self.txt, "a") as f:
                f.write(f"{step} {kind} {value:{self.FORMATS[kind]}}\n")

    def event(self, step: int, kind: str, **fields) -> None:
        if self.enabled:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, "kind": kind, **fields}) + "\n")
