"""The peak-memory estimate against real compiled steps on the CPU, and the refusal before an OOM."""

from __future__ import annotations

import contextlib
import gc
import io
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from nanogpt_mlx import GPTConfig, device, memory
from nanogpt_mlx.errors import UserError
from nanogpt_mlx.config import TrainConfig
from nanogpt_mlx.train import Trainer


def shards(tmp_path, n: int, vocab: int = 50257):
    rng = np.random.default_rng(0)
    for name in ("x_val_000000.npy", "x_train_000001.npy"):
        np.save(tmp_path / name, rng.integers(0, min(vocab, 50257), n).astype(np.uint16))
    return tmp_path


@pytest.mark.skipif(not device.PROFILE.cpu_backend, reason="the bounds are fitted to MLX's CPU backend's peaks")
@pytest.mark.parametrize("L, C, nh, B, T, checkpointing, recipe, V, above, dtype",
                         [(4, 128, 4, 8, 128, False, "build-nanogpt", 50304, 1.5, "float32"),
                          (4, 256, 4, 8, 256, False, "build-nanogpt", 50304, 1.5, "float32"),
                          (6, 384, 6, 4, 512, True, "build-nanogpt", 50304, 1.75, "float32"),
                          (4, 256, 4, 8, 256, False, "speedrun", 50304, 1.5, "float32"),
                          (4, 128, 4, 8, 256, False, "build-nanogpt", 512, 1.5, "float32"),
                          (8, 128, 4, 8, 256, True, "build-nanogpt", 512, 1.5, "float32"),
                          (8, 128, 4, 8, 256, False, "build-nanogpt", 512, 1.5, "bfloat16")])
def test_estimate_covers_a_measured_step_and_is_not_far_above_it(tmp_path, L, C, nh, B, T, checkpointing, recipe, V,
                                                                 above, dtype):
    """The estimate is the peak with MLX's host as far ahead of the CPU worker as it goes (outputs are allocated
    when an op is queued). A measured peak is lower whenever the host fell behind, and the head queues less ahead
    when it has few chunks, so the estimate may sit well above a measurement but must never be below one: at most
    `above` times it. The checkpointed step's peak sits lowest against its estimate (the same head as the others,
    over a smaller rest, and the head's share depends most on how far the host queued ahead): 1.51-1.66x. Both
    recipes: the speedrun's soft-capped head keeps more. A small vocab shows the layers' part alone, which a GPT-2
    vocab's head hid: the estimate was 0.83x the peak without checkpointing, 0.43x with it (MLX kept every block's
    recomputation, model.checkpoint). Each case is measured alone: the arrays of earlier cases are collected first
    (they once counted in the third case's peak). In bfloat16, on one thread, the GELU's float32 graph
    (Profile.saved_float32) made a peak above the estimate."""
    data = shards(tmp_path, B * T * 4 + 1, V)
    cfg = TrainConfig(recipe=recipe, data=str(data), out=str(tmp_path / "out"), n_layer=L, n_head=nh, n_embd=C,
                      block_size=T, vocab_size=V, batch_size=B, seq_len=T, total_batch_size=B * T, max_steps=3,
                      warmup_steps=1, val_every=0, sample_every=0, hellaswag_every=0, checkpoint_every=0,
                      dtype=dtype, activation_checkpointing=checkpointing, threads=1 if dtype == "bfloat16" else 0)
    gc.collect()  # the trainers of earlier cases would count in this one's peak
    mx.clear_cache()
    mx.reset_peak_memory()
    trainer = Trainer(cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    measured = mx.get_peak_memory()
    print(f"\n{recipe} L{L} d{C} B{B}xT{T} V{V} ckpt={checkpointing}: estimated {trainer.memory.total / 1e6:.0f} MB, "
          f"measured {measured / 1e6:.0f} MB")
    assert 1.0 < trainer.memory.total / measured < above


@pytest.mark.parametrize("recipe", ["build-nanogpt", "speedrun"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_estimates_model_and_optimizer_terms_are_the_models_parameters(recipe, dtype):
    """Parameters as the model has them (GPT-2 124M's 124,439,808 at vocab 50257), float32 masters plus a
    compute-dtype copy, the optimizer's state as it holds it (AdamW's two float32 moments, Muon's one: the
    speedrun's estimate counted two for every parameter), a float32 gradient sum plus one micro-step's gradients."""
    from mlx.utils import tree_flatten

    from nanogpt_mlx import GPT, recipes

    recipe = recipes.get(recipe)
    config = GPTConfig(vocab_size=50257, n_layer=3, n_head=4, n_embd=64, **recipe.model)
    model = GPT(config)
    params = sum(p.size for _, p in tree_flatten(model.parameters()))
    optimizer = recipe.make_optimizer(TrainConfig(recipe=recipe.name), mx.float32)
    optimizer.init(model.trainable_parameters())
    state = sum(a.nbytes for _, a in tree_flatten(optimizer.state) if a.size > 1)  # (not the scalar settings)
    assert recipe.name != "build-nanogpt" or sum(p.size for _, p in tree_flatten(
        GPT(GPTConfig(vocab_size=50257)).parameters())) == 124_439_808
    optimizer_memory = recipe.memory(config)
    assert (optimizer_memory.one_moment > 0) == (recipe.name == "speedrun")
    est = memory.estimate(config, 1, 64, dtype, optimizer=optimizer_memory)
    b = 2 if dtype == "bfloat16" else 4
    assert (est.params, est.optimizer, est.gradients) == (params, state, (4 + b) * params)
    assert est.weights == (4 if b == 4 else 6) * params


def test_a_step_within_10_percent_of_the_limit_is_warned_of(capsys):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, block_size=64)
    need = memory.estimate(cfg, 4, 64, "float32").total
    memory.check(cfg, 4, 64, "float32", False, max_memory_gb=need / 0.85 / 1e9)
    assert capsys.readouterr().err == ""
    memory.check(cfg, 4, 64, "float32", False, max_memory_gb=need / 0.95 / 1e9)
    assert "close to --max-memory" in capsys.readouterr().err


def test_checkpointing_and_bfloat16_lower_the_estimate():
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    fp32 = memory.estimate(cfg, 16, 1024, "float32")
    bf16 = memory.estimate(cfg, 16, 1024, "bfloat16", profile=device.PROFILES["cuda"])
    ckpt = memory.estimate(cfg, 16, 1024, "bfloat16", True, profile=device.PROFILES["cuda"])
    assert ckpt.activations < bf16.activations < fp32.activations
    assert memory.largest_batch(cfg, 1024, "bfloat16", True, 16e9, device.PROFILES["metal"]) >= \
        memory.largest_batch(cfg, 1024, "bfloat16", False, 16e9, device.PROFILES["metal"])


def test_a_max_memory_past_the_device_that_lets_a_step_start_is_warned_of(capsys, monkeypatch):
    """--max-memory 100 on a 25 GB machine: a step of 30 GB passed the check, silently, and crashed (or swapped)."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, block_size=64)
    need = memory.estimate(cfg, 4, 64, "float32").total
    monkeypatch.setattr(device, "memory_bytes", lambda: int(need / 2))
    memory.check(cfg, 4, 64, "float32", False, max_memory_gb=4 * need / 1e9)
    assert f"more than this device's {need / 2e9:.1f} GB: --max-memory {4 * need / 1e9:g} GB lets it start" in \
        capsys.readouterr().err
    monkeypatch.setattr(device, "memory_bytes", lambda: int(2 * need))  # the step fits the device: no warning
    memory.check(cfg, 4, 64, "float32", False, max_memory_gb=4 * need / 1e9)
    assert capsys.readouterr().err == ""


def test_a_run_that_cannot_fit_is_refused_with_advice(monkeypatch):
    """A smaller batch, and activation checkpointing where it fits a larger one than that (the CPU's estimate; on
    a Metal GPU the head's 2048 rows of logits take most of the 8 GB, which checkpointing does not shrink)."""
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    monkeypatch.setattr(device, "PROFILE", device.PROFILES["cpu-x86"])
    with pytest.raises(UserError, match="--batch-size 2 fits.*--activation-checkpointing fits --batch-size 16"):
        memory.check(cfg, 16, 1024, "float32", False, max_memory_gb=8)
    monkeypatch.setattr(device, "PROFILE", device.PROFILES["metal"])
    with pytest.raises(UserError, match="--batch-size 2 fits [^;]*$"):  # it advised checkpointing at batch 2 too
        memory.check(cfg, 16, 1024, "float32", False, max_memory_gb=8)


def test_a_resumed_run_is_advised_only_what_it_may_change(monkeypatch):
    """A resumed run keeps its batches (the data position counts them): --batch-size was advised, which the resume
    then refused."""
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    monkeypatch.setattr(device, "PROFILE", device.PROFILES["cpu-x86"])
    with pytest.raises(UserError, match="; --activation-checkpointing fits it$"):
        memory.check(cfg, 16, 1024, "float32", False, max_memory_gb=8, batch_fixed=True)
    with pytest.raises(UserError, match="; a resumed run keeps its model and batches: continue it with a larger "
                                        "--max-memory, or start a new run from its weights \\(--init-from\\) with a "
                                        "smaller --batch-size$"):
        memory.check(cfg, 16, 1024, "float32", True, max_memory_gb=4, batch_fixed=True)


def test_the_batch_advised_divides_a_steps_rows():
    """12 rows a step, and 8 of them too many: --batch-size 8 was advised, which total_batch_size then refused."""
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    limit = (memory.estimate(cfg, 6, 256, "float32").total + memory.estimate(cfg, 8, 256, "float32").total) / 2
    with pytest.raises(UserError, match="--batch-size 6 fits"):
        memory.check(cfg, 12, 256, "float32", False, max_memory_gb=limit / 1e9, rows=12)
    with pytest.raises(UserError, match="--batch-size 4 fits"):  # without rows: a power of two
        memory.check(cfg, 12, 256, "float32", False, max_memory_gb=limit / 1e9)


def test_the_batch_advised_is_estimated_with_the_step_threads_it_would_run_on():
    """Batch 3 runs on gcd(3, 2) = 1 step thread and batch 2 on 2, which keep more: --batch-size 2 was advised from
    its one-thread estimate, then refused; and with --threads 4, --batch-size 2 (which 4 threads cannot split)."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, block_size=64)
    one, two = (memory.estimate(cfg, 2, 64, "float32", threads=n).total for n in (1, 2))
    with pytest.raises(UserError, match="--batch-size 1 fits"):
        memory.check(cfg, 3, 64, "float32", False, max_memory_gb=(one + two) / 2e9, threads=2)
    limit = (memory.estimate(cfg, 2, 64, "float32", threads=2).total +
             memory.estimate(cfg, 4, 64, "float32", threads=4).total) / 2
    with pytest.raises(UserError, match="choose a smaller model"):
        memory.check(cfg, 8, 64, "float32", False, max_memory_gb=limit / 1e9, threads=4, fixed_threads=True)


def test_the_largest_batch_that_fits_is_advised_where_a_smaller_one_does_not():
    """With the device's step threads the estimate does not grow with the batch: batch 2 runs on 2 threads, which
    keep a float32 copy of the gradients more than batch 3 on gcd(3, 2) = 1. The search stopped at batch 2 and
    advised --batch-size 1, where 3 fits."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=4096, block_size=64)  # the update is the peak
    two, three = (memory.estimate(cfg, b, 16, "float32", threads=n).total for b, n in ((2, 2), (3, 1)))
    assert three < two
    limit = (two + three) / 2
    assert memory.largest_batch(cfg, 16, "float32", False, limit, threads=2, rows=6) == 3
    with pytest.raises(UserError, match="--batch-size 3 fits"):
        memory.check(cfg, 6, 16, "float32", False, max_memory_gb=limit / 1e9, threads=2, rows=6)


def test_fewer_step_threads_are_advised_where_they_fit():
    """Each step thread past the first keeps a float32 copy of the gradients: a run that fits on fewer threads was
    told to choose a smaller model (or, resumed, a larger --max-memory), though --threads may change on resume."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=128, vocab_size=4096, block_size=64)
    one, two, four = (memory.estimate(cfg, 4, 16, "float32", threads=n).total for n in (1, 2, 4))
    assert one < two < four
    for fixed in (False, True):  # the device's 2 threads, or --threads 2
        with pytest.raises(UserError, match="; --threads 1 fits it$"):
            memory.check(cfg, 4, 16, "float32", False, max_memory_gb=(one + two) / 2e9, threads=2,
                         fixed_threads=fixed, batch_fixed=True)
    with pytest.raises(UserError, match="; --threads 2 fits it$"):  # the most threads that fit
        memory.check(cfg, 4, 16, "float32", False, max_memory_gb=(two + four) / 2e9, threads=4, fixed_threads=True,
                     batch_fixed=True)


def test_ranks_on_one_machine_share_its_memory(tmp_path, monkeypatch):
    """`--ranks N` starts N processes on this machine: each was checked against all of its memory."""
    from nanogpt_mlx import device
    from nanogpt_mlx.distributed import Dist

    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    need = memory.estimate(cfg, 4, 1024, "float32", False).total
    monkeypatch.setattr(device, "memory_bytes", lambda: int(1.5 * need))
    memory.check(cfg, 4, 1024, "float32", False)
    with pytest.raises(UserError, match="this device's memory split among its 2 ranks; --batch-size 2 fits"):
        memory.check(cfg, 4, 1024, "float32", False, share=2)
    shares = []
    monkeypatch.setattr(memory, "check", lambda *a, share=1, **k: shares.append(share) or pytest.fail("checked"))
    train_cfg = TrainConfig.preset("shakespeare", data=str(shards(tmp_path, 10_000)), out=str(tmp_path / "out"))
    with pytest.raises(pytest.fail.Exception):
        Trainer(train_cfg, dist=Dist(local=2))
    assert shares == [2]


def test_cli_refuses_before_training(tmp_path):
    data = shards(tmp_path, 10_000)
    proc = run_cli("train", "--preset", "shakespeare", "--data", str(data), "--out", str(tmp_path / "out"),
                   "--max-memory", "0.05")
    assert_one_line_error(proc, "more than --max-memory 0.05 GB")
    assert not (tmp_path / "out" / "log.txt").exists()


def test_a_new_model_is_refused_before_it_is_built(tmp_path, monkeypatch):
    """A model far too large takes minutes to build: the estimate needs its config only."""
    import nanogpt_mlx.train as train

    monkeypatch.setattr(train, "GPT", lambda *a, **k: pytest.fail("the model was built"))
    cfg = TrainConfig.preset("shakespeare", data=str(shards(tmp_path, 10_000)), out=str(tmp_path / "out"),
                          n_layer=100_000)
    with pytest.raises(UserError, match="a step of batch .* needs"):
        Trainer(cfg)


def test_max_memory_caps_mlx_allocations(tmp_path):
    """--max-memory also becomes MLX's memory limit while training, under which a step that fits still runs; the
    limit before is back after (it stayed for the rest of the process, also after a refused start)."""
    data = shards(tmp_path, 8 * 128 * 3 + 1)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "out"), n_layer=2, n_head=4, n_embd=128, block_size=128,
                      vocab_size=50304, batch_size=8, seq_len=128, total_batch_size=8 * 128, max_steps=2,
                      warmup_steps=1, val_every=0, sample_every=0, hellaswag_every=0, checkpoint_every=0,
                      dtype="float32", max_memory=3.0)
    previous = mx.get_memory_limit()
    try:
        trainer = Trainer(cfg)
        assert mx.get_memory_limit() == previous
        limits, finish = [], trainer.queue.finish
        trainer.queue.finish = lambda step: limits.append(mx.get_memory_limit()) or finish(step)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        assert trainer.step == 2 and mx.get_peak_memory() < 3e9
        assert limits == [3_000_000_000] * 2 and mx.get_memory_limit() == previous
    finally:
        mx.set_memory_limit(previous)


def test_cuda_head_holds_two_compute_dtype_logit_matrices():
    """With cuda.py's kernel the head keeps the logits and their gradient in bf16, no float32 N x V array."""
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304)
    cuda = memory.estimate(cfg, 16, 1024, "bfloat16", profile=device.PROFILES["cuda"])
    metal = memory.estimate(cfg, 16, 1024, "bfloat16", profile=device.PROFILES["metal"])
    assert cuda.head == 2 * 16 * 1024 * 50304 * 2 < metal.head


def test_each_step_thread_adds_a_float32_sum_of_the_heads_weight_gradient():
    """A thread whose rows span several GEMM groups sums its weight gradient in float32 (loss.py): 2048 rows in
    chunks of 128, groups of 512, so 1 or 2 threads sum, 4 (512 rows each) do not."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=1000)
    one, two, four = (memory.estimate(cfg, 16, 128, "float32", profile=device.PROFILES["cpu-x86"], threads=n).head
                      for n in (1, 2, 4))
    assert two - one == one - four == 2 * 1000 * 64 * 4


def test_a_measured_cap_holds_memory_near_what_the_work_needs():
    """MLX allocates an op's output when the host queues the op, so a chain of independent 32 MB temporaries peaks
    far above what it needs. Run op by op (memory.start_measuring), its peak is the need; capped just above that
    (memory.cap), the same work peaks within a temporary or two of the cap."""
    gc.collect()  # earlier tests' arrays would count in the need, and in the cap's 10% headroom
    x = mx.random.normal((8_000_000,), key=mx.random.key(0))
    mx.eval(x)
    temp = x.nbytes

    def peak() -> int:
        mx.reset_peak_memory()
        mx.eval(sum(mx.exp(x * (k + 1) * 1e-3).sum() for k in range(60)))
        return mx.get_peak_memory()

    before = mx.get_memory_limit()
    try:
        free = peak()
        memory.start_measuring()
        assert mx.get_memory_limit() == memory.MEASURE_LIMIT
        mx.eval(sum(mx.exp(x * (k + 1) * 1e-3).sum() for k in range(60)))
        need, cap = memory.cap()
        assert cap == int(need * memory.CAP_HEADROOM) and mx.get_memory_limit() == cap
        capped = peak()
        print(f"\nfree {free / 1e6:.0f} MB, need {need / 1e6:.0f} MB, capped {capped / 1e6:.0f} MB")
        assert capped <= cap + 2 * temp < free
        assert memory.cap(max_memory_gb=0.05)[1] == 50_000_000 == mx.get_memory_limit()  # within --max-memory
    finally:
        mx.set_memory_limit(before)


def test_mfus_peak_is_the_fastest_matmul(monkeypatch):
    """On a machine shared with other work the mean matmul reads low: MFU went over 100%."""
    import itertools
    import types

    durations = itertools.cycle([0.3, 0.1, 0.5])  # seconds of each matmul: the second ran unhindered
    clock = [0.0]

    def timed_eval(*arrays):
        clock[0] += next(durations)

    monkeypatch.setattr(mx, "eval", timed_eval)
    monkeypatch.setattr(device, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    n = device.PROFILE.gemm_n if mx.default_device() == mx.gpu else 1024
    assert device.peak_flops.__wrapped__("float32", seconds=1.0) == pytest.approx(2 * n**3 / 0.1)


def test_sizes_below_a_gb_are_said_in_mb():
    """A small model's step needs a few MB, which read "0.00 GB" in the header and the refusals."""
    from nanogpt_mlx.console import size
    assert (size(1_234_567_890), size(999_999_999), size(12_345_678), size(40_000)) == \
        ("1.23 GB", "1000.0 MB", "12.3 MB", "0.0 MB")
    small = memory.Estimate(params=1, weights=2_000_000, optimizer=4_000_000, gradients=3_000_000,
                            activations=1_500_000, head=500_000, update=1_000_000)
    assert small.describe() == "~11.0 MB (weights 2.0, optimizer 4.0, gradients 3.0, activations 1.5, head 0.5)"
    large = memory.Estimate(params=1, weights=500_000_000, optimizer=1_000_000_000, gradients=750_000_000,
                            activations=200_000_000, head=250_000_000, update=2_000_000_000)
    assert large.describe() == "~4.25 GB (weights 0.50, optimizer 1.00, gradients 0.75, update 2.00)"
    assert large.total == 4_250_000_000


def test_a_notebooks_arguments_are_refused_in_one_line_or_taken_as_a_run_takes_them():
    """estimate and largest_batch failed with KeyError '' (a TrainConfig's dtype: the device's), KeyError for
    mx.float32 or "fp16", AttributeError for a TrainConfig, TypeError for batch_size "4", and estimated a batch of
    0; largest_batch's limit is in bytes, not check's GB: limit=8 returned 0, as if nothing fit."""
    from nanogpt_mlx import GPT
    from nanogpt_mlx.config import model_config

    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, block_size=64)
    assert memory.estimate(cfg, 2, 64, "") == memory.estimate(cfg, 2, 64, device.PROFILE.dtype)
    cuda = device.PROFILES["cuda"]
    assert memory.estimate(cfg, 2, 64, "", profile=cuda) == memory.estimate(cfg, 2, 64, cuda.dtype, profile=cuda)
    assert memory.largest_batch(cfg, 64, "", False, 16e9) == memory.largest_batch(cfg, 64, device.PROFILE.dtype,
                                                                                     False, 16e9)
    refused = [(dict(dtype=mx.float32), "dtype must be one of 'float32', 'bfloat16', 'float16' or ''"),
               (dict(dtype="fp16"), "dtype must be one of"),
               (dict(config=TrainConfig()), "config must be the model's GPTConfig, not a TrainConfig: a run's random "
                                              "init is nanogpt_mlx.config.model_config(cfg)"),
               (dict(config=None), "config must be a GPTConfig, got None"),
               (dict(batch_size="4"), "batch_size must be an integer, got '4'"),
               (dict(batch_size=0), "batch_size must be >= 1, got 0"),
               (dict(seq_len=64.0), "seq_len must be an integer"), (dict(threads=0), "threads must be >= 1")]
    for changed, said in refused:
        args = {"config": cfg, "batch_size": 2, "seq_len": 64, "dtype": "float32", **changed}
        with pytest.raises(UserError, match=f"^{re.escape(said)}[^\n]*$"):
            memory.estimate(**args)
        if "batch_size" not in changed:
            args = {k: v for k, v in args.items() if k != "batch_size"}
            with pytest.raises(UserError, match=f"^{re.escape(said)}[^\n]*$"):
                memory.largest_batch(**args, checkpointing=False, limit=16e9)
    for limit in (8, 0.5, float("nan"), "8e9"):
        with pytest.raises(UserError, match=r"^limit is in bytes \(8 GB is 8e9\)"):
            memory.largest_batch(cfg, 64, "float32", False, limit)
    with pytest.raises(UserError, match="rows must be >= 0"):
        memory.largest_batch(cfg, 64, "float32", False, 16e9, rows=-1)
    # the refusal's way from a TrainConfig to its model's GPTConfig
    train = TrainConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, recipe="speedrun")
    assert memory.estimate(model_config(train), 2, 64, train.dtype).params == GPT(model_config(train)).num_params()


@pytest.mark.skipif(not device.PROFILE.cpu_backend, reason="the update's bytes are fitted to MLX's CPU backend's peaks")
# (not the speedrun in bfloat16: Newton-Schulz's bfloat16 matmuls take minutes on the CPU backend)
@pytest.mark.parametrize("recipe, dtype, accum", [("build-nanogpt", "float32", 1), ("build-nanogpt", "bfloat16", 2),
                                                  ("speedrun", "float32", 2)])
def test_estimate_covers_a_step_whose_parameters_outweigh_its_batch(tmp_path, recipe, dtype, accum):
    """A large model at a small batch (fine-tuning on a Mac) peaks in the optimizer update, whose new weights are
    allocated before the old ones are freed: the estimate, which summed the backward's buffers alone, was 0.5-0.65x
    of such a step's peak (1024 wide, 2 layers, B1 x T16). The new moments reuse the old ones' buffers
    (optim.unfused): where they did not, the second and third cases peaked 1.15x above the estimate."""
    data = shards(tmp_path, 16 * accum * 4 + 1, 512)
    cfg = TrainConfig(recipe=recipe, data=str(data), out=str(tmp_path / "out"), n_layer=2, n_head=8, n_embd=1024,
                      block_size=16, vocab_size=512, batch_size=1, seq_len=16, total_batch_size=16 * accum,
                      max_steps=2, warmup_steps=1, val_every=0, sample_every=0, hellaswag_every=0, checkpoint_every=0,
                      dtype=dtype, threads=1)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    trainer = Trainer(cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    est, measured = trainer.memory, mx.get_peak_memory()
    assert est.update > est.activations + est.head  # the case the update's term is for
    assert 0.95 < est.total / measured < 1.5
