"""Run plots from build-nanogpt-format log.txt files."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_main

from nanogpt_mlx.errors import UserError
from nanogpt_mlx.plot import plot_runs, read_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir: Path, steps: int = 300, hella: bool = True, scale: float = 1.0) -> Path:
    """A log.txt as build-nanogpt's train_gpt2.py writes it, plus a torn last line."""
    run_dir.mkdir(parents=True)
    lines = []
    for s in range(steps):
        loss = 3.0 + 8.0 * math.exp(-s * scale / 40)
        if s % 50 == 0 or s == steps - 1:
            lines.append(f"{s} val {loss + 0.05:.4f}")
            if hella:
                lines.append(f"{s} hella {0.25 + 0.05 * (1 - math.exp(-s / 100)):.4f}")
        lines.append(f"{s} train {loss:.6f}")
    (run_dir / "log.txt").write_text("\n".join(lines) + f"\n{steps} tra")
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_read_log(tmp_path):
    log = read_log(fake_run(tmp_path / "run", steps=120))
    assert log.name == "run" and set(log.series) == {"train", "val", "hella"}
    steps, values = log.series["train"]
    assert list(steps) == list(range(120)) and values[0] == pytest.approx(11.0)
    assert list(log.series["val"][0]) == [0, 50, 100, 119]


def test_resumed_step_keeps_last_value(tmp_path):
    (tmp_path / "log.txt").write_text("0 train 5.0\n1 train 4.0\n1 train 3.5\n2 train 3.0\nnot a line\n")
    steps, values = read_log(tmp_path).series["train"]
    assert list(steps) == [0, 1, 2] and list(values) == [5.0, 3.5, 3.0]


def test_a_resumed_run_appended_to_the_log_replaces_the_steps_it_logs_again(tmp_path):
    """Steps 0-149, then a run resumed at step 100 to 129 (another tool's log, appended to): the plot drew the old
    0-99, the new 100-129 and then the old 130-149. Each kind starts again where its steps go back, a nan too."""
    old = [f"{s} train {10 - s / 100}" for s in range(150)] + ["0 val 11", "100 val 9.5", "149 val 9"]
    new = ["100 val nan"] + [f"{s} train {5 - s / 100}" for s in range(100, 130)]
    (tmp_path / "log.txt").write_text("\n".join(old + new) + "\n")
    log = read_log(tmp_path)
    steps, values = log.series["train"]
    assert list(steps) == list(range(130)) and values[99] == 9.01 and values[100] == 4.0 and values[-1] == 3.71
    assert list(log.series["val"][0]) == [0]


def test_a_diverged_runs_nan_and_inf_are_left_out(tmp_path):
    """The trainer logs a val loss before the step whose loss is nan stops it: the plot draws the rest."""
    (tmp_path / "log.txt").write_text("0 val 10.9\n0 train 10.8\n1 val nan\n1 train inf\n")
    log = read_log(tmp_path)
    assert {k: list(v[0]) for k, v in log.series.items()} == {"train": [0], "val": [0]}
    assert png_size(plot_runs([tmp_path], tmp_path / "p.png"))[0] > 0


def test_plot_several_runs(tmp_path):
    a = fake_run(tmp_path / "a")
    b = fake_run(tmp_path / "b", steps=200, scale=1.5)
    out = plot_runs([a, b], tmp_path / "plots" / "cmp.png", log_scale=True)
    width, height = png_size(out)
    assert width > height > 300  # two panels side by side
    assert [p.name for p in out.parent.iterdir()] == ["cmp.png"]  # written atomically, no temp file left


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures plot_runs writes, kept as they are saved."""
    import matplotlib.figure

    figures, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **kw: figures.append(self) or savefig(self, *a, **kw))
    return figures


def curves(ax) -> dict[str, list[float]]:
    """An axes' drawn lines by label, each as its y values (the reference lines are axhlines: two points)."""
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


@pytest.mark.parametrize("log_scale", [False, True])
def test_each_run_is_drawn_and_log_scale_sets_the_loss_axis(tmp_path, drawn, capsys, log_scale):
    """The tests looked at the image's size alone: a plot of the first run only, or one that ignored --log-scale,
    passed."""
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", steps=200, scale=1.5)
    proc = run_main(capsys, "plot", str(a), str(b), "--out", str(tmp_path / "cmp.png"), *["--log-scale"] * log_scale)
    assert proc.returncode == 0, proc.stderr
    loss, hella = drawn[-1].axes
    assert loss.get_yscale() == ("log" if log_scale else "linear") and hella.get_yscale() == "linear"
    lines = curves(loss)
    for run in (a, b):
        log = read_log(run)
        for split in ("train", "val"):
            assert lines[f"{run.name} {split}"] == pytest.approx(list(log.series[split][1]))
        assert curves(hella)[run.name] == pytest.approx(list(log.series["hella"][1]))


def test_one_run_may_be_named_alone(tmp_path):
    """A path where a list is expected was iterated character by character ('/log.txt: no such log file')."""
    run = fake_run(tmp_path / "a")
    assert plot_runs(str(run), tmp_path / "one.png").is_file()
    with pytest.raises(UserError, match="no runs to plot"):
        plot_runs([], tmp_path / "none.png")


@pytest.mark.parametrize("kwargs, needle", [
    ({"runs": 3}, "runs must be a path or a list of paths, got 3"),
    ({"runs": [None]}, "runs must be a path or a list of paths, got [None]"),
    ({"out": 3}, "out must be a path, got 3"),
    ({"log_scale": "no"}, "log_scale must be True or False, got 'no'"),
])
def test_plot_runs_refuses_arguments_of_other_types(kwargs, needle, tmp_path):
    """An int, None or "no" was a TypeError from deep inside (or, for log_scale, a log scale)."""
    args = {"runs": [fake_run(tmp_path / "a")], "out": tmp_path / "p.png", **kwargs}
    with pytest.raises(UserError, match=re.escape(needle)):
        plot_runs(**args)
    assert not (tmp_path / "p.png").exists()


def test_runs_and_out_under_home_are_expanded(tmp_path, monkeypatch):
    """`~/a` was read as ./~/a (no such log file), and an image to `~/plots/p.png` was written under ./~."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "home" / "a")
    out = plot_runs("~/a", "~/plots/p.png")
    assert out == tmp_path / "home" / "plots" / "p.png" and png_size(out)[0] > 0
    assert read_log("~/a").name == "a" and not (tmp_path / "~").exists()


def test_plot_without_hellaswag_has_one_panel(tmp_path):
    out = plot_runs([fake_run(tmp_path / "a", hella=False)], tmp_path / "one.png", baseline="off")
    width, height = png_size(out)
    assert width < 1.6 * height


def test_bad_logs(tmp_path):
    with pytest.raises(UserError, match="no such log file"):
        read_log(tmp_path / "missing")
    (tmp_path / "log.txt").write_text("hello\n")
    with pytest.raises(UserError, match=re.escape("no `STEP train|val|hella VALUE` lines")):
        read_log(tmp_path)
    with pytest.raises(UserError, match="unknown image type '.txt'"):
        plot_runs([fake_run(tmp_path / "ok")], tmp_path / "x.txt")
    if shutil.which("xelatex") is None:  # matplotlib writes .pgf through LaTeX
        with pytest.raises(UserError, match=r"x.pgf: cannot draw a .pgf image \('xelatex' not found"):
            plot_runs([tmp_path / "ok"], tmp_path / "x.pgf")
        assert not (tmp_path / "x.pgf").exists()


def test_a_log_of_nan_alone_says_so(tmp_path):
    """A run that diverged from its first step was reported as having no `STEP train|val|hella VALUE` lines."""
    (tmp_path / "log.txt").write_text("0 train nan\n0 val nan\n1 train inf\n")
    with pytest.raises(UserError, match="log.txt: every train, val and hella value is nan or inf"):
        read_log(tmp_path)


def test_an_empty_run_path_is_refused(tmp_path, monkeypatch, capsys):
    """'' (an unset variable) was the working directory: its log.txt was plotted."""
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    needle = "the run to plot is '' (an unset variable?); name a run directory or log file"
    with pytest.raises(UserError, match="^" + re.escape(needle) + "$"):
        read_log("")
    assert_one_line_error(run_main(capsys, "plot", "", "--out", str(tmp_path / "x.png")), needle)
    assert not (tmp_path / "x.png").exists()


def test_a_path_that_is_not_a_file_is_not_a_log(tmp_path):
    """/dev/null exists: it was reported as "no such log file"."""
    with pytest.raises(UserError, match="^/dev/null: not a log file or a run directory$"):
        read_log("/dev/null")


def test_hellaswag_alone_is_drawn(tmp_path, monkeypatch):
    """A log of hella lines alone was refused ("no train or val loss lines"): its panel is drawn, alone."""
    import matplotlib.axes

    titles = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set", lambda self, **kw: titles.append(kw.get("title")))
    (tmp_path / "log.txt").write_text("0 hella 0.25\n100 hella 0.26\n")
    width, height = png_size(plot_runs([tmp_path], tmp_path / "x.png", log_scale=True, baseline="on"))
    assert titles == ["HellaSwag eval"] and width < 1.6 * height


@pytest.mark.parametrize("out, needle", [
    ("", "the image to write is '' (an unset variable?); name an image file"),
    (".", ".: is a directory (the image to write is a file)"),
])
def test_out_must_name_a_file(out, needle, tmp_path, monkeypatch):
    """'' and a directory were "unknown image type ''"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="^" + re.escape(needle) + "$"):
        plot_runs([fake_run(tmp_path / "a")], out)


def test_cli_plot(tmp_path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "run.png"
    proc = run_cli("plot", str(run), "--out", str(out), "--log-scale", check=True)
    assert str(out) in proc.stdout and png_size(out)[0] > 0
    assert_one_line_error(run_cli("plot", str(tmp_path / "nope")), "no such log file")
    # matplotlib logged a line of its own: "The PostScript backend does not support transparency; ..."
    proc = run_cli("plot", str(run), "--out", str(tmp_path / "run.eps"), check=True)
    assert proc.stderr == "" and proc.stdout == f"wrote {tmp_path / 'run.eps'}\n"


def test_a_cache_matplotlib_cannot_write_leaves_no_lines_of_its_own(tmp_path):
    """A read-only or full XDG_CACHE_HOME: matplotlib said "mkdir -p failed for path ..." and "Matplotlib created a
    temporary cache directory ...; it is highly recommended to set the MPLCONFIGDIR" (here a file is in the way)."""
    (tmp_path / "cache").write_text("")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "MPLCONFIGDIR": str(tmp_path / "cache" / "matplotlib")}
    out = tmp_path / "run.png"
    proc = run_cli("plot", str(fake_run(tmp_path / "run")), "--out", str(out), env=env, check=True)
    assert proc.stderr == "" and png_size(out)[0] > 0


def test_baseline_auto_follows_loss_range(tmp_path, monkeypatch):
    drawn = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y, **kw: drawn.append(y) or None)
    plot_runs([fake_run(tmp_path / "near")], tmp_path / "near.png")  # losses 3..11 reach 3.2924
    assert 3.2924 in drawn
    drawn.clear()
    high = tmp_path / "high"
    high.mkdir()
    (high / "log.txt").write_text("".join(f"{s} train {8 - s / 100:.4f}\n" for s in range(100)))
    plot_runs([high], tmp_path / "high.png")
    assert drawn == []
    plot_runs([high], tmp_path / "high.png", baseline="on")
    assert drawn == [3.2924]


@pytest.fixture
def ylims(monkeypatch) -> list[tuple]:
    """The y limits that the plots set from here on (matplotlib sets its own too: those of another length)."""
    import matplotlib.axes

    limits, set_ylim = [], matplotlib.axes.Axes.set_ylim
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim",
                        lambda self, *lim, **kw: limits.append(lim) or set_ylim(self, *lim, **kw))
    return limits


def test_the_loss_axis_leaves_out_the_first_steps_highest_2_percent(tmp_path, ylims):
    """11 and 9 at the first two of 100 steps would squash the curve below them: the axis tops at the train
    losses' 98% quantile (+5%) and starts 5% below the lowest loss."""
    train = [11.0, 9.0, *np.linspace(4.0, 3.0, 98)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.txt").write_text("".join(f"{s} train {v:.6f}\n" for s, v in enumerate(train)))
    plot_runs([run], tmp_path / "run.png", baseline="off")
    want = (3.0 * 0.95, np.quantile(train, 0.98) * 1.05)
    assert want in [pytest.approx(lim, rel=1e-5) for lim in ylims if len(lim) == 2]


def test_a_val_loss_that_rises_stays_on_the_axis(tmp_path, ylims):
    """A fine-tune that overfits: train falls to 0.8 while val rises to 5.8 after its first points; the axis
    (the train losses' 98% quantile) cut off two thirds of the val curve. The first val point may run off."""
    run = tmp_path / "finetune"
    run.mkdir()
    lines = [f"{s} train {4.5 - 3.7 * s / 299:.6f}" for s in range(300)]
    lines += [f"{s} val {v:.4f}" for s, v in ((0, 10.9), (100, 3.3), (200, 4.6), (299, 5.8))]
    (run / "log.txt").write_text("\n".join(lines) + "\n")
    plot_runs([run], tmp_path / "run.png", baseline="off")
    top = [lim for lim in ylims if len(lim) == 2][0][1]
    assert top == pytest.approx(5.8 * 1.05)


def test_a_run_of_val_points_alone_keeps_its_first_on_the_axis(tmp_path, ylims):
    """Beside a run with train points, every run's first val point was left off the axis: a run whose log holds
    only `0 val 10.9` drew nothing."""
    one = tmp_path / "one"
    one.mkdir()
    (one / "log.txt").write_text("0 val 10.9\n")
    plot_runs([fake_run(tmp_path / "a", hella=False), one], tmp_path / "m.png", baseline="off")
    assert [lim for lim in ylims if len(lim) == 2][0][1] == pytest.approx(10.9 * 1.05)


@pytest.mark.parametrize("lines, log_scale, want, note", [
    ("0 train 0.000000\n1 train 0.000000\n1 val 0.000000\n", False, (-0.05, 0.05), ""),
    ("0 train 0.000000\n1 train 0.000000\n1 val 0.000000\n", True, (-0.05, 0.05), "the loss axis is linear"),
    ("0 train 2.5\n1 train 0.000000\n2 train 0.000000\n2 val 0.000000\n", True, (2.5 * 0.95, 2.5 * 1.05), ""),
])
def test_losses_of_0_are_drawn_without_matplotlib_warnings(lines, log_scale, want, note, tmp_path, ylims, capsys):
    """An overfit fine-tune logs 0.000000: the limits 0 * 0.95 and 0 * 1.05 were identical (matplotlib's UserWarning,
    with its source path), and on a log scale not positive (another)."""
    import warnings

    (tmp_path / "log.txt").write_text(lines)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = plot_runs([tmp_path], tmp_path / "zero.png", log_scale=log_scale, baseline="off")
    assert png_size(out)[0] > 0
    assert [str(w.message) for w in caught] == []
    err = capsys.readouterr().err
    assert (note in err and err.count("\n") == 1) if note else err == ""
    assert [lim for lim in ylims if len(lim) == 2][0] == pytest.approx(want)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # matplotlib's own autoscale's
def test_a_loss_near_the_largest_float_keeps_the_axis_drawable(tmp_path, ylims):
    """A damaged log's 1.7e308: its 5% margin overflowed to inf, matplotlib's OverflowError a traceback."""
    (tmp_path / "log.txt").write_text("0 train 10\n1 train 1.7e308\n2 train 5\n3 val 1.79e308\n")
    assert png_size(plot_runs([tmp_path], tmp_path / "far.png", baseline="off"))[0] > 0
    assert [lim for lim in ylims if len(lim) == 2][0] == pytest.approx((4.75, 1.05e100))
    (tmp_path / "log.txt").write_text("0 train 1e200\n1 train 2e200\n2 train 3e200\n")  # limits were upside down
    plot_runs([tmp_path], tmp_path / "far.png", baseline="off")
    assert [lim for lim in ylims if len(lim) == 2][-1] == pytest.approx((0.95e100, 1.05e100))


def test_a_torn_last_line_is_not_read_as_a_number(tmp_path):
    """A log cut amid its last line (being written, a kill): "3 train 1" of "3 train 10.72" was drawn as 1."""
    (tmp_path / "log.txt").write_text("0 train 10.79\n1 train 10.76\n2 train 10.74\n3 train 1")
    steps, values = read_log(tmp_path).series["train"]
    assert list(steps) == [0, 1, 2] and list(values) == [10.79, 10.76, 10.74]


@pytest.mark.parametrize("suffix", [".pdf", ".jpg"])
def test_a_full_disk_midway_through_an_image_is_one_line(suffix, tmp_path, monkeypatch):
    """matplotlib's PDF writer failed on its own cleanup after the disk's error (a 54-line traceback); Pillow's JPEG
    writer left a cut-short file and the plot said it was written."""
    import pathlib

    out = tmp_path / f"loss{suffix}"
    out.write_bytes(b"an earlier plot")
    write_bytes = pathlib.Path.write_bytes

    def full_disk(path, data):
        write_bytes(path, data[:4096])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(UserError, match=f"loss{suffix}: cannot write .*No space left on device"):
        plot_runs([fake_run(tmp_path / "a")], out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", f"loss{suffix}"]  # no temporary file left
    assert out.read_bytes() == b"an earlier plot"
    for kind in (".pdf", ".jpg", ".svg", ".eps"):  # every writer draws into memory
        assert plot_runs([tmp_path / "a"], tmp_path / f"ok{kind}").stat().st_size > 1000


def test_an_image_named_through_a_link_takes_the_links_type(tmp_path):
    """`--out latest.png`, a link to a file without a suffix, was refused as an image of type '' (the link's target's),
    once an output named through a link wrote the file it names."""
    (tmp_path / "latest.png").symlink_to("plot-v1")
    out = plot_runs([fake_run(tmp_path / "a")], tmp_path / "latest.png")
    assert out == tmp_path / "plot-v1" and (tmp_path / "latest.png").is_symlink() and png_size(out)[0] > 0
