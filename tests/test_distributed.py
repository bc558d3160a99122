"""Data parallelism on localhost (ring backend, 127.0.0.1 only): 2 ranks equal 1 rank with twice the
gradient accumulation, both ranks end with the same weights, and a dead or frozen rank stops the others."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from test_train import logged, tiny_config, token_stream, write_shards

from nanogpt_mlx import device, evaluations
from nanogpt_mlx.checkpoint import checkpoints
from nanogpt_mlx.stops import StopEvaluating

# Trains with the public API in whatever group the environment describes, then dumps this rank's weights.
RANK_SCRIPT = """
import json, sys
import nanogpt_mlx
import mlx.core as mx
from nanogpt_mlx.config import TrainConfig
from nanogpt_mlx.train import Trainer
t = Trainer(TrainConfig(**json.loads(sys.argv[1])))
t.train()
mx.save_safetensors(f"{t.cfg.out}/rank{t.dist.rank}.safetensors", dict(t.model.parameters_flat()))
print("done", t.dist.rank, t.dist.world, flush=True)
"""


def hostfile(tmp_path: Path, n: int) -> Path:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    return path


def start_ranks(tmp_path: Path, cfg, n: int, cli: bool = False, env: dict | None = None) -> list[subprocess.Popen]:
    """n processes of one group on 127.0.0.1: RANK_SCRIPT, or with cli=True `nanogpt-mlx train`."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    if cli:
        cmd = [sys.executable, "-m", "nanogpt_mlx", "train"]  # as mlx.launch -m nanogpt_mlx runs it
        for k, v in asdict(cfg).items():
            if v is None:  # unset (min_lr): no flag
                continue
            cmd += [f"--{k.replace('_', '-')}" if not isinstance(v, bool) else f"--{'' if v else 'no-'}{k.replace('_', '-')}"]
            cmd += [] if isinstance(v, bool) else [str(v)]
    else:
        cmd = [sys.executable, str(script), json.dumps(asdict(cfg))]
    hosts = hostfile(tmp_path, n) if n > 1 else None
    procs = []
    for r in range(n):
        e = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})}
        if hosts:
            e.update(MLX_RANK=str(r), MLX_HOSTFILE=str(hosts))
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 4 x 32 tokens per micro-batch; shards of 24 windows keep 1 and 2 ranks on the same batches
    return write_shards(tmp_path_factory.mktemp("dshards"), [token_stream(24 * 128 + 1, 1), token_stream(24 * 128 + 1, 2)],
                        token_stream(2000, 3))


BARRIER_SCRIPT = """
import time
import nanogpt_mlx
from nanogpt_mlx import distributed
d = distributed.init()
if d.rank == 0:
    time.sleep(2)  # as a rank saving a checkpoint
d.barrier()
print(time.monotonic(), flush=True)
"""


def test_a_barrier_holds_every_rank_until_the_slowest_arrives(tmp_path):
    """The ranks wait for rank 0's last save at a barrier: rank 1 must not pass it before rank 0 gets there."""
    hosts, script = hostfile(tmp_path, 2), tmp_path / "barrier.py"
    script.write_text(BARRIER_SCRIPT)
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)}) for r in range(2)]
    passed = [float(out) for out in finish(procs, timeout=120)]
    assert passed[1] - start >= 2 and passed[1] >= passed[0] - 0.5


# Rank 1's part of an evaluation (validation or samples) fails at step 3; rank 0's save takes 2 s more.
EVALUATION_FAILS_SCRIPT = """
import json, sys, time
import nanogpt_mlx
from nanogpt_mlx import checkpoint, evaluations, train
from nanogpt_mlx.config import TrainConfig
which, cfg = sys.argv[1], TrainConfig(**json.loads(sys.argv[2]))
t = train.Trainer(cfg)
name, nth = ("loader_loss", 2) if which == "val" else ("sample_texts", 1)  # (step 0 validates, samples not)
real, calls, write = getattr(evaluations, name), [], checkpoint.write

def failing(*args, **kwargs):
    calls.append(1)
    if t.dist.rank == 1 and len(calls) == nth:
        raise RuntimeError("[Compile::eval_cpu] Failed to compile")
    return real(*args, **kwargs)

def slow_write(*args, **kwargs):
    time.sleep(2)
    path = write(*args, **kwargs)
    print("saved at", time.monotonic(), flush=True)
    return path

setattr(evaluations, name, failing)
checkpoint.write = slow_write
try:
    t.train()
finally:
    print("ended at", time.monotonic(), flush=True)
"""


@pytest.mark.parametrize("which", ["val", "sample"])
def test_an_evaluation_that_fails_on_one_rank_is_saved_before_that_rank_ends(which, data_dir, tmp_path):
    """Rank 1's validation failed and it ended at once; rank 0, in the collective that waited for it, lost its peer
    and saved, but a launcher stops the rest of a failed group 5 s on: a slow save was cut off. The ranks agree on an
    evaluation's failure now, and the failed rank ends after rank 0's save, which says why it stopped."""
    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, max_steps=8, val_every=3 if which == "val" else 0,
                      sample_every=3 if which == "sample" else 0, num_samples=1, sample_tokens=2, vocab_size=50304)
    script = tmp_path / "fails.py"
    script.write_text(EVALUATION_FAILS_SCRIPT)
    hosts = hostfile(tmp_path, 2)
    procs = [subprocess.Popen([sys.executable, str(script), which, json.dumps(asdict(cfg))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1",
                                                                      "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)})
             for r in range(2)]
    (out0, err0), (out1, err1) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], err0 + err1
    saved = float(re.search(r"saved at (\S+)", out0).group(1))
    assert float(re.search(r"ended at (\S+)", out1).group(1)) >= saved, "rank 1 ended before rank 0's save"
    assert f"evaluation failed: saved {out / 'ckpt-000003'} (step 3)" in out0
    assert err1.rstrip().endswith("RuntimeError: [Compile::eval_cpu] Failed to compile"), err1
    assert err0.rstrip().endswith("rank 0: stopping: the evaluation failed on another rank"), err0
    assert "lost a peer" not in err0 + err1
    assert [p.name for p in checkpoints(out)] == ["ckpt-000003"]


class ThreadRanks:
    """`world` ranks as threads of this process, whose sums meet at a barrier (Dist's collectives, in-process)."""

    def __init__(self, world: int):
        self.world, self._values, self._meet = world, [0.0] * world, threading.Barrier(world, timeout=30)
        self.polls = [0] * world  # the sums each rank made

    def rank(self, rank: int):
        ranks = self

        class Rank:
            world = ranks.world

            def sum(self, value, at_least=0.0):
                ranks.polls[rank] += 1
                ranks._values[rank] = value
                ranks._meet.wait()
                total = sum(ranks._values)
                ranks._meet.wait()
                return total

        one = Rank()
        one.rank = rank
        return one

    def run(self, part) -> list:
        """part(rank, evaluations) on each rank's thread, each rank's Evaluations._rank_part: what each returned or
        raised."""
        results: list = [None] * self.world

        def one(rank):
            ev = evaluations.Evaluations.__new__(evaluations.Evaluations)
            ev.dist, ev.failure_agreed = self.rank(rank), False
            ev.stop = lambda: part.stop(rank)
            try:
                results[rank] = ev._rank_part(lambda after: part(rank, after))
            except Exception as e:
                results[rank] = e
            results[rank] = (results[rank], ev.failure_agreed)

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results


class Share:
    """A rank's share of an evaluation: `sizes[rank]` batches, a stop requested of rank `stop_at[0]` after its batch
    `stop_at[1]`, rank `fail_at[0]` failing at its batch `fail_at[1]` (its last + 1: after them)."""

    def __init__(self, sizes, stop_at=(None, 0), fail_at=(None, 0)):
        self.sizes, self.stop_at, self.fail_at = sizes, stop_at, fail_at
        self.done = [0] * len(sizes)

    def stop(self, rank):
        return rank == self.stop_at[0] and self.done[rank] >= self.stop_at[1]

    def __call__(self, rank, after):
        for i in range(self.sizes[rank] + 1):
            if (rank, i) == self.fail_at:
                raise RuntimeError("a kernel that cannot compile")
            if i < self.sizes[rank]:
                self.done[rank] += 1
                after(self.done[rank], self.sizes[rank])
        return rank


@pytest.mark.parametrize("sizes", [(40, 37), (5, 4, 0), (1, 100)])
def test_ranks_poll_alike_amid_an_evaluation_whatever_their_shares(sizes):
    """Ranks' shares of HellaSwag differ (their batches fall by context length); each makes the same sums."""
    ranks = ThreadRanks(len(sizes))
    assert ranks.run(Share(sizes)) == [(r, False) for r in range(len(sizes))]
    assert ranks.polls == [evaluations.POLLS] * len(sizes)


def test_a_stop_requested_of_one_rank_ends_every_ranks_evaluation_soon():
    """A SIGTERM to the ranks amid HellaSwag (minutes) waited for its end: beyond a scheduler's grace before its
    SIGKILL, unsaved. Now every rank ends its evaluation within about 1/POLLS of it."""
    share = Share((320, 320), stop_at=(1, 100))
    results = ThreadRanks(2).run(share)
    assert all(isinstance(r, StopEvaluating) and not agreed for r, agreed in results), results
    assert all(done <= 100 + 320 // evaluations.POLLS for done in share.done), share.done
    share = Share((320, 320), stop_at=(None, 100))
    share.stop = lambda rank: share.done[rank] >= 100  # requested of every rank: a stop, not a failure
    results = ThreadRanks(2).run(share)
    assert all(isinstance(r, StopEvaluating) and not agreed for r, agreed in results), results
    assert all(done <= 100 + 320 // evaluations.POLLS for done in share.done), share.done


@pytest.mark.parametrize("where", [0, 7, 64], ids=["at-once", "amid", "after-its-share"])
def test_a_rank_whose_part_failed_stops_the_others_soon_and_with_its_error(where):
    share = Share((64, 64, 64), fail_at=(1, where))
    results = ThreadRanks(3).run(share)
    assert [str(r) for r, _ in results] == ["rank 0: stopping: the evaluation failed on another rank",
                                            "a kernel that cannot compile",
                                            "rank 2: stopping: the evaluation failed on another rank"]
    assert all(agreed for _, agreed in results)
    assert max(share.done) <= where + 64 // evaluations.POLLS + 1


def test_a_stop_after_a_batch_that_passes_several_polls_is_agreed_at_the_first():
    """A rank whose one batch passes several of its polls makes those after an agreed stop no more."""
    share = Share((1, 320), stop_at=(1, 0))  # rank 1 stops at once, rank 0's one batch is its whole share
    ranks = ThreadRanks(2)
    assert all(isinstance(r, StopEvaluating) for r, _ in ranks.run(share))
    assert ranks.polls == [1, 1]


def test_ranks_that_ranks_started_know_they_share_one_machine(monkeypatch):
    """A `--ranks` rank (its launcher's variable set) splits this machine's memory among the group; a rank that
    mlx.launch started may be one per machine."""
    from nanogpt_mlx import distributed

    class Group:
        def rank(self):
            return 1

        def size(self):
            return 3

    monkeypatch.setattr(distributed.mx.distributed, "init", lambda **kw: Group())
    monkeypatch.setattr(distributed, "_stop_with_launcher", lambda pid: None)
    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.setenv(distributed.LAUNCHER_ENV, str(os.getppid()))
    assert (distributed.init().local, distributed.init().world) == (3, 3)
    monkeypatch.delenv(distributed.LAUNCHER_ENV)
    assert distributed.init().local == 1


@pytest.mark.parametrize("n, threads", [(2, "4"), (3, "2"), (8, "1")])
def test_each_rank_gets_its_share_of_the_cores_blas_threads(monkeypatch, n, threads):
    from nanogpt_mlx import launch

    envs = []
    monkeypatch.setattr(launch.device, "cores", lambda: 8)
    monkeypatch.setattr(launch._Ranks, "start", lambda self, r, argv, env: envs.append(env))
    assert launch.launch_local(n, ["info"]) == 0
    assert [(env["OPENBLAS_NUM_THREADS"], env["MKL_NUM_THREADS"]) for env in envs] == [(threads, threads)] * n
    # the system's TMPDIR, not the one cpu_jit.py set for MLX's kernels (a rank sets that for itself)
    assert all(env.get("TMPDIR") == device.child_env().get("TMPDIR") for env in envs)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_the_cores_are_those_this_process_may_run_on(monkeypatch):
    """A container's cpuset (or taskset) of 2 CPUs on a 64-core host: os.cpu_count() said 64, and the launcher took
    64 ranks, each with 32 BLAS threads on 2 CPUs. prepare's workers counted them already."""
    from nanogpt_mlx import launch
    from nanogpt_mlx.errors import UserError

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7})
    assert device.cores() == 2
    with pytest.raises(UserError, match=r"^--ranks must be at most the 2 cores this process may use, got 3 "):
        launch.check_ranks(3)


def test_more_ranks_than_cores_are_refused_before_any_starts(monkeypatch, tmp_path):
    """`--ranks 5000` started dozens of ranks, each importing MLX; `--ranks 100000` said "Too many open files"."""
    from conftest import assert_one_line_error, run_cli

    from nanogpt_mlx import launch
    from nanogpt_mlx.errors import UserError

    started = []
    monkeypatch.setattr(launch.device, "cores", lambda: 8)
    monkeypatch.setattr(launch._Ranks, "start", lambda self, r, argv, env: started.append(r))
    with pytest.raises(UserError, match=r"^--ranks must be at most the 8 cores this process may use, got 9 "):
        launch.launch_local(9, ["info"])
    assert started == []
    proc = run_cli("train", "--ranks", "100000", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                   env={"TMPDIR": str(tmp_path)})
    assert_one_line_error(proc, "--ranks must be at most the", "got 100000")


def test_a_total_batch_that_the_ranks_cannot_make_up_is_refused_before_they_start(monkeypatch, capsys, data_dir,
                                                                                 tmp_path):
    """The ranks' Trainer refused it, each after importing MLX: with --ranks 5000, after dozens had started."""
    from conftest import assert_one_line_error, run_main

    from nanogpt_mlx import launch

    started = []
    monkeypatch.setattr(launch.device, "cores", lambda: 8)
    monkeypatch.setattr(launch._Ranks, "start", lambda self, r, argv, env: started.append(r))
    proc = run_main(capsys, "train", "--ranks", "2", "--data", str(data_dir), "--out", str(tmp_path / "run"),
                    "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "320")
    assert_one_line_error(proc, "total_batch_size 320 is not divisible by batch_size * seq_len * ranks = 4 * 32 * 2 "
                                "= 256; use --batch-size 1 or --total-batch-size 512")
    assert started == []


def test_the_launchers_directory_is_removed_when_it_fails_to_start(monkeypatch, tmp_path):
    """Made before the ports were found, outside the try that removes it: `--ranks` beyond the open files left it."""
    import errno
    import tempfile

    from nanogpt_mlx import launch

    def no_ports(n):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(launch, "_free_ports", no_ports)
    with pytest.raises(OSError, match="Too many open files"):
        launch.launch_local(2, ["info"])
    assert list(tmp_path.iterdir()) == []


def test_a_launch_removes_what_a_killed_launcher_left(monkeypatch, tmp_path):
    """A SIGKILLed launcher leaves its directory (hostfile, the ranks' lines): /tmp held 74 of them."""
    import tempfile

    from nanogpt_mlx import launch
    from nanogpt_mlx.files import HOST_TAG

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = {f"nanogpt-mlx-ranks-{HOST_TAG}-{pid}-abcd_123": pid for pid in (int(ended.stdout), os.getpid())}
    for name in left:
        (tmp_path / name).mkdir()
        (tmp_path / name / "hosts.json").write_text("[]")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(launch.device, "cores", lambda: 8)
    monkeypatch.setattr(launch._Ranks, "start", lambda self, r, argv, env: None)
    assert launch.launch_local(2, ["info"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [f"nanogpt-mlx-ranks-{HOST_TAG}-{os.getpid()}-abcd_123"]


def test_of_the_ranks_that_ranks_started_rank_0_alone_warns(monkeypatch, capsys):
    from nanogpt_mlx import console

    monkeypatch.setenv(console.LAUNCHER_ENV, "1")
    for rank in ("0", "1", "2"):
        monkeypatch.setenv("MLX_RANK", rank)
        console.warn(f"from {rank}")
    assert capsys.readouterr().err.splitlines() == ["nanogpt-mlx: warning: from 0"]


def test_the_launcher_shows_each_ranks_line_once(tmp_path):
    from nanogpt_mlx import console

    shown: set[str] = set()
    lines = tmp_path / "rank1.lines"
    lines.write_text("a\nb\na\n")
    assert console.new_lines(lines, shown) == ["a", "b"]
    lines.write_text("a\nb\na\nc\n")
    assert console.new_lines(lines, shown) == ["c"] and console.new_lines(tmp_path / "none", shown) == []


def weights(path: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_two_ranks_equal_one_rank_with_twice_the_accumulation(data_dir, tmp_path):
    # total batch 512 tokens = 1 rank x 4 micro-steps = 2 ranks x 2 micro-steps
    # each rank runs val_steps batches (as build-nanogpt), so 2 ranks x 2 cover 1 rank x 4;
    # HellaSwag examples are split across ranks and the counts summed
    from test_evaluate import make_hellaswag, write_jsonl

    hella = write_jsonl(tmp_path / "hellaswag_val.jsonl", make_hellaswag(9, ctx_words=(3, 10), ending_words=(1, 8)))
    common = dict(total_batch_size=512, max_steps=8, val_every=4, vocab_size=50304, block_size=64, hellaswag_every=4,
                  hellaswag_data=str(hella))
    one = tiny_config(data_dir, tmp_path / "one", val_steps=4, **common)
    two = tiny_config(data_dir, tmp_path / "two", val_steps=2, **common)
    finish(start_ranks(tmp_path, one, 1))
    outs = finish(start_ranks(tmp_path, two, 2))
    done = sorted(line.split()[1:] for o in outs for line in o.splitlines() if line.startswith("done"))
    assert done == [["0", "2"], ["1", "2"]]

    assert_same_training(tmp_path / "one", tmp_path / "two", steps=8)
    # a step's tokens are all ranks' (MFU's use of them: test_cli_ranks_option_launches_local_ranks)
    assert "| 2 rank(s) | 512 tokens/step = 2 x 2 x 4 x 32 |" in outs[0]
    for run in ("one", "two"):
        assert [r["tok_per_s"] * r["dt"] for r in logged(tmp_path / run)] == pytest.approx([512] * 8, rel=1e-9)
    val1 = [r["loss"] for r in logged(tmp_path / "one", "val")]
    val2 = [r["loss"] for r in logged(tmp_path / "two", "val")]
    np.testing.assert_allclose(val2, val1, rtol=1e-4)
    hella1 = [r["hella"] for r in logged(tmp_path / "one", "hella")]
    hella2 = [r["hella"] for r in logged(tmp_path / "two", "hella")]
    assert len(hella1) == 3 and hella2 == pytest.approx(hella1, abs=1e-6)
    assert not (tmp_path / "two" / "rank1").exists()  # only rank 0 writes logs and checkpoints


def assert_same_training(one: Path, two: Path, steps: int) -> None:
    """The 2-rank run `two` logged the losses of the 1-rank run `one` and ended with its weights on both ranks."""
    loss1 = [r["loss"] for r in logged(one)]
    loss2 = [r["loss"] for r in logged(two)]
    assert len(loss1) == len(loss2) == steps
    np.testing.assert_allclose(loss2, loss1, rtol=1e-4)
    r0, r1 = weights(two / "rank0.safetensors"), weights(two / "rank1.safetensors")
    ref = weights(one / "rank0.safetensors")
    for k in ref:
        np.testing.assert_array_equal(r0[k], r1[k])  # ranks never diverge
        np.testing.assert_allclose(r0[k], ref[k], rtol=1e-3, atol=1e-5)


def test_speedrun_two_ranks_equal_one_rank_with_twice_the_accumulation(data_dir, tmp_path):
    """Muon orthogonalises the rank-averaged gradient, so the speedrun recipe splits across ranks exactly too."""
    from nanogpt_mlx.recipes import SPEEDRUN

    common = dict(recipe="speedrun", **{**SPEEDRUN.defaults, "max_lr": 0.05}, momentum_warmup=3,
                  total_batch_size=512, max_steps=6)
    finish(start_ranks(tmp_path, tiny_config(data_dir, tmp_path / "one", **common), 1))
    finish(start_ranks(tmp_path, tiny_config(data_dir, tmp_path / "two", **common), 2))
    assert_same_training(tmp_path / "one", tmp_path / "two", steps=6)


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_lost_rank_stops_the_others_with_a_clear_error(how, data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, max_steps=100000, total_batch_size=256)
    procs = start_ranks(tmp_path, cfg, 2, cli=True, env={"NANOGPT_MLX_DIST_TIMEOUT": "10"})
    survivor, victim = procs
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):  # training is under way
        assert time.time() < deadline and survivor.poll() is None, survivor.stderr.read()
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        start = time.time()
        _, err = survivor.communicate(timeout=60)
        assert time.time() - start < 60
    finally:
        victim.kill()
        victim.wait()
    assert survivor.returncode != 0
    errors = [l for l in err.splitlines() if l.startswith("nanogpt-mlx: error:")]
    assert len(errors) == 1 and "rank 0" in errors[0], err
    assert "Traceback" not in err


def test_cli_ranks_option_launches_local_ranks(data_dir, tmp_path):
    from conftest import assert_one_line_error, run_cli

    proc = run_cli("train", "--ranks", "2", "--data", str(data_dir), "--out", str(tmp_path), "--n-layer", "2",
                   "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "1000", "--batch-size", "4",
                   "--seq-len", "32", "--total-batch-size", "256", "--max-steps", "3", "--val-every", "0",
                   "--sample-every", "0", timeout=300, env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "2 rank(s)" in proc.stdout and proc.stdout.count("done: step 3") == 1
    assert not list(tmp_path.glob("nanogpt-mlx-ranks-*"))  # the launcher's hostfile and the ranks' last lines
    assert len(logged(tmp_path)) == 3 and (tmp_path / "model.safetensors").is_file()
    # MFU: the tokens of both ranks against the peak of both (each measured its own, with half the cores)
    import re

    from nanogpt_mlx import GPT, GPTConfig

    peak = float(re.search(r"peak (\d+) GFLOP/s a rank", proc.stdout).group(1)) * 1e9
    model = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=32))
    flops_per_token = 6 * model.num_params(non_embedding=True) + 12 * 2 * 32 * 32
    for r in logged(tmp_path):
        assert r["mfu"] == pytest.approx(flops_per_token * r["tok_per_s"] / (2 * peak), rel=0.05)
    # another rank count is refused first: advice for this one's total_batch_size (here 64 of 128-token rows)
    # led to that refusal next
    proc = run_cli("train", "--resume", str(tmp_path), "--max-steps", "4", "--total-batch-size", "64")
    assert_one_line_error(proc, "was written by a run with 2 ranks", "--ranks 2 (this run has 1)")


def test_a_refusal_of_rank_0_alone_is_not_followed_by_a_lost_peer(data_dir, tmp_path):
    """OUT held by another run: rank 0 refused it at start, and rank 1, waiting for it, added "lost a peer rank"."""
    from conftest import run_cli

    from nanogpt_mlx.locks import lock_dir, unlock_dir

    out = tmp_path / "run"
    lock_dir(out, "run")
    try:
        proc = run_cli("train", "--ranks", "2", "--data", str(data_dir), "--out", str(out), "--n-layer", "1",
                       "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "1000",
                       "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "256", "--max-steps", "2",
                       "--val-every", "0", "--sample-every", "0", timeout=300)
    finally:
        unlock_dir(out)
    assert proc.returncode == 1 and "is being written by another run" in proc.stderr
    assert "lost a peer" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", ["error", "warning"])
def test_the_ranks_say_an_error_or_a_warning_once(case, data_dir, tmp_path):
    """Every rank runs the same command: each printed its own copy of a bad input's error and of every warning."""
    from conftest import run_cli

    data = tmp_path / "missing" if case == "error" else data_dir
    proc = run_cli("train", "--ranks", "2", "--data", str(data), "--out", str(tmp_path / "run"), "--n-layer", "1",
                   "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size", "1000", "--batch-size", "4",
                   "--seq-len", "32", "--total-batch-size", "256", "--max-steps", "1", "--val-steps", "100000",
                   "--dtype", "bfloat16", "--sample-every", "0", timeout=300)
    lines = proc.stderr.splitlines()
    if case == "error":
        assert proc.returncode == 1 and [line for line in lines if "error" in line] == [
            f"nanogpt-mlx: error: {data}: data directory not found (make one with `nanogpt-mlx prepare`)"], proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        warnings = [line for line in lines if line.startswith("nanogpt-mlx: warning:")]
        assert any("val_steps 100000" in w for w in warnings) and len(set(warnings)) == len(warnings), warnings


def test_ctrl_c_on_one_rank_stops_all_at_the_same_step_with_a_checkpoint(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, max_steps=100000, total_batch_size=256)
    procs = start_ranks(tmp_path, cfg, 2, cli=True, env={"NANOGPT_MLX_DIST_TIMEOUT": "30"})
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert time.time() < deadline and procs[0].poll() is None, procs[0].stderr.read()
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)  # only the non-main rank is interrupted
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [130, 130], errs
    assert not any("Traceback" in e for e in errs)
    saved = sorted(tmp_path.glob("ckpt-*"))
    assert len(saved) == 1 and int(saved[0].name[5:]) == len(logged(tmp_path))


def start_two_ranks(data_dir: Path, out: Path, env: dict | None = None, args: list[str] = (),
                    **popen) -> subprocess.Popen:
    """`train --ranks 2`, a long run (`args` override its options; `popen`, Popen's)."""
    return subprocess.Popen([sys.executable, "-m", "nanogpt_mlx", "train", "--ranks", "2", "--data", str(data_dir),
                             "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                             "--block-size", "32", "--vocab-size", "1000", "--batch-size", "4", "--seq-len", "32",
                             "--total-batch-size", "256", "--max-steps", "100000", "--val-every", "0",
                             "--sample-every", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, **popen)


def children(pid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def kill(pids: list[int]) -> None:
    """SIGKILL whichever of `pids` still run: a failed test's ranks would train on (100000 steps), slowing every
    later test."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def launch_two_ranks(data_dir: Path, out: Path, env: dict | None = None, args: list[str] = (),
                     **popen) -> tuple[subprocess.Popen, list[int]]:
    """`train --ranks 2` once it has logged two steps: the launcher and its ranks' pids."""
    proc = start_two_ranks(data_dir, out, env, args, **popen)
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and len(logged(out)) >= 2):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    return proc, ranks


def test_ctrl_c_while_the_ranks_import_is_one_line(data_dir, tmp_path):
    """In their first half second the ranks import MLX: a Ctrl-C there printed a traceback from each."""
    proc = start_two_ranks(data_dir, tmp_path)
    deadline = time.time() + 60
    while len(children(proc.pid)) < 2:
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    time.sleep(0.1)  # in the import
    ranks = children(proc.pid)
    assert not (tmp_path / "log.jsonl").exists()  # not yet training, where a Ctrl-C was always one line
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        kill(ranks + [proc.pid])
    assert proc.returncode == 130 and "Traceback" not in err and err.count("nanogpt-mlx: interrupted") == 1, err


# a Ctrl-C (a real SIGINT, handled between two bytecodes of the sum) where a rank's imports could not catch its
# KeyboardInterrupt
CTRL_C_AMID_IMPORTS = {
    # Python prints a KeyboardInterrupt raised in a __del__ (importlib's ZipFile's) as "Exception ignored ...
    # Traceback" and imports on: a rank hit there printed a traceback, then trained
    "in-a-del": """
class Closing:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(100000))
Closing()
""",
    # numpy's C import prints the KeyboardInterrupt, then raises an ImportError: seen once in CI, two tracebacks
    "in-numpys-import": """
try:
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(100000))
except BaseException:
    import traceback
    traceback.print_exc()
    raise ImportError("numpy._core.multiarray failed to import") from None
""",
}


@pytest.mark.parametrize("where", CTRL_C_AMID_IMPORTS)
def test_a_ctrl_c_amid_a_ranks_imports_ends_it_quietly(where, tmp_path):
    from nanogpt_mlx.launch import _RANK_MAIN

    (tmp_path / "nanogpt_mlx").mkdir()
    (tmp_path / "nanogpt_mlx" / "__init__.py").write_text("")
    (tmp_path / "nanogpt_mlx" / "cli.py").write_text(
        "import os, signal\n" + CTRL_C_AMID_IMPORTS[where] + "def main():\n    print('trained')\n    return 0\n")
    proc = subprocess.run([sys.executable, "-c", _RANK_MAIN], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "")


def test_a_ctrl_c_forwarded_as_a_rank_starts_ends_it_quietly(tmp_path, capfd):
    """A Ctrl-C forwarded while the rank's Python still started (before _RANK_MAIN's handler) ended it with "Fatal
    Python error: init_import_site" and a traceback, or killed it with SIGINT."""
    from nanogpt_mlx import launch

    ranks = launch._Ranks(tmp_path)
    for r in range(3):
        ranks.start(r, ["--version"], dict(os.environ))
        ranks.live[r].send_signal(signal.SIGINT)  # at once: the rank has just been exec'd
    assert [p.wait(timeout=60) for p in ranks.live.values()] == [130] * 3
    assert capfd.readouterr().err == ""


def test_ctrl_c_while_the_ranks_start_ends_the_launch(data_dir, tmp_path):
    """A Ctrl-C as soon as the first rank exists, while the launcher may still be starting the second: it was a
    KeyboardInterrupt there that ended the launcher untold to the ranks, which trained on. (A rank hit in Python's
    own start-up printed "Fatal Python error" and a traceback: test_a_ctrl_c_forwarded_as_a_rank_starts_ends_it_quietly
    hits it surely.)"""
    proc = start_two_ranks(data_dir, tmp_path)
    deadline = time.time() + 60
    while not (ranks := children(proc.pid)):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
        stopped = [gone(pid) for pid in ranks]  # the launcher waits for its ranks
    finally:
        kill(ranks + children(proc.pid) + [proc.pid])
    assert proc.returncode == 130 and all(stopped) and not (tmp_path / "log.jsonl").exists()
    assert "was killed" not in err, err  # a rank ended by the Ctrl-C forwarded to it
    assert "Traceback" not in err and "Fatal Python error" not in err, err


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_ranks_launcher_stops_the_ranks_with_a_checkpoint(signum, data_dir, tmp_path):
    """A scheduler's SIGTERM, a SIGINT sent to the launcher's pid alone (the ranks run in a session of their own,
    so Ctrl-C in a terminal comes this way too) or a closed terminal's SIGHUP stops the ranks as Ctrl-C does: they
    agree on a step and save, instead of training on as orphans (SIGTERM) or to the end (SIGINT)."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path,
                                   preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # not nohup's
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err
    assert err.count("nanogpt-mlx: interrupted") == 1, err  # not one from each rank
    assert all(map(gone, ranks))  # waited for by the launcher
    (saved,) = sorted(tmp_path.glob("ckpt-*"))
    assert int(saved.name[5:]) == len(logged(tmp_path))


@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
@pytest.mark.parametrize("targets", ["ranks", "ranks-and-launcher", "rank-1"])
def test_a_sigterm_to_the_ranks_saves_a_checkpoint(targets, times, data_dir, tmp_path):
    """A scheduler ending a job (Slurm at its time limit, scancel) sends SIGTERM to each of its processes at once,
    the ranks too, not only to the launcher: the ranks, which took SIGTERM's default action, ended at once, unsaved.
    Now they agree on a step and save, with one status (a rank not signalled exited 130, and so did the launch where
    it ended first), and a SIGTERM sent again (scancel twice) does not kill them amid it."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path)
    try:
        for _ in range(times):
            for pid in {"ranks": ranks, "ranks-and-launcher": ranks + [proc.pid], "rank-1": ranks[1:]}[targets]:
                os.kill(pid, signal.SIGTERM)
            time.sleep(0.002)
        stdout, err = proc.communicate(timeout=60)
    finally:
        kill(ranks + [proc.pid])
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "killed by" not in err and "lost a peer" not in err, err
    (saved,) = sorted(tmp_path.glob("ckpt-*"))
    assert int(saved.name[5:]) == len(logged(tmp_path))
    assert f"interrupted: saved {saved}" in stdout and "again to quit" not in stdout, stdout


def test_a_sigterm_to_the_ranks_amid_an_evaluation_stops_it_soon(tmp_path):
    """Slurm's SIGTERM to the ranks amid HellaSwag or a long validation waited for its end (minutes on a CPU), past
    the scheduler's grace before its SIGKILL: killed unsaved. The ranks agree on a stop amid the evaluation now."""
    out, data = tmp_path / "run", tmp_path / "data"
    write_shards(data, [token_stream(3000, 1)], np.tile(token_stream(4096, 3), 5000))
    proc = start_two_ranks(data, out, args=["--max-steps", "3", "--val-every", "2", "--val-steps", "50000"],
                           env={"PYTHONUNBUFFERED": "1"})
    try:
        while not (line := proc.stdout.readline()).startswith("model ") and line:  # the header, then the first val
            pass
        time.sleep(2.0)  # (amid the step-0 validation: minutes of it)
        ranks, sent = children(proc.pid), time.monotonic()
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        stdout, err = proc.communicate(timeout=60)
    finally:
        kill(children(proc.pid) + [proc.pid])
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert time.monotonic() - sent < 30
    assert [p.name for p in checkpoints(out)] == ["ckpt-000000"] and logged(out, "val") == []
    assert f"interrupted: saved {out / 'ckpt-000000'}" in stdout, stdout


def test_a_signal_during_the_stops_save_lets_it_finish(data_dir, tmp_path):
    """A SIGHUP to rank 0 amid the save of a stop that the ranks agreed on killed it there, leaving a temporary
    directory and no checkpoint (a SIGTERM was held back, a SIGHUP was not)."""
    out, mark = tmp_path / "run", tmp_path / "saving"
    proc, ranks = launch_two_ranks(data_dir, out, env=injected(tmp_path, SAVE_SLEEP="3", SAVE_MARK=str(mark)))
    try:
        for pid in ranks:
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 60  # until rank 0's save is under way (a fixed wait missed it on a busy machine)
        while not mark.exists():
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.02)
        for pid in ranks:
            os.kill(pid, signal.SIGHUP)
        assert not Path(f"{mark}.done").exists()  # amid the save (3 s)
        stdout, err = proc.communicate(timeout=60)
    finally:
        kill(ranks + [proc.pid])
    said = [line for line in err.splitlines() if not line.startswith("[ring] ")]
    assert proc.returncode == 128 + signal.SIGTERM and said == ["nanogpt-mlx: interrupted"], err
    (saved,) = checkpoints(out)
    assert f"interrupted: saved {saved}" in stdout and not list(out.glob(".*.tmp*"))


@pytest.mark.parametrize("launcher_too", [True, False], ids=["ranks-and-launcher", "ranks"])
def test_a_sigterm_to_a_job_before_its_steps_is_one_line(launcher_too, data_dir, tmp_path):
    """Before the steps (the ranks importing, connecting, loading data) the ranks took SIGTERM's default action: the
    launcher said "rank 0 was killed by SIGTERM", the same of rank 1, then "interrupted" (without the launcher's
    own SIGTERM, no "interrupted")."""
    proc = start_two_ranks(data_dir, tmp_path)
    ranks = []
    try:
        deadline = time.time() + 60
        while len(ranks := children(proc.pid)) < 2:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(0.3)  # (importing)
        for pid in ranks + [proc.pid] * launcher_too:
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        kill(ranks + [proc.pid])
    assert not ((tmp_path / "log.jsonl").exists() and logged(tmp_path))  # no step yet
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if not line.startswith("[ring] ")] == ["nanogpt-mlx: interrupted"], err


SLOW_SETUP = """
import os, time
from nanogpt_mlx import data
init = data.DataLoader.__init__
def slow(self, *args, **kwargs):
    open(os.environ["SETUP_MARK"], "a").close()
    time.sleep(30)
    return init(self, *args, **kwargs)
data.DataLoader.__init__ = slow
"""


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_sigterm_while_the_trainer_sets_up_is_one_line(ranks, data_dir, tmp_path):
    """A SIGTERM while the Trainer sets up (reading a checkpoint, the data) ended the command by SIGTERM's default
    action: silently in one process, "rank 0 was killed by SIGTERM" and the same of rank 1 with several."""
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "sitecustomize.py").write_text(SLOW_SETUP)
    mark = tmp_path / "setting-up"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "sc"), os.environ.get("PYTHONPATH")])),
           "SETUP_MARK": str(mark)}
    proc = start_two_ranks(data_dir, tmp_path / "run", env=env, args=["--ranks", ranks])
    pids = []
    try:
        deadline = time.time() + 60
        while not mark.exists():
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(0.2)  # (every rank in its setup)
        pids = children(proc.pid) + [proc.pid]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        kill(pids + [proc.pid])
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if not line.startswith("[ring] ")] == ["nanogpt-mlx: interrupted"], err


def test_the_ranks_launcher_started_under_nohup_trains_on_after_a_sighup(data_dir, tmp_path):
    """nohup's ignored SIGHUP stays ignored: a closed terminal does not stop the ranks."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path, args=["--max-steps", "40"],
                                   preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=120)
    finally:
        kill(ranks + [proc.pid])
    assert proc.returncode == 0 and "interrupted" not in err, err
    assert len(logged(tmp_path)) == 40


# Loaded by `train --ranks 2`'s ranks (sitecustomize.py on PYTHONPATH): rank FAIL_RANK reads a bad shard at its third
# train batch (FAIL=shard), is killed in its second validation (FAIL=kill) or fails it (FAIL=val); rank 0's saves
# take SAVE_SLEEP s more (between writing the files SAVE_MARK and SAVE_MARK.done, where set), its second validation
# VAL_SLEEP s more.
INJECTED = """
import os, signal, time
rank = os.environ.get("MLX_RANK")
if rank is not None:
    from nanogpt_mlx import checkpoint, evaluations, train
    from nanogpt_mlx.errors import UserError
    calls, fail = [], os.environ.get("FAIL") if rank == os.environ.get("FAIL_RANK") else None
    read, loss, write = train.DataLoader.next_batch, evaluations.loader_loss, checkpoint.save_model

    def next_batch(self):
        if fail == "shard" and "train" in self.shards[0].name:
            calls.append(1)
            if len(calls) == 3:
                raise UserError(f"{self.shards[0]}: bad tokens (a test's)")
        return read(self)

    def loader_loss(*args, **kwargs):
        calls.append(1)
        if fail == "kill" and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if fail == "val" and len(calls) == 2:
            raise RuntimeError("[Compile::eval_cpu] Failed to compile")
        if rank == "0" and len(calls) == 2:
            time.sleep(float(os.environ.get("VAL_SLEEP", "0")))
        return loss(*args, **kwargs)

    def save_model(*args, **kwargs):
        if rank == "0":
            mark = os.environ.get("SAVE_MARK")  # a file that says when the save's sleep starts and ends
            if mark:
                open(mark, "w").close()
            time.sleep(float(os.environ.get("SAVE_SLEEP", "0")))
            if mark:
                open(mark + ".done", "w").close()
        return write(*args, **kwargs)

    train.DataLoader.next_batch, evaluations.loader_loss, checkpoint.save_model = (next_batch, loader_loss,
                                                                                 save_model)
"""


def injected(tmp_path: Path, **env: str) -> dict[str, str]:
    """The environment of a `train --ranks 2` whose ranks load INJECTED with these settings."""
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "sitecustomize.py").write_text(INJECTED)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "sc"), os.environ.get("PYTHONPATH")])), **env}


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_stop_for_one_ranks_error_ends_every_rank_with_that_error(rank, data_dir, tmp_path):
    """A bad shard on one rank (or rank 0's stdout on a full disk) stopped the ranks at an agreed step with a save,
    but the others stopped as if interrupted: "interrupted" said, and status 130 where rank 1 read the shard."""
    out = tmp_path / "run"
    proc = start_two_ranks(data_dir, out, env=injected(tmp_path, FAIL="shard", FAIL_RANK=rank),
                           args=["--max-steps", "6"])
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    (line,) = err.strip().splitlines()
    assert "bad tokens (a test's); saved" in line and "(step 2): repair that shard" in line, err
    # the resume said is one that is taken: without its ranks, it was refused ("resume it with ... --ranks 2")
    assert line.endswith(f"then --resume {out} on the same 2 ranks"), line
    assert "interrupted" not in stdout + err
    assert [p.name for p in checkpoints(out)] == ["ckpt-000002"]


def test_a_rank_lost_in_an_evaluation_leaves_rank_0_to_finish_its_save(data_dir, tmp_path):
    """Rank 1 killed amid a validation: rank 0 lost its peer and saved the steps before it, but the launcher stops
    the rest of a failed group 5 s on (SIGTERM, unhandled with several ranks): a longer save was cut off, leaving
    its temporary directory and no checkpoint. A SIGTERM waits for the save in progress now."""
    out = tmp_path / "run"
    proc = start_two_ranks(data_dir, out, env=injected(tmp_path, FAIL="kill", FAIL_RANK="1", SAVE_SLEEP="8"),
                           args=["--max-steps", "6", "--val-every", "2", "--val-steps", "2"])
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, err
    ours = [line for line in err.splitlines() if not line.startswith("[ring] ")]  # (MLX's own, unconditional)
    assert ours == ["nanogpt-mlx: error: rank 1 was killed by SIGKILL (out of memory?)"], err
    assert f"evaluation failed: saved {out / 'ckpt-000002'} (step 2)" in stdout
    assert [p.name for p in checkpoints(out)] == ["ckpt-000002"] and not list(out.glob(".*.tmp*"))


def test_a_rank_whose_evaluation_failed_waits_for_the_others_longer_than_the_timeout(data_dir, tmp_path):
    """Rank 1's validation failed at once and it waited for rank 0's, longer than a step, in the ranks' agreement
    under a step's limit: its watchdog ended it with "no answer from the other ranks", the evaluation's error unsaid,
    and rank 0 was stopped before its save."""
    out = tmp_path / "run"
    env = injected(tmp_path, FAIL="val", FAIL_RANK="1", VAL_SLEEP="8", NANOGPT_MLX_DIST_TIMEOUT="4")
    proc = start_two_ranks(data_dir, out, env=env, args=["--max-steps", "6", "--val-every", "2", "--val-steps", "2"])
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == ["nanogpt-mlx: error: rank 1: [Compile::eval_cpu] Failed to compile; stopping"]
    assert f"evaluation failed: saved {out / 'ckpt-000002'} (step 2)" in stdout


def test_the_ranks_wait_for_a_save_longer_than_the_collective_timeout(data_dir, tmp_path):
    """Rank 1 waited for rank 0's periodic save in the next step's first collective, whose limit is a step's
    (NANOGPT_MLX_DIST_TIMEOUT): "no answer from the other ranks", and rank 0 stopped amid its save."""
    out = tmp_path / "run"
    proc = start_two_ranks(data_dir, out, env=injected(tmp_path, SAVE_SLEEP="10", NANOGPT_MLX_DIST_TIMEOUT="5"),
                           args=["--max-steps", "4", "--checkpoint-every", "2"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert [p.name for p in checkpoints(out)] == ["ckpt-000002", "ckpt-000004"]


def test_ranks_whose_stdout_reader_ended_save_a_checkpoint(data_dir, tmp_path):
    """`train --ranks 2 | head`: rank 0 stops as on Ctrl-C and the ranks agree on a step, but rank 1, done first,
    exited with 130 and the launcher stopped rank 0 (SIGTERM, no handler with several ranks) amid its save."""
    # a model whose save takes a while (wte 50304 x 256, 154 MB with its AdamW moments): the launcher's SIGTERM came
    # within 0.1 s of rank 1's end
    proc, ranks = launch_two_ranks(data_dir, tmp_path, args=["--vocab-size", "50304", "--n-embd", "256",
                                                             "--n-head", "4"])
    proc.stdout.close()  # the reader is gone: rank 0's next line fails
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "Traceback" not in err, err
    (saved,) = sorted(tmp_path.glob("ckpt-*"))
    assert int(saved.name[5:]) == len(logged(tmp_path)) and (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*.tmp*")) and all(map(gone, ranks))


def test_the_watchdog_allows_three_times_the_slowest_sync(monkeypatch):
    """A sync waits for this rank's own micro-step too: a step slower than the timeout (gpt2-124m on a slow CPU) was
    reported as a lost peer."""
    import mlx.core as mx

    from nanogpt_mlx import distributed

    limits = []

    class Recorder:
        def __init__(self, seconds, message):
            limits.append((seconds, message))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(distributed, "watchdog", Recorder)
    dist = distributed.Dist(rank=1, world=2, timeout=100)
    dist.sync(mx.array(1.0))
    dist.slowest = 50.0
    dist.sync(mx.array(1.0))
    assert [s for s, _ in limits] == [100, 150] and "raise NANOGPT_MLX_DIST_TIMEOUT" in limits[1][1]
    assert dist.slowest == 50.0
    # a wait of 100 s for another rank's save (a barrier) is no step: it does not lengthen the next limit
    clock = iter(range(0, 10**6, 100))
    monkeypatch.setattr(distributed.time, "monotonic", lambda: float(next(clock)))
    dist.sync(mx.array(1.0), at_least=1800)
    dist.sync(mx.array(1.0))
    assert [s for s, _ in limits[2:]] == [1800, 150]


def state(pid: int) -> str:
    """A process's state letter: R, S, T (stopped), ..."""
    from nanogpt_mlx.launch import process_state

    return process_state(pid)


def suspend(proc: subprocess.Popen, ranks: list[int]) -> None:
    """Ctrl-Z: the launcher and its ranks stop."""
    proc.send_signal(signal.SIGTSTP)
    deadline = time.time() + 10
    while not all(state(pid) == "T" for pid in [proc.pid, *ranks]):
        assert time.time() < deadline, [state(pid) for pid in [proc.pid, *ranks]]
        time.sleep(0.1)


def test_ctrl_z_suspends_the_ranks_with_their_launcher(data_dir, tmp_path):
    """Longer than the collective timeout too: the stopped time does not count (the watchdog ended the run)."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path, env={"NANOGPT_MLX_DIST_TIMEOUT": "3"})
    suspend(proc, ranks)
    time.sleep(8)
    steps = len(logged(tmp_path))
    proc.send_signal(signal.SIGCONT)  # as `fg` does
    deadline = time.time() + 30
    while len(logged(tmp_path)) < steps + 2:  # training goes on
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert len(sorted(tmp_path.glob("ckpt-*"))) == 1


@pytest.mark.parametrize("suspended", [False, True])
def test_ranks_whose_launcher_was_killed_stop_with_a_checkpoint(suspended, data_dir, tmp_path):
    """Also after Ctrl-Z: the ranks stayed stopped for good, holding OUT's lock."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path)
    if suspended:
        suspend(proc, ranks)
    proc.kill()
    _, err = proc.communicate()  # the ranks' output: they share the launcher's stderr
    deadline = time.time() + 60
    while not all(map(gone, ranks)):
        assert time.time() < deadline, "the ranks trained on without their launcher"
        time.sleep(0.2)
    saved = sorted(tmp_path.glob("ckpt-*"))
    assert len(saved) == 1, err
    (saved,) = saved
    assert int(saved.name[5:]) == len(logged(tmp_path))
    assert err.count("nanogpt-mlx: interrupted") == 1, err  # not one from each rank


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_lost_rank_ends_the_launcher_with_one_line(how, data_dir, tmp_path):
    """A rank killed (the OOM killer) or frozen: the launcher says so and exits, as a shell reports a killed process;
    a frozen rank's launcher waited for it forever."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path, env={"NANOGPT_MLX_DIST_TIMEOUT": "10"})
    os.kill(ranks[1], signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    _, err = proc.communicate(timeout=90)
    errors = [line for line in err.splitlines() if line.startswith("nanogpt-mlx: error:")]
    if how == "kill":
        assert proc.returncode == 137 and any("was killed by SIGKILL" in e for e in errors), err
    else:
        assert proc.returncode != 0 and any(re.search(r"no answer from the other ranks in \d+ s", e)
                                            for e in errors), err
    assert "Traceback" not in err and all(map(gone, ranks))


def test_a_ctrl_c_kills_a_frozen_rank_at_once(data_dir, tmp_path):
    """A frozen rank cannot agree on a stop: rank 0 waited for it in a collective until the timeout (300 s)."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path)
    os.kill(ranks[1], signal.SIGSTOP)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rank 1 was stopped (frozen)" in err and all(map(gone, ranks)), err


def test_a_ctrl_c_after_a_rank_froze_still_ends_the_launcher(data_dir, tmp_path):
    """Rank 1 frozen, rank 0 ended by its watchdog, then Ctrl-C while the launcher gave the frozen rank time to end:
    the Ctrl-C called off stopping it, and the launcher waited for it forever."""
    proc, ranks = launch_two_ranks(data_dir, tmp_path, env={"NANOGPT_MLX_DIST_TIMEOUT": "3"})
    os.kill(ranks[1], signal.SIGSTOP)
    deadline = time.time() + 60
    while not gone(ranks[0]):  # its watchdog ends it
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "rank 1 was stopped (frozen)" in err and all(map(gone, ranks)), err


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "1e30"])  # 1e30: beyond a thread's wait
def test_a_bad_collective_timeout_is_one_line(value, data_dir, tmp_path):
    from conftest import assert_one_line_error, run_cli

    proc = run_cli("train", "--data", str(data_dir), "--out", str(tmp_path), "--max-steps", "1",
                   env={"NANOGPT_MLX_DIST_TIMEOUT": value})
    assert_one_line_error(proc, f"NANOGPT_MLX_DIST_TIMEOUT={value!r}: expected a number of seconds > 0")


def has_socket(pid: int) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fds.iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return any(link.startswith("socket:") for link in links)


@pytest.mark.skipif(sys.platform != "linux", reason="has_socket reads /proc")
def test_ctrl_c_while_connecting_ends_a_rank_at_once(data_dir, tmp_path):
    """MLX's ring connect retries for about 30 s inside C++, where Python's Ctrl-C handler cannot run."""
    cfg = tiny_config(data_dir, tmp_path, max_steps=10)
    (alone,) = start_ranks(tmp_path, cfg, 1, cli=True, env={"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile(tmp_path, 2))})
    deadline = time.time() + 60
    while not has_socket(alone.pid):  # imported and connecting to a rank 1 that never comes
        assert time.time() < deadline and alone.poll() is None, alone.stderr.read()
        time.sleep(0.1)
    time.sleep(1.0)  # well into the connect's retries
    alone.send_signal(signal.SIGINT)
    start = time.time()
    alone.communicate(timeout=60)
    assert time.time() - start < 5 and alone.returncode == -signal.SIGINT


def test_the_timeout_holds_while_a_rank_connects(data_dir, tmp_path):
    """MLX's connect holds the GIL, so the watchdog thread never ran: rank 0's port held by a process that accepts and
    says nothing kept rank 1 waiting forever (and a refused connect took MLX's 30 s, whatever the timeout)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    hosts = json.loads(hostfile(tmp_path, 2).read_text())
    hosts[0] = [f"127.0.0.1:{silent.getsockname()[1]}"]
    (tmp_path / "hosts.json").write_text(json.dumps(hosts))
    cfg = tiny_config(data_dir, tmp_path, max_steps=10)
    env = {"MLX_RANK": "1", "MLX_HOSTFILE": str(tmp_path / "hosts.json"), "NANOGPT_MLX_DIST_TIMEOUT": "2"}
    (alone,) = start_ranks(tmp_path, cfg, 1, cli=True, env=env)
    try:
        _, err = alone.communicate(timeout=60)
    finally:
        alone.kill()
        silent.close()
    assert alone.returncode == -signal.SIGKILL, err
    assert err.splitlines() == ["nanogpt-mlx: error: could not connect to the other ranks within 2 s"]


def test_a_ranks_connect_timeout_ends_the_launch_with_one_line(data_dir, tmp_path):
    """Rank 1 never connects (stuck in its start): rank 0's watchdog says so and kills it, and the launcher says that
    line alone (no "killed by SIGKILL"), stops rank 1 and exits with status 1."""
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('MLX_RANK') == '1':\n    time.sleep(120)\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "sc"), os.environ.get("PYTHONPATH")]))
    start = time.time()
    proc = start_two_ranks(data_dir, tmp_path / "run", env={"PYTHONPATH": path, "NANOGPT_MLX_DIST_TIMEOUT": "2"})
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        kill(children(proc.pid) + [proc.pid])
    assert proc.returncode == 1 and time.time() - start < 60, err  # (the connect's 2 s, END_GRACE, imports)
    assert err.splitlines() == ["nanogpt-mlx: error: could not connect to the other ranks within 2 s"], err


CONNECT_SCRIPT = """
import os, subprocess
import nanogpt_mlx
from nanogpt_mlx import distributed
distributed.init()
print(subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True).stdout.split())
"""


def test_a_connected_rank_keeps_no_watchdog_process(tmp_path):
    hosts, script = hostfile(tmp_path, 2), tmp_path / "connect.py"
    script.write_text(CONNECT_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)}) for r in range(2)]
    assert [out.strip() for out in finish(procs, timeout=120)] == ["[]", "[]"]


class Ended:
    """A rank's process as the launcher polls it: ended with status rc (None: still running)."""

    pid = os.getpid()  # a running process: not frozen

    def __init__(self, rc: int | None):
        self.rc = rc

    def poll(self) -> int | None:
        return self.rc


def test_a_ctrl_c_during_the_last_save_that_the_ranks_finished_ends_the_launch_with_0(tmp_path, capsys):
    """The ranks finish a save that a Ctrl-C came during, then exit 0 ("done"): as a single process does; the
    launcher said "interrupted" and exited with 130."""
    from nanogpt_mlx import launch

    ranks = launch._Ranks(tmp_path)
    ranks.interrupt(signal.SIGINT)  # (no live rank to forward it to)
    ranks.live = {0: Ended(0), 1: Ended(0)}
    ranks.poll()
    assert ranks.status() == 0 and capsys.readouterr().err == ""


def test_a_rank_killed_amid_a_ctrl_c_is_said(tmp_path, capsys):
    """The OOM killer's SIGKILL to rank 1 while the ranks stopped for a Ctrl-C: nothing said it."""
    from nanogpt_mlx import launch

    ranks = launch._Ranks(tmp_path)
    ranks.interrupt(signal.SIGINT)  # (no live rank to forward it to)
    ranks.live = {0: Ended(-signal.SIGINT), 1: Ended(-signal.SIGKILL)}  # rank 0: Ctrl-C'd as Python started
    ranks.poll()
    assert ranks.status() == 130
    assert capsys.readouterr().err.splitlines() == [
        "nanogpt-mlx: error: rank 1 was killed by SIGKILL (out of memory?)", "nanogpt-mlx: interrupted"]


@pytest.mark.parametrize("said", ["connect", "error"])
def test_a_rank_killed_after_its_last_line_is_said_unless_its_watchdog_killed_it(said, tmp_path, capsys):
    """A rank SIGKILLed after it wrote a last line was taken for one that its connect's watchdog killed, whose line
    says why: status 1, and an OOM kill after the rank's own error line lost its "killed by SIGKILL" (status 137)."""
    from nanogpt_mlx import launch

    line = {"connect": "nanogpt-mlx: error: could not connect to the other ranks within 2 s",
            "error": "nanogpt-mlx: error: rank 0: a bad shard"}[said]
    (tmp_path / "rank0.lines").write_text(line + "\n")
    ranks = launch._Ranks(tmp_path)
    ranks.live = {0: Ended(-signal.SIGKILL)}
    ranks.poll()
    err = capsys.readouterr().err.splitlines()
    if said == "connect":
        assert ranks.status() == 1 and err == [line]
    else:
        assert ranks.status() == 128 + signal.SIGKILL
        assert err == [line, "nanogpt-mlx: error: rank 0 was killed by SIGKILL (out of memory?)"]


LOST = "nanogpt-mlx: error: rank 0: lost a peer rank ([ring] connection lost)"
RANK_1_ERROR = "nanogpt-mlx: error: rank 1: [Compile::eval_cpu] Failed to compile; stopping"


@pytest.mark.parametrize("case", ["killed in the same poll", "error a poll later", "no cause said", "peer failed"])
def test_a_rank_that_only_follows_its_peers_end_is_said_only_without_a_cause(case, tmp_path, capsys):
    """Rank 1 killed and rank 0 ended by the lost connection, seen in one poll: rank 0's "lost a peer rank" came
    first, as if it were the cause, then "rank 1 was killed" (1 run in 4); and shown before the cause whenever rank 0
    ended a poll earlier than the rank whose error it followed from. Such a line is said at the end now, and only if
    nothing said why the run ended."""
    from nanogpt_mlx import launch

    rank0 = "nanogpt-mlx: error: rank 0: stopping: the evaluation failed on another rank" if case == "peer failed" \
        else LOST
    (tmp_path / "rank0.lines").write_text(rank0 + "\n")
    if case not in ("killed in the same poll", "no cause said"):  # (rank 1 ended with status 1, saying nothing)
        (tmp_path / "rank1.lines").write_text(RANK_1_ERROR + "\n")
    ranks = launch._Ranks(tmp_path)
    rank1 = Ended(-signal.SIGKILL if case == "killed in the same poll" else None)
    ranks.live = {0: Ended(1), 1: rank1}
    capsys.readouterr()
    ranks.poll()
    rank1.rc = rank1.rc or 1
    ranks.poll()
    assert ranks.status() == (128 + signal.SIGKILL if case == "killed in the same poll" else 1)
    said = capsys.readouterr().err.strip().splitlines()
    assert said == {"killed in the same poll": ["nanogpt-mlx: error: rank 1 was killed by SIGKILL (out of memory?)"],
                    "no cause said": [LOST]}.get(case, [RANK_1_ERROR])


def test_the_connect_watch_kills_a_stuck_rank_where_it_cannot_say_why():
    """The watch's line into a gone directory (or a full disk) raised, and the rank it watched was left stuck."""
    stuck = ("import os, subprocess, sys, time\nimport nanogpt_mlx\nfrom nanogpt_mlx import distributed\n"
             "watch = subprocess.Popen([sys.executable, '-I', '-S', '-c', distributed._CONNECT_WATCH, '1', "
             "str(os.getpid()), 'why', '/nonexistent/dir/rank0.lines'], stdin=subprocess.PIPE)\ntime.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=50)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
