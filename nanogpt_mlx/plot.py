"""Plots of training runs from their log.txt, like build-nanogpt's play.ipynb: loss and HellaSwag vs step.

log.txt lines are `{step} {kind} {value}`, kind one of train / val / hella (other kinds are ignored).
Uses matplotlib's object API with the Agg canvas, so it works headless and leaves pyplot alone.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import RunLog
from .console import quiet, warn
from .errors import UserError, check_bool, first_line
from .evaluate import GPT2_HELLASWAG_TRAINING, GPT3_HELLASWAG
from .files import as_paths, atomic_path, named_dir, output_file, user_path

GPT2_VAL_LOSS = 3.2924  # OpenAI GPT-2 124M on the FineWeb-Edu val shard (build-nanogpt)
KINDS = tuple(RunLog.FORMATS)  # what the trainer logs: train, val, hella


@dataclass
class RunSeries:
    name: str
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # kind -> (steps, values)


def read_log(run: str | os.PathLike) -> RunSeries:
    """Parse a run directory's log.txt (or a log file; a leading `~` is expanded). Lines that do not parse are
    skipped, and so is a last line without its newline, so a log being written can be plotted, and so are nan and
    inf values. A kind's step at or before its last one starts it again (a run resumed from an earlier step, its
    lines appended to the log): the kind's points from that step on are dropped for the new ones."""
    path = user_path(named_dir(run, "run to plot", "a run directory or log file"))  # '' plotted ./log.txt
    if path.is_dir():
        path = path / "log.txt"
    if not path.exists():
        raise UserError(f"{path}: no such log file")
    if not path.is_file():  # /dev/null, a fifo: nothing a run writes
        raise UserError(f"{path}: not a log file or a run directory")
    points: dict[str, dict[int, float]] = {k: {} for k in KINDS}
    parsed = False
    text = path.read_text(errors="replace")
    # a last line without its newline is being written (or was cut by a kill): "119 train 8" of "8.3617"
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[1] not in points:
            continue
        try:
            step, value = int(parts[0]), float(parts[2])
        except ValueError:
            continue
        parsed = True
        kept = points[parts[1]]
        if kept and step <= next(reversed(kept)):  # so each kind's steps stay in order, the last one its greatest
            for dropped in [s for s in kept if s >= step]:
                del kept[dropped]
        if math.isfinite(value):  # a diverged run logs nan or inf, which has no place on an axis
            kept[step] = value
    series = {k: (np.array(list(d)), np.array(list(d.values()))) for k, d in points.items() if d}
    if not series:
        raise UserError(f"{path}: every train, val and hella value is nan or inf (a run that diverged at once?)"
                        if parsed else f"{path}: no `STEP train|val|hella VALUE` lines")
    name = path.parent.name if path.name == "log.txt" else path.stem
    return RunSeries(name or str(path), series)


def _loss_limits(logs: Sequence[RunSeries], log_scale: bool = False,
                 baseline: float | None = None) -> tuple[float, float] | None:
    """A loss range that shows 98% of the train points and every val point but the first of each run with train
    points: the first steps' ~11 would otherwise squash the part of the curve that matters (the train line shows
    where it starts), and a val loss that rises later (a fine-tune that overfits) stays in view. A run of val
    points alone keeps its first (it may be its only one). `baseline`, a line drawn too, is kept in view. On a log
    scale the range starts at the smallest loss above 0; None where no loss (nor baseline) is above 0."""
    train = [l.series["train"][1] for l in logs if "train" in l.series]
    val = [l.series["val"][1] for l in logs if "val" in l.series]
    values = np.concatenate(train + val + [np.array([] if baseline is None else [baseline])])
    shown_val = [l.series["val"][1][1 if "train" in l.series else 0:] for l in logs if "val" in l.series]
    top = max(np.quantile(np.concatenate(train), 0.98) if train else -np.inf,
              np.concatenate(shown_val + [np.zeros(0)]).max(initial=-np.inf),
              -np.inf if baseline is None else baseline)
    if log_scale:  # 0 (an overfit fine-tune logs 0.000000) has no place on a log axis: matplotlib warned
        values = values[values > 0]
        if not values.size:
            return None
        top = max(top, values.min())  # (the first steps' losses alone above 0 are above the 98% quantile)
    # within what matplotlib's transforms invert (a damaged log's 1.7e308 overflowed them, and a range of 1e300 is a
    # singular matrix there): a loss beyond 1e100 is off the axis
    bottom, top = min(max(float(values.min()), -1e100), 1e100), min(max(float(top), -1e100), 1e100)
    bottom, top = bottom - 0.05 * abs(bottom), top + 0.05 * abs(top)  # 5% margins
    if top <= bottom:  # every loss 0.0: 5% of it is no margin (matplotlib warned of identical limits)
        bottom, top = bottom - 0.05, top + 0.05
    return bottom, top


def _draw_loss(ax, logs: Sequence[RunSeries], log_scale: bool, baseline: str) -> None:
    """Each run's train (thin) and val (bold) loss vs step, with the GPT-2 124M val loss as `baseline` says."""
    from matplotlib.ticker import FormatStrFormatter

    for i, log in enumerate(logs):
        color = f"C{i % 10}"
        if "train" in log.series:
            alpha = 0.35 if "val" in log.series else 1.0
            ax.plot(*log.series["train"], color=color, lw=1, alpha=alpha, label=f"{log.name} train")
        if "val" in log.series:
            ax.plot(*log.series["val"], color=color, lw=2, marker="o", ms=3, label=f"{log.name} val")
    limits = _loss_limits(logs, log_scale)
    if baseline == "on" or (baseline == "auto" and limits and limits[0] <= GPT2_VAL_LOSS <= limits[1]):
        ax.axhline(GPT2_VAL_LOSS, color="r", ls="--", label=f"OpenAI GPT-2 (124M) val loss {GPT2_VAL_LOSS}")
        limits = _loss_limits(logs, log_scale, GPT2_VAL_LOSS)
    if log_scale and limits is None:  # a log axis would draw none of it (matplotlib warned so)
        warn("no loss above 0 to draw on a log scale: the loss axis is linear", kind="note")
        log_scale, limits = False, _loss_limits(logs)
    if log_scale:
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FormatStrFormatter("%g"))  # 6, 7, 10 rather than 6x10^0
    ax.set_ylim(*limits)
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _draw_hella(ax, logs: Sequence[RunSeries]) -> None:
    """Each run's HellaSwag acc_norm vs step, with GPT-2's and GPT-3's (124M)."""
    for i, log in enumerate(logs):
        if "hella" in log.series:
            ax.plot(*log.series["hella"], color=f"C{i % 10}", lw=2, marker="o", ms=3, label=log.name)
    ax.axhline(GPT2_HELLASWAG_TRAINING, color="r", ls="--", label=f"OpenAI GPT-2 (124M) {GPT2_HELLASWAG_TRAINING}")
    ax.axhline(GPT3_HELLASWAG, color="g", ls="--", label=f"OpenAI GPT-3 (124M) {GPT3_HELLASWAG}")
    ax.set(xlabel="step", ylabel="acc_norm", title="HellaSwag eval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_runs(runs: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike = "run.png",
              log_scale: bool = False, baseline: str = "auto") -> Path:
    """Draw loss (train thin, val bold) and HellaSwag vs step for each run, each panel where some run logged it;
    write `out`.

    baseline: "on", "off" or "auto" (the GPT-2 124M val-loss line, drawn when the loss axis reaches it).
    """
    with quiet("matplotlib"):  # a cache it cannot write (read-only, full): two lines on its own temporary one
        from matplotlib.figure import Figure

    runs = as_paths(runs, "runs")
    if not runs:
        raise UserError("no runs to plot")
    if not isinstance(out, (str, os.PathLike)):
        raise UserError(f"out must be a path, got {out!r}")
    check_bool("log_scale", log_scale)  # "no" drew a log scale
    named = Path(out)  # its suffix is the image's type, also where it is a link (output_file returns its target)
    out = output_file(out, "image to write", "an image file")
    if baseline not in ("auto", "on", "off"):
        raise UserError(f"baseline must be auto, on or off, got {baseline!r}")
    kind = named.suffix.lstrip(".").lower()
    if kind not in Figure().canvas.get_supported_filetypes():
        raise UserError(f"{named}: unknown image type {named.suffix!r}; use .png, .svg or .pdf")
    logs = [read_log(r) for r in runs]
    if len({l.name for l in logs}) < len(logs):  # same basename twice: tell them apart by path
        logs = [RunSeries(str(r), l.series) for r, l in zip(runs, logs)]
    has_loss = any("train" in l.series or "val" in l.series for l in logs)
    has_hella = any("hella" in l.series for l in logs)
    fig = Figure(figsize=(14 if has_loss and has_hella else 8, 5.5), dpi=100)
    axes = fig.subplots(1, has_loss + has_hella, squeeze=False)[0]
    if has_loss:
        _draw_loss(axes[0], logs, log_scale, baseline)
    if has_hella:
        _draw_hella(axes[-1], logs)
    fig.tight_layout()
    # drawn in memory, then written: image writers fail on a full disk in their own ways (a .jpg came out cut
    # short and reported written, a .pdf's cleanup failed on the error), a plain write says so in one line
    image = io.BytesIO()
    try:
        with quiet("matplotlib"):  # what a format cannot draw, e.g. .eps's "does not support transparency"
            fig.savefig(image, format=kind)
    except RuntimeError as e:  # a writer's missing tool, e.g. .pgf's xelatex
        raise UserError(f"{named}: cannot draw a {named.suffix} image ({first_line(e)}); .png, .svg and .pdf need "
                        "nothing more") from None
    with atomic_path(out) as tmp:
        tmp.write_bytes(image.getvalue())
    return out
