"""Writers on disks that refuse: read-only, full, a file where a directory should be. Each is one line on
stderr, a non-zero exit, and nothing half-written left behind."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_main
from test_evaluate import make_hellaswag, write_jsonl
from test_plot import fake_run
from test_prepare import expected_tokens, make_docs, shard_tokens
from test_prepare import write_jsonl as write_docs

from nanogpt_mlx import UserError
from nanogpt_mlx.files import atomic_path, atomic_write_text, check_writable, output_file
from nanogpt_mlx.locks import LOCK_FILE


def listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"" for p in directory.rglob("*")}


def test_atomic_path_storage_errors_are_one_line_and_leave_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(UserError, match=r"a.txt: cannot write \(No space left on device\)"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert listing(tmp_path) == {"a.txt": b"old"}
    with pytest.raises(ConnectionResetError):  # not a storage error: the writer's own business
        with atomic_path(target) as tmp:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    with pytest.raises(UserError, match=r"cannot create directory \(a file of that name is in the way\)"):
        atomic_write_text(target / "b.txt", "x")
    assert listing(tmp_path) == {"a.txt": b"old"}


def test_check_writable_leaves_nothing(tmp_path, read_only):
    check_writable(tmp_path / "new" / "deeper" / "x.jsonl")
    check_writable(tmp_path)
    assert listing(tmp_path) == {}
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="file is not a directory"):
        check_writable(tmp_path / "file" / "x.jsonl")
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    with pytest.raises(UserError, match=r"cannot write \(Read-only file system\)"):
        check_writable(tmp_path / "ro" / "x.jsonl")


@pytest.fixture
def inputs(tmp_path, tiny_hf_dir) -> dict[str, Path]:
    docs = tmp_path / "in" / "docs.jsonl"
    docs.parent.mkdir()
    write_docs(docs, make_docs(20, seed=1))
    return {"model": tiny_hf_dir, "docs": docs, "run": fake_run(tmp_path / "in" / "run"),
            "hellaswag": write_jsonl(tmp_path / "in" / "hellaswag.jsonl", make_hellaswag(4))}


def writer_args(command: str, inputs: dict[str, Path], out: Path) -> list[str]:
    return {
        "export": ["export", str(inputs["model"]), str(out / "hf")],
        "plot": ["plot", str(inputs["run"]), "--out", str(out / "run.png")],
        "prepare": ["prepare", "files", str(inputs["docs"]), "--out", str(out / "data")],
        "prepare-here": ["prepare", "files", str(inputs["docs"]), "--out", str(out)],
        "hellaswag": ["eval", "hellaswag", "--model", str(inputs["model"]), "--data", str(inputs["hellaswag"]),
                      "--output", str(out / "scores.jsonl")],
    }[command]


WRITERS = ["export", "plot", "prepare", "prepare-here", "hellaswag"]


@pytest.mark.parametrize("command", WRITERS)
def test_writers_on_a_read_only_disk(command, inputs, tmp_path, read_only, capsys, monkeypatch):
    from nanogpt_mlx import evaluate

    def never(*args, **kwargs):
        raise AssertionError("scored before finding out that --output cannot be written")

    monkeypatch.setattr(evaluate, "score_hellaswag", never)
    out = tmp_path / "ro"
    out.mkdir()
    read_only(out)
    assert_one_line_error(run_main(capsys, *writer_args(command, inputs, out)), str(out), "Read-only file system")
    assert listing(out) == {}


@pytest.mark.parametrize("command", WRITERS)
def test_writers_where_a_file_is_in_the_way(command, inputs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(run_cli(*writer_args(command, inputs, blocker)), str(blocker))
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("command, name", [("plot", "run.png"), ("hellaswag", "scores.jsonl")])
def test_writers_where_a_named_pipe_is_in_the_way(command, name, inputs, tmp_path, capsys, monkeypatch):
    """The file they write is renamed over what its path names: a named pipe there is refused before the work, not
    replaced by the file."""
    from nanogpt_mlx import evaluate

    def never(*args, **kwargs):
        raise AssertionError("scored before finding out that --output cannot be written")

    monkeypatch.setattr(evaluate, "score_hellaswag", never)
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / name)
    assert_one_line_error(run_main(capsys, *writer_args(command, inputs, out)), f"{out / name}: not a regular file")
    assert stat.S_ISFIFO((out / name).stat().st_mode) and sorted(p.name for p in out.iterdir()) == [name]


def test_prepare_on_a_full_disk_stops_with_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    docs = make_docs(60, seed=2)
    write_docs(tmp_path / "docs.jsonl", docs)
    args = ["prepare", "files", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "data"), "--shard-size", "500",
            "--workers", "1"]
    real_save, saved = np.save, []

    def fill_up(file, arr, *a, **k):  # the third shard finds the disk full half-way, as numpy reports it
        if len(saved) == 2:
            with open(file, "wb") as f:
                f.write(b"\x93NUMPY partial")
            monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(4 << 20, 4 << 20, 0))
            raise OSError("1000 requested and 14 written")  # no errno
        saved.append(file)
        return real_save(file, arr, *a, **k)

    monkeypatch.setattr(np, "save", fill_up)
    assert_one_line_error(run_main(capsys, *args), "data_train_000002.npy", "No space left on device")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        LOCK_FILE, "data_train_000001.npy", "data_val_000000.npy", "manifest.json"]  # no temp file
    monkeypatch.undo()
    assert run_main(capsys, *args).returncode == 0  # space freed: resumes after the last whole shard
    assert np.array_equal(shard_tokens(tmp_path / "data"), expected_tokens(docs))


def test_any_other_os_error_is_still_one_line(tmp_path, capsys, monkeypatch):
    from nanogpt_mlx import plot

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "run.png"))

    monkeypatch.setattr(plot, "plot_runs", broken)
    proc = run_main(capsys, "plot", str(tmp_path))
    assert_one_line_error(proc, f"{tmp_path / 'run.png'}: Input/output error")


HOLD_LOCK = """
import os, sys, time
from pathlib import Path
from nanogpt_mlx.locks import lock_dir
lock_dir(Path(sys.argv[1]), "run")
child = os.fork()  # as prepare's tokenizer pool forks its workers
if child == 0:
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_until_the_first_one_ends(tmp_path):
    """A second prepare (or train) into a directory another process writes is refused, naming it; the lock ends
    with its holder even when killed, and is not kept by the children it forked."""
    import os
    import signal
    import subprocess
    import sys

    from nanogpt_mlx import prepare as prep
    from nanogpt_mlx import sources
    from nanogpt_mlx.locks import lock_dir, unlock_dir

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        docs = write_docs(tmp_path / "a.jsonl", make_docs(5))
        # the holder named, not the refused (a training run's OUT was said to be "written by another prepare")
        with pytest.raises(UserError, match=f"{out} is being written by another run \\(pid {holder.pid}\\)"):
            prep.prepare(sources.local_files([docs]), out, prep.PrepareConfig(workers=1, progress=False))
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock_dir(out, "prepare")  # the forked child still lives, without the lock
        unlock_dir(out)
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_cache_dir_follows_xdg_but_not_a_relative_one_and_says_when_there_is_no_home(monkeypatch, tmp_path):
    from nanogpt_mlx.files import cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "nanogpt-mlx"
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")  # relative: the XDG spec says to ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "nanogpt-mlx"

    def no_home(self):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "expanduser", no_home)
    with pytest.raises(UserError, match="no home directory to keep the cache in: set XDG_CACHE_HOME"):
        cache_dir()


def test_a_full_disk_at_the_lock_names_the_file(tmp_path, monkeypatch):
    """The lock file's note of its holder, on a full disk: the line was only "No space left on device"."""
    import io

    from nanogpt_mlx import locks

    class Full(io.StringIO):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):  # as a real file's: it flushes what is buffered first, and fails again
            super().close()
            self.flush()

    real_open = open
    monkeypatch.setattr(locks, "open", lambda path, mode: Full() if str(path).endswith(LOCK_FILE)
                        else real_open(path, mode), raising=False)
    monkeypatch.setattr(locks.fcntl, "lockf", lambda f, how: None)
    with pytest.raises(UserError, match=f"{tmp_path / LOCK_FILE}: cannot write \\(No space left on device\\)"):
        locks.lock_dir(tmp_path, "run")
    assert tmp_path.resolve() not in locks._locked


def test_names_near_the_file_systems_limit_are_written(tmp_path):
    """A temporary beside a 250-byte name took the marks past 255 bytes: "File name too long"."""
    from nanogpt_mlx.files import atomic_dir

    name = "é" * 120 + ".png"  # 244 bytes
    with atomic_path(tmp_path / name) as tmp:
        tmp.write_bytes(b"image")
    with atomic_dir(tmp_path / ("d" * 250)) as tmp:
        (tmp / "f").write_text("file")
    long_suffix = "x." + "s" * 245  # the "suffix" is the bulk of the name
    with atomic_path(tmp_path / long_suffix) as tmp:
        tmp.write_bytes(b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d" * 250, name, long_suffix])


def test_what_a_killed_writer_left_goes_with_the_next_write_there(tmp_path):
    """A kill -9 of `export` (its staging directory inside OUT, or the new OUT's temporary beside it) or of a
    download left a model's worth of hidden files that nothing removed. A live writer's temporaries stay, and so do
    names that only look alike."""
    import os
    import subprocess
    import sys

    from nanogpt_mlx.files import HOST_TAG, STAGING, atomic_dir, atomic_files

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # a writer that ended, a live one (pytest's parent), and one that looks dead here but ran on another host (or
    # container) sharing the disk: its temporaries were deleted under it
    ended = done.stdout.strip()
    dead, live, other = f"{HOST_TAG}-{ended}", f"{HOST_TAG}-{os.getppid()}", f"0123abcd-{ended}"
    out = tmp_path / "export"
    out.mkdir()
    left = {tmp_path: [f".hf.tmp{dead}-0a1b2c3d", f".data.tmp{dead}.json"], out: [f"{STAGING}{dead}-ab_cd12z"]}
    kept = {tmp_path: [f".hf.tmp{live}-0a1b2c3d", f".data.tmp{live}.json", f".data.tmp{dead}.json.bak",
                       f".hf.tmp{dead}-0a1b2c3d-x", f".data.tmp{other}.json"],
            out: [f"{STAGING}{live}-ab_cd12z", f"{STAGING}abc", f"{STAGING}{other}-ab_cd12z"]}
    for where, names in [*left.items(), *kept.items()]:
        for name in names:
            (where / name).mkdir() if "json" not in name else (where / name).write_text("half")
    with atomic_dir(tmp_path / "hf") as tmp:
        (tmp / "f").write_text("file")
    with atomic_path(tmp_path / "data.json") as tmp:
        tmp.write_text("{}")
    with atomic_files(out, ["config.json"]) as staging:
        (staging / "config.json").write_text("{}")
    for where in (tmp_path, out):
        assert not any((where / n).exists() for n in left[where]), sorted(os.listdir(where))
        assert all((where / n).exists() for n in kept[where]), sorted(os.listdir(where))


def test_the_write_check_probes_the_directory_that_will_be_written(tmp_path, monkeypatch):
    """An existing directory is probed inside (it may be a writable mount in a read-only parent); a path that does
    not exist yet, in the nearest directory that does."""
    probed = []
    touch = Path.touch
    monkeypatch.setattr(Path, "touch", lambda self, *a, **kw: probed.append(self.parent) or touch(self, *a, **kw))
    (tmp_path / "out").mkdir()
    check_writable(tmp_path / "out")
    check_writable(tmp_path / "new" / "deeper" / "file.json")
    assert probed == [tmp_path / "out", tmp_path] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_set_of_files_written_in_part_is_not_published(tmp_path):
    """atomic_files publishes all of `names` or nothing: one file missing from the staging directory (another
    process took it) leaves the directory as it was."""
    from nanogpt_mlx.files import atomic_files

    (tmp_path / "a.json").write_text("old a")
    with pytest.raises(UserError, match="the files changed while they were written"):
        with atomic_files(tmp_path, ["a.json", "b.json"]) as staging:
            (staging / "a.json").write_text("new a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"] and (tmp_path / "a.json").read_text() == "old a"


def test_a_directory_in_the_way_of_a_set_of_files_is_found_before_any_is_published(tmp_path):
    """A directory under one of the names failed its rename after the files before it were replaced (an export
    --force over a vocab.json/ left new weights beside the old tokenizer), and the message named the directory."""
    from nanogpt_mlx.files import atomic_files

    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b.json").mkdir()
    in_the_way = re.escape(f"{tmp_path}/b.json: cannot write (a directory of that name is in the way)")
    with pytest.raises(UserError, match=f"^{in_the_way}$"):
        with atomic_files(tmp_path, ["a.json", "b.json"]) as staging:
            for name in ("a.json", "b.json"):
                (staging / name).write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    assert (tmp_path / "a.json").read_text() == "old a" and (tmp_path / "b.json").is_dir()


def test_stale_temporaries_under_a_lock_go_and_the_users_files_stay(tmp_path):
    """remove_stale_temps (a run's or prepare's OUT, under its lock) deleted any `.*.tmp*`, a `.notes.tmp.txt` too,
    and then any `.NAME.tmpDIGITS...`: a user's `.draft.tmp42.md` or `.notes.tmp2024.txt`. It takes the names that
    atomic_path, atomic_dir and atomic_files give, with their writer's mark, and no other."""
    from nanogpt_mlx.files import atomic_dir, atomic_files, atomic_path, remove_stale_temps

    written = []  # the writers' own names, as a kill -9 in their bodies leaves them
    for writer in (atomic_path(tmp_path / "model.safetensors"), atomic_path(tmp_path / "manifest"),
                   atomic_dir(tmp_path / "ckpt-000002"), atomic_files(tmp_path, ["config.json"])):
        with pytest.raises(KeyboardInterrupt), writer as tmp:
            written.append(tmp.name)
            raise KeyboardInterrupt
    stale = [*written, ".x.tmp0123abcd-7.npy", ".ckpt-000001.tmp0123abcd-99-0a1b2c3d"]
    mine = [".notes.tmp.txt", ".tmp", "a.tmp1", ".draft.tmp42.md", ".notes.tmp2024.txt",
            ".a.tmp0123abcd-7.tar.gz", ".b.tmp0123abcd-7-short"]
    for name in stale + mine:
        (tmp_path / name).write_text("x")
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mine)


NO_USER = "~no-such-user-of-nanogpt-mlx"


def test_a_path_of_a_user_that_does_not_exist_is_one_line(tiny_hf_dir, tmp_path, monkeypatch):
    """`sample --model '~nouser/x'`, `export` from or to such a path, prepare's and the sources' paths:
    Path.expanduser's RuntimeError ("Could not determine home directory.") was a traceback."""
    from nanogpt_mlx import shards, sources
    from nanogpt_mlx.files import user_path
    from nanogpt_mlx.export import check_export_target, export_hf
    from nanogpt_mlx.weights import load_model

    assert_one_line_error(run_cli("sample", "--model", f"{NO_USER}/x"), f"{NO_USER}/x: no such user")
    model = load_model(tiny_hf_dir)
    (tmp_path / "o").mkdir()  # (a new target is not compared with the source)
    for call in (lambda: load_model(f"{NO_USER}/x"), lambda: export_hf(model, f"{NO_USER}/o"),
                 lambda: check_export_target(tmp_path / "o", source=f"{NO_USER}/x"),
                 lambda: shards.describe(f"{NO_USER}/x"), lambda: sources.shakespeare(path=f"{NO_USER}/x"),
                 lambda: sources.fineweb_edu(local_dir=f"{NO_USER}/x")):
        with pytest.raises(UserError, match=f"^{NO_USER}/[xo]: no such user$"):
            call()

    def no_home(self):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "expanduser", no_home)
    with pytest.raises(UserError, match="^~/x: no home directory to expand ~ in"):
        user_path("~/x")


def test_an_output_through_a_link_replaces_the_file_it_names_and_keeps_the_link(tmp_path, monkeypatch):
    """`--output link` replaced the link with a file (as root, `--output /dev/stdout` made the machine's /dev/stdout a
    file) and left the linked file as it was; this process's own stdout, named through a link, is refused."""
    from nanogpt_mlx.evaluate import write_records

    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "real.jsonl").write_text("old\n")
    os.symlink("results/real.jsonl", "link.jsonl")
    os.symlink("results/new.jsonl", "dangling.jsonl")
    write_records("link.jsonl", [])
    write_records("dangling.jsonl", [])
    assert os.readlink("link.jsonl") == "results/real.jsonl" and os.readlink("dangling.jsonl") == "results/new.jsonl"
    assert (tmp_path / "results" / "real.jsonl").read_text() == "" == (tmp_path / "results" / "new.jsonl").read_text()
    with open("stdout.txt", "w") as f:
        os.symlink("stdout.txt", "out-link")
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with pytest.raises(UserError, match="is this process's standard output"):
                output_file("out-link", "records file")
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def test_progress_bars_show_in_a_jupyter_kernel(monkeypatch, tmp_path, capsys):
    """A kernel's stderr is no terminal, and tqdm's own test (disable=None) turned every bar off in a notebook."""
    from nanogpt_mlx.console import bar_off
    from nanogpt_mlx.evaluate import eval_loss
    from nanogpt_mlx.model import GPT, GPTConfig

    assert bar_off(False) is True and bar_off(True) is None
    np.save(tmp_path / "t_val_000000.npy", np.arange(200, dtype=np.uint16) % 64)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    eval_loss(model, tmp_path, batches=2, B=2, T=8, progress=True)
    assert "loss: 100%" not in capsys.readouterr().err  # (pytest's stderr is no terminal either)
    monkeypatch.setitem(sys.modules, "ipykernel", object())
    assert bar_off(True) is False and bar_off(False) is True
    eval_loss(model, tmp_path, batches=2, B=2, T=8, progress=True)
    assert "loss: 100%" in capsys.readouterr().err
