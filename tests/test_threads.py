"""Step threads (threads.py): a micro-batch's rows split over threads, each on an MLX stream of its own; and MLX's
own stream thread at exit, on every profile (device.setup)."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_one_line_error, paired_params, run_cli
from test_train import logged, tiny_config, token_stream, write_shards

from nanogpt_mlx import cpu, device
from nanogpt_mlx.errors import UserError
from nanogpt_mlx.threads import StepThreads, replica
from nanogpt_mlx.train import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), [token_stream(6000, 1)], token_stream(2000, 3))


def train_losses(data: Path, out: Path, **kw) -> tuple[Trainer, list[float]]:
    trainer = Trainer(tiny_config(data, out, max_steps=4, **kw))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return trainer, [r["loss"] for r in logged(out)]


def test_threads_train_as_one_thread_does_and_repeat_exactly(data, tmp_path):
    """Two threads of 2 rows each: the losses of one thread of 4 rows (the gradients' sums differ in rounding
    only), and the same numbers again in a second run (their parts are added in a fixed order)."""
    one, one_losses = train_losses(data, tmp_path / "one", threads=1, total_batch_size=512)
    two, two_losses = train_losses(data, tmp_path / "two", threads=2, total_batch_size=512)
    _, again = train_losses(data, tmp_path / "again", threads=2, total_batch_size=512)
    assert (one.threads, two.threads) == (1, 2)
    np.testing.assert_allclose(two_losses, one_losses, rtol=2e-5)
    assert two_losses == again
    for name, a, b in paired_params(one.model, two.model):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-3, atol=2e-5, err_msg=name)


def test_the_devices_choice_divides_the_batch(data, tmp_path, monkeypatch):
    monkeypatch.setattr(device, "step_threads", lambda n_embd: 4)
    assert Trainer(tiny_config(data, tmp_path / "a", batch_size=2, total_batch_size=128)).threads == 2
    assert Trainer(tiny_config(data, tmp_path / "b", batch_size=3, total_batch_size=96)).threads == 1
    assert Trainer(tiny_config(data, tmp_path / "c", batch_size=8, total_batch_size=512)).threads == 4


def test_the_cpu_threads_narrow_models_only():
    if not device.PROFILE.cpu_backend:
        pytest.skip("a CPU profile's choice")
    assert device.step_threads(device.WIDEST_THREADED) == cpu.blas_threads()
    assert device.step_threads(device.WIDEST_THREADED + 1) == 1


def test_gpu_profiles_use_one_thread(monkeypatch):
    for name in ("cuda", "metal"):
        monkeypatch.setattr(device, "PROFILE", device.PROFILES[name])
        assert device.step_threads(64) == 1


def test_threads_that_do_not_divide_the_batch_are_refused(data, tmp_path):
    with pytest.raises(UserError, match="threads 3 must divide batch_size 4"):
        Trainer(tiny_config(data, tmp_path / "out", threads=3))
    proc = run_cli("train", "--data", str(data), "--out", str(tmp_path / "cli"), "--n-layer", "1", "--n-head", "2",
                   "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--seq-len", "32",
                   "--total-batch-size", "128", "--max-steps", "1", "--threads", "3")
    assert_one_line_error(proc, "threads 3 must divide batch_size 4")


# ------------------------------------------------------------------------------ StepThreads itself
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = mx.arange(6, dtype=mx.float32).reshape(2, 3)


def grad_part(model: Tiny, x: mx.array, y: mx.array):
    return mx.grad(lambda w, x, y: ((x @ w.T - y) ** 2).sum())(model.w, x, y)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_each_thread_computes_its_rows_with_the_models_current_weights(compile):
    model = Tiny()
    x = mx.random.normal((4, 3), key=mx.random.key(0))
    y = mx.random.normal((4, 2), key=mx.random.key(1))
    threads = StepThreads(model, 2, grad_part, compile)
    for scale in (1.0, -2.0):  # the weights as they are at each call
        model.w = mx.arange(6, dtype=mx.float32).reshape(2, 3) * scale
        got = threads(x, y)
        want = [grad_part(model, x[i:i + 2], y[i:i + 2]) for i in (0, 2)]
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-6)


def test_a_threads_error_reaches_the_caller_and_the_threads_go_on():
    def part(model, x, y):
        if x.shape[1] == 1:
            raise ValueError("no single columns")
        return x.sum()

    threads = StepThreads(Tiny(), 2, part, compile=False)
    with pytest.raises(ValueError, match="no single columns"):
        threads(mx.ones((2, 1)), mx.ones((2, 1)))
    assert [a.item() for a in threads(mx.ones((4, 2)), mx.ones((4, 2)))] == [4.0, 4.0]


def test_gemms_run_on_one_blas_thread_each_while_threads_compute():
    seen = []

    def part(model, x, y):
        seen.append(cpu.blas_threads())
        return x.sum()

    before = cpu.blas_threads()
    StepThreads(Tiny(), 2, part, compile=False)(mx.ones((2, 2)), mx.ones((2, 2)))
    assert seen == [1, 1] or not device.PROFILE.cpu_backend
    assert cpu.blas_threads() == before


def test_a_replica_shares_the_weights_and_nothing_else():
    model = Tiny()
    copy = replica(model)
    assert copy.w is model.w
    copy.w = mx.zeros((2, 3))
    assert model.w.sum().item() == 15


def test_threads_end_with_their_owner():
    """These threads: a Trainer of an earlier test (its step threads of the same names) may still await collection."""
    before = set(threading.enumerate())
    threads = StepThreads(Tiny(), 2, grad_part)
    threads(mx.ones((2, 3)), mx.ones((2, 2)))
    mine = set(threading.enumerate()) - before
    assert {t.name for t in mine} == {"nanogpt-mlx-step-0", "nanogpt-mlx-step-1"}
    del threads
    gc.collect()
    assert not any(t.is_alive() for t in mine)


def test_a_thread_clears_its_streams_as_it_ends(monkeypatch):
    """A thread's MLX streams outliving it may abort the process at exit (README), most often after a step failed."""
    cleared = []
    monkeypatch.setattr(mx, "clear_streams", lambda: cleared.append(threading.current_thread().name))

    def part(model, x, y):
        raise ValueError("no rows")

    threads = StepThreads(Tiny(), 2, part, compile=False)
    with pytest.raises(ValueError, match="no rows"):
        threads(mx.ones((2, 3)), mx.ones((2, 2)))
    del threads
    gc.collect()
    assert sorted(cleared) == ["nanogpt-mlx-step-0", "nanogpt-mlx-step-1"]


# g++ as MLX finds it on PATH: it compiles $FAKE_OK kernels, then fails (MLX probes it with --version first)
FAILING_GXX = """#!/bin/sh
case "$*" in *--version*) exec {gxx} "$@";; esac
n=$(cat "$FAKE_COUNT" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_COUNT"
[ "$n" -lt "$FAKE_OK" ] && exec {gxx} "$@"
echo "g++: fatal error: no room" >&2
exit 1
"""


@pytest.mark.skipif(not device.PROFILE.cpu_backend or sys.platform != "linux", reason="MLX's CPU kernel compiler")
def test_a_step_that_fails_in_a_thread_is_one_line(data, tmp_path):
    """A kernel that could not be compiled (a full disk) amid a step of two threads: one line and exit 1, where the
    process aborted as it exited ("terminate called without an active exception", status 134) one run in three."""
    path = [d for d in os.environ["PATH"].split(os.pathsep) if "jit-avx2" not in d]
    gxx = shutil.which("g++", path=os.pathsep.join(path))
    if gxx is None:
        pytest.skip("needs g++")
    fake = tmp_path / "bin" / "g++"
    fake.parent.mkdir()
    fake.write_text(FAILING_GXX.format(gxx=gxx))
    fake.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {"PATH": os.pathsep.join([str(fake.parent), *path]), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "TMPDIR": str(tmp_path / "tmp"), "FAKE_COUNT": str(tmp_path / "count"), "FAKE_OK": "6"}
    proc = run_cli("train", "--data", str(data), "--out", str(tmp_path / "out"), "--n-layer", "1", "--n-head", "2",
                   "--n-embd", "32", "--block-size", "32", "--batch-size", "2", "--seq-len", "32",
                   "--total-batch-size", "64", "--max-steps", "2", "--val-every", "0", "--sample-every", "0",
                   "--threads", "2", env=env)
    assert proc.returncode == 1, proc.stderr
    assert_one_line_error(proc, "MLX could not compile a kernel", "no room")


def test_a_process_that_trained_with_threads_exits_cleanly(data, tmp_path):
    """MLX caches a thread's compiled functions in the thread; released as a daemon thread dies at exit, they
    aborted the process ("terminate called without an active exception")."""
    script = (f"import contextlib, io, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_train import tiny_config\n"
              "from nanogpt_mlx.train import Trainer\n"
              f"t = Trainer(tiny_config({str(data)!r}, {str(tmp_path / 'out')!r}, max_steps=2, threads=2))\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n"
              "    t.train()\n"
              "print('trained', t.threads)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout.strip()) == (0, "trained 2"), proc.stderr
    assert "terminate" not in proc.stderr


EXIT_PROBE = r"""
import atexit, os, threading, time

def others_busy() -> float:
    # CPU seconds the process's other threads (MLX's stream thread) spend in 0.3 s
    def cpu():
        total = 0
        for tid in os.listdir("/proc/self/task"):
            if int(tid) != threading.get_native_id():
                try:
                    with open(f"/proc/self/task/{tid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except FileNotFoundError:  # a thread that ended meanwhile
                    continue
                total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        return total / os.sysconf("SC_CLK_TCK")
    before = cpu()
    time.sleep(0.3)
    return cpu() - before

atexit.register(lambda: print(f"busy {others_busy():.2f}", flush=True))  # registered first: runs last

import nanogpt_mlx
import mlx.core as mx

y = mx.random.uniform(shape=(1 << 21,))
mx.eval(y)
for _ in range(60):  # ~1 s of element-wise work on MLX's stream thread (no BLAS, whose threads spin a while)
    y = mx.tanh(y + 0.5)
mx.async_eval(y)  # and exit: as generate leaves its next step queued when the caller stops early
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads the threads' CPU time in /proc")
def test_work_queued_on_mlx_is_finished_before_the_process_tears_down(tmp_path):
    """MLX never stops its stream thread: work queued at exit (mx.async_eval) ran on through the C teardown, freeing
    into MLX's destroyed allocator cache (a corrupted heap, aborted at exit) and racing OpenBLAS's shutdown (a hang).
    device.setup waits for it at exit, after the other atexit work: no thread is left computing then."""
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    busy = float(proc.stdout.split("busy")[-1])
    assert busy < 0.1, f"MLX's stream thread still computing at exit: {busy:.2f} CPU s in 0.3 s"
