"""Checkpoint directories of a run, its resume state and its log, all crash-safe.

Checkpoints are directories `OUT/ckpt-{step:06d}` (weights, optimizer state, trainer state with
the data-loader position and the config), written under a temporary name and renamed, so a
crash mid-save leaves the previous one intact; the latest two are kept, so a damaged latest one
still leaves one to resume from, and reading one checks every file. `OUT/model.safetensors` +
`OUT/config.json` always hold the latest weights for `sample`/`export`.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .console import byte_unit, few, warn
from .errors import UserError, first_line
from .files import (atomic_dir, atomic_path, atomic_write_text, cannot, existing_ancestor, mlx_path, named_dir,
                    read_json, shell_word)
from .model import GPT
from .weights import (TRAINER_STATE, checkpoints, load_model, nonfinite, safetensors_shapes, save_model,
                      save_safetensors, step_of)

STATE_FILE = TRAINER_STATE  # (named in weights.py, whose save_model must not write over a checkpoint)
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILES = ("log.txt", "log.jsonl")  # RunLog's
MODEL_FILES = ("model.safetensors", "config.json")  # OUT's copy of the latest checkpoint's model, for `sample`
KEEP = 2  # the latest checkpoint and the one before, to resume from if the latest is damaged


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where the checkpoint of step `step` of the run in `out` is written."""
    return out / f"ckpt-{step:06d}"


def latest_checkpoint(out: str | os.PathLike) -> Path:
    found = checkpoints(out)
    if found:
        return found[-1]
    out = Path(out)
    if (out / STATE_FILE).is_file() and (run := checkpoints(out.parent)):  # one of a run's checkpoints, not the run
        this = "it" if run[-1].samefile(out) else \
            "its latest checkpoint; to continue from this one, move the later ones away"
        raise UserError(f"{out} is a checkpoint of the run in {out.parent}: resume the run (--resume "
                        f"{shell_word(out.parent)}; in Python Trainer(cfg, resume=True) with cfg.out {out.parent}), "
                        f"which continues from {this}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a directory; resume a run's directory (the --out it trained into)")
    raise UserError(f"{out}: no checkpoint to resume from (expected {out}/ckpt-NNNNNN/)")


def damaged(ckpt: Path, reason: str) -> UserError:
    """The error for a checkpoint that cannot be resumed, pointing at the previous one if there is one."""
    earlier = [c for c in checkpoints(ckpt.parent) if step_of(c) < step_of(ckpt)]
    move = f"mv {shell_word(ckpt)} {shell_word(f'{ckpt}.damaged')}"
    hint = (f"the previous checkpoint {earlier[-1].name} is kept: move this one away ({move}) and resume again to "
            "continue from it" if earlier else "there is no earlier checkpoint to resume from")
    return UserError(f"{ckpt}: damaged checkpoint ({reason}); {hint}")


def read_state(ckpt: Path) -> dict:
    """The trainer state saved in a checkpoint: step, world, config, data-loader position (checked)."""
    path = ckpt / STATE_FILE
    try:
        state = read_json(path)
    except FileNotFoundError:
        raise damaged(ckpt, f"{STATE_FILE} is missing") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise damaged(ckpt, f"{STATE_FILE}: {first_line(e)}") from None
    expected = {"step": int, "world": int, "config": dict, "train_loader": dict}
    if not isinstance(state, dict) or not all(type(state.get(k)) is t for k, t in expected.items()):  # true is no 1
        raise damaged(ckpt, f"{STATE_FILE} lacks {', '.join(expected)}")
    if state["step"] < 0 or state["world"] < 1:
        raise damaged(ckpt, f"{STATE_FILE}: step {state['step']}, world {state['world']}")
    # a step other than its directory's (an edited or copied file): resumed there, the run's save at the directory's
    # step kept the directory as it was (write() keeps an existing checkpoint of the same step)
    if (step := step_of(ckpt)) is not None and step != state["step"]:
        raise damaged(ckpt, f"{STATE_FILE}: step {state['step']} in the checkpoint of step {step}")
    return state


def read_optimizer(ckpt: Path, like):
    """The optimizer state tree saved in a checkpoint, its file checked against its header first, and its arrays
    against those of the state tree `like` (the run's, per tensor)."""
    path = ckpt / OPTIMIZER_FILE
    if not path.is_file():
        raise damaged(ckpt, f"{OPTIMIZER_FILE} is missing")
    name = mlx_path(path)  # not a damaged checkpoint
    try:
        safetensors_shapes(path)  # a truncated file fails here, not later inside an update
        saved = mx.load(name)
    except (UserError, RuntimeError, ValueError) as e:
        raise damaged(ckpt, f"{OPTIMIZER_FILE}: {first_line(e).removeprefix(f'{path}: ')}") from None
    # missing entries MLX would start from zeros, silently; others' shapes would fail inside the first update
    found = {k: (a.shape, a.dtype) for k, a in saved.items()}
    needed = {k: (a.shape, a.dtype) for k, a in tree_flatten(like)}
    missing = [k for k in needed if k not in found]
    if missing:
        raise damaged(ckpt, f"{OPTIMIZER_FILE} lacks {few(missing)}")
    wrong = next((k for k in needed if found[k] != needed[k]), None)
    if wrong:  # a shape would fail inside the first update; a dtype (bool moments) would train on, inexactly
        raise damaged(ckpt, f"{OPTIMIZER_FILE}: {wrong} is {found[wrong][1]} of shape {found[wrong][0]}, the model "
                            f"needs {needed[wrong][1]} of {needed[wrong][0]}")
    if (bad := nonfinite(saved.items())) is not None:  # NaN weights after the first update, saved as good
        raise damaged(ckpt, f"{OPTIMIZER_FILE}: {bad} holds NaN/inf")
    return tree_unflatten(list(saved.items()))


def read_model(ckpt: Path) -> GPT:
    """The weights saved in a checkpoint."""
    ckpt = Path(mlx_path(named_dir(ckpt, "checkpoint directory")))  # not a damaged checkpoint
    try:
        return load_model(ckpt)
    except UserError as e:
        raise damaged(ckpt, str(e).removeprefix(f"{ckpt}/").removeprefix(f"{ckpt}: ")) from None


def write(out: Path, step: int, model: GPT, optimizer_state, state: dict) -> Path:
    """Write OUT/ckpt-{step} (complete or not at all), point OUT/model.safetensors at it, drop older ones."""
    final = checkpoint_dir(out, step)
    mlx_path(final)  # a name MLX cannot open is refused as such, not as a failed save ("free space") below
    exists = final.exists()
    # a NaN the loss has not shown yet (an update from a damaged state): not saved as the run's good model
    if not exists and (bad := nonfinite([*model.parameters_flat(), *tree_flatten(optimizer_state)])) is not None:
        raise UserError(f"{final.name} not saved: {bad} holds NaN/inf; {kept(out, 'once its cause is found')}")
    text = json.dumps(state, indent=1)
    try:
        if exists:  # a checkpoint of this step holds these weights; OUT's model may not point at it yet
            # (a kill after the rename), and a resumed run's settings (--max-steps) may differ from those it holds
            if _read_text(final / STATE_FILE) != text:
                atomic_write_text(final / STATE_FILE, text)
        else:
            with atomic_dir(final) as tmp:
                save_model(model, tmp)
                with atomic_path(tmp / OPTIMIZER_FILE) as f:
                    save_safetensors(f, dict(tree_flatten(optimizer_state)))
                atomic_write_text(tmp / STATE_FILE, text)
    except UserError as e:  # a full disk, a permission: say which checkpoint did not happen, and what is kept
        raise UserError(f"{final.name} not saved: {e}; {kept(out, f'once {out} can be written again')}") from None
    _publish(out, final)
    return final


def kept(out: Path, when: str) -> str:
    """What a save that did not happen (a failed write, a run stopped without saving) leaves: the previous
    checkpoint to resume `when` ..., or none."""
    previous = checkpoints(out)
    return (f"the previous checkpoint {previous[-1].name} is kept; resume (--resume {shell_word(out)}) {when}"
            if previous else f"no checkpoint was written; start again {when}")


def _read_text(path: Path) -> str | None:
    """The text of a file, None where it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def refuse_replacing(out: Path) -> None:
    """Refuse to start a fresh run in an OUT that holds another run's checkpoints, a model or logs."""
    if checkpoints(out):
        raise UserError(f"{out} already holds a checkpoint; resume it (--resume {shell_word(out)}; in Python "
                        "Trainer(cfg, resume=True)), pass --overwrite (overwrite=True), or choose another --out")
    logs = [f for f in LOG_FILES if (out / f).is_file() and (out / f).stat().st_size]
    if any((out / f).exists() for f in MODEL_FILES):
        held = f"a model ({', '.join(MODEL_FILES)})"
    elif logs:  # alone: a run that ended before its first checkpoint (a crash, the OOM killer)
        held = f"a run's {' and '.join(logs)} (no checkpoint to resume)"
    else:
        return
    raise UserError(f"{out} already holds {held}, which a new run would replace; pass --overwrite (in Python "
                    "Trainer(cfg, overwrite=True)), or choose another --out")


def check_room(out: Path, size: int, fresh: bool) -> None:
    """Refuse a run whose OUT cannot hold one checkpoint of `size` bytes (it would train until its first save, then
    lose every step), and warn where the KEEP + 1 checkpoints that a save holds before it drops the oldest do not
    fit (that save would stop the run, keeping the one before). A fresh run removes OUT's checkpoints first."""
    free = shutil.disk_usage(existing_ancestor(out)).free
    old = checkpoints(out) if out.is_dir() else []
    if fresh:
        free += sum(f.stat().st_size for c in old for f in c.rglob("*") if f.is_file())
        old = []
    has, takes = _told_apart(free, size)
    if free < size:
        instead = " or choose another --out" if fresh else " (a resumed run saves in its OUT)"
        raise UserError(f"{out}: {has} free, and a checkpoint of this run takes {takes} "
                        f"(float32 weights and optimizer state); make room{instead}")
    held = (KEEP + 1 - min(len(old), KEEP)) * size
    if free < held:
        warn(f"{out}: {has} free, and saving holds up to {KEEP + 1} checkpoints of {takes} "
             f"before it drops the oldest: a later save will stop the run, keeping the checkpoint before it")


def _told_apart(a: int, b: int) -> tuple[str, str]:
    """Byte counts a and b in GB (MB where both are below 1 GB), with as many decimals as show which is larger."""
    unit, scale, _ = byte_unit(max(a, b))
    for digits in range(2, 10):
        said = tuple(f"{n / scale:.{digits}f} {unit}" for n in (a, b))
        if said[0] != said[1]:
            break
    return said


def publish_latest(out: Path) -> None:
    """Point OUT's model at its latest checkpoint (_publish), if it has one and OUT's model is not that already."""
    if not (found := checkpoints(out)):
        return
    weights, config = (out / f for f in MODEL_FILES)
    latest = [found[-1] / f for f in MODEL_FILES]
    try:
        same = (weights.samefile(latest[0]) or filecmp.cmp(weights, latest[0], shallow=False)) and \
            config.read_bytes() == latest[1].read_bytes()
    except OSError:  # one is missing
        same = False
    if not same:
        _publish(out, found[-1])


def _publish(out: Path, final: Path) -> None:
    """Point OUT/model.safetensors and OUT/config.json (what `sample --model OUT` loads) at checkpoint `final`, and
    drop the checkpoints before the last KEEP."""
    weights, config = MODEL_FILES
    try:
        _link_or_copy(final / weights, out / weights)
        atomic_write_text(out / config, (final / config).read_text())
    except UserError as e:  # a full disk after the checkpoint itself was written
        raise UserError(f"{final.name} saved, but {out}'s model not updated to it: {e}; resume (--resume "
                        f"{shell_word(out)}) once {out} can be written again, to update it") from None
    for old in checkpoints(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put src's content at dst atomically, as a hard link when the filesystem allows (no copy)."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _last_line(path: Path) -> str | None:
    """The last line of a file (None if it is empty), read from its end."""
    with open(path, "rb") as f:
        end, size = f.seek(0, os.SEEK_END), 1 << 16
        while True:
            start = max(0, end - size)
            f.seek(start)
            tail = f.read(end - start)
            cut = tail.rfind(b"\n", 0, len(tail) - 1)  # the newline before the last line's
            if cut >= 0 or start == 0:
                return tail[cut + 1:].decode(errors="replace") or None
            size *= 4


class RunLog:
    """log.txt in build-nanogpt's format (`{step} train {loss:.6f}`, `{step} val {loss:.4f}`,
    `{step} hella {acc:.4f}`) plus log.jsonl with every field; both append-only, one line per event."""

    FORMATS = {"train": ".6f", "val": ".4f", "hella": ".4f"}

    def __init__(self, out: Path, start_step: int, enabled: bool):
        (self.txt, self.jsonl), self.enabled = (out / f for f in LOG_FILES), enabled
        self.restart(start_step)

    def restart(self, step: int) -> None:
        """Training goes on from `step`: drop what was logged at it or later. That is what a crashed run logged
        after its last checkpoint (everything, for a fresh run), or in this process the evaluations of a step that
        a stop cut short, which run again. Where nothing was, this reads each file's last line only."""
        if self.enabled:
            self._keep_before(self.txt, step, lambda line: int(line.split()[0]))
            self._keep_before(self.jsonl, step, lambda line: json.loads(line)["step"])

    @staticmethod
    def _keep_before(path: Path, step: int, step_of) -> None:
        """Drop the lines of `path` that are torn or logged at `step` or later. Steps are logged in order, so where
        the last line is intact and before `step` nothing is dropped and the file is left as it is (a long run's
        logs are hundreds of MB: read whole and rewritten at every resume, they took seconds and that memory)."""
        if not path.exists():
            atomic_write_text(path, "")
            return
        if not path.is_file():  # a FIFO's open waited for a writer, forever
            raise UserError(f"{path}: cannot read the run's log (not a regular file)")
        try:
            last = _last_line(path)
            if last is None or RunLog._before(last, step, step_of):
                return
            with open(path, "rb") as src, atomic_path(path) as tmp, open(tmp, "wb") as dst:
                dst.writelines(line for line in src if RunLog._before(line.decode(errors="replace"), step, step_of))
        except OSError as e:
            raise cannot("read", path, e) from None

    @staticmethod
    def _before(line: str, step: int, step_of) -> bool:
        """Whether a log line is intact and logged before `step`; a torn line (what a crash leaves) is dropped."""
        try:
            return line.endswith("\n") and step_of(line) < step
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):
            return False

    def metric(self, step: int, kind: str, value: float, **extra) -> None:
        self.event(step, kind, **{kind if kind == "hella" else "loss": value, **extra})
        self._append(self.txt, f"{step} {kind} {value:{self.FORMATS[kind]}}\n")

    def event(self, step: int, kind: str, **fields) -> None:
        self._append(self.jsonl, json.dumps({"step": step, "kind": kind, **fields}) + "\n")

    def sync(self) -> None:
        """Flush the logs to the disk: a checkpoint written after this cannot outlive the lines before its step
        (a power cut would otherwise keep the checkpoint and lose them, and a resumed run keeps the log as is)."""
        for path in (self.txt, self.jsonl) if self.enabled else ():
            try:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            except FileNotFoundError:  # nothing logged yet
                pass
            except OSError as e:
                raise cannot("write", path, e) from None

    def _append(self, path: Path, line: str) -> None:
        if not self.enabled:
            return
        try:
            with open(path, "a") as f:
                f.write(line)
        except OSError as e:
            raise cannot("write", path, e) from None
