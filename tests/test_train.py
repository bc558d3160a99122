"""Training: step-for-step parity with a PyTorch loop of build-nanogpt's recipe, exact resume,
crash-safe checkpoints, overfitting one batch, the CLI, and one-line errors for bad input."""

from __future__ import annotations

import contextlib
import json
import re
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_main, save_hf_gpt2
from mlx.utils import tree_flatten

from nanogpt_mlx import GPT, GPTConfig, console, device, distributed, memory
from nanogpt_mlx import checkpoint as checkpoint_mod
from nanogpt_mlx import optim as optim_mod
from nanogpt_mlx import train as train_mod
from nanogpt_mlx.checkpoint import checkpoints
from nanogpt_mlx.config import PRESETS, TrainConfig, get_lr, resume_config
from nanogpt_mlx.errors import UserError
from nanogpt_mlx.sample import SampleConfig, sample_texts
from nanogpt_mlx.train import Trainer
from nanogpt_mlx.weights import load_model, sanitize

VOCAB = 1000


def write_shards(directory: Path, train: list[np.ndarray], val: np.ndarray, name: str = "toy") -> Path:
    """build-nanogpt's layout: uint16 `{name}_{split}_{index:06d}.npy`, shard 0 = val."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"{name}_val_000000.npy", val.astype(np.uint16))
    for i, tokens in enumerate(train, start=1):
        np.save(directory / f"{name}_train_{i:06d}.npy", tokens.astype(np.uint16))
    return directory


def token_stream(n: int, seed: int, vocab: int = 512) -> np.ndarray:
    """A learnable stream: each token is 7x the previous plus 1, 2 or 3 (mod vocab), ~1.1 nats/token."""
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    out[0] = rng.integers(vocab)
    steps = rng.integers(1, 4, n)
    for i in range(1, n):
        out[i] = (out[i - 1] * 7 + steps[i]) % vocab
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 2 train shards of 23 batches of 4x32 tokens: 64 micro-batches cross shards and wrap around
    return write_shards(tmp_path_factory.mktemp("shards"), [token_stream(3000, 1), token_stream(3000, 2)],
                        token_stream(2000, 3))


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory) -> Path:
    return save_hf_gpt2(tmp_path_factory.mktemp("hf"), n_layer=2, n_head=2, n_embd=64, n_positions=64,
                        vocab_size=VOCAB, seed=3)


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(data=str(data), out=str(out), n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB,
                       batch_size=4, seq_len=32, total_batch_size=256, max_lr=3e-3, warmup_steps=3, max_steps=10,
                       val_every=0, sample_every=0, hellaswag_every=0, checkpoint_every=0,
                       dtype="float32")  # float32 on every profile: the GPU profiles' default is bfloat16
    return replace(base, **kw)


def logged(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def flat_weights(directory: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in load_model(directory).parameters_flat()}


# ------------------------------------------------------------------------------ schedule
def test_adamw_is_mlx_adamw_with_bias_correction():
    with pytest.raises(UserError, match=r"^bias_correction=False: this AdamW is PyTorch's, always bias-corrected"):
        optim_mod.AdamW(1e-2, bias_correction=False)  # (MLX's default: accepted and ignored, it was)
    assert optim_mod.AdamW(1e-2, bias_correction=np.True_).bias_correction
    key = mx.random.key(0)
    params = {"w": mx.random.normal((64, 32), key=key), "b": mx.zeros((32,))}
    ours = optim_mod.AdamW(learning_rate=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    ref = optim.AdamW(learning_rate=1e-2, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, bias_correction=True)
    p_ours, p_ref = params, params
    for step in range(5):
        grads = {k: mx.random.normal(v.shape, key=mx.random.key(step + 1)) * 10.0**-step for k, v in params.items()}
        p_ours, p_ref = ours.apply_gradients(grads, p_ours), ref.apply_gradients(grads, p_ref)
        for k in params:
            np.testing.assert_allclose(np.array(p_ours[k]), np.array(p_ref[k]), rtol=1e-6, atol=1e-7)


def test_lr_schedule_is_build_nanogpts():
    cfg = TrainConfig(max_lr=6e-4, warmup_steps=10, max_steps=50)
    assert get_lr(0, cfg) == pytest.approx(6e-5)  # (step + 1) / warmup: the first step is not at lr 0
    assert get_lr(9, cfg) == pytest.approx(6e-4)
    assert get_lr(10, cfg) == pytest.approx(6e-4)
    assert get_lr(30, cfg) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))  # half way down the cosine
    assert get_lr(49, cfg) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * 39 / 40)) * (6e-4 - 6e-5), rel=1e-12)
    assert get_lr(50, cfg) == pytest.approx(6e-5)
    assert get_lr(99, cfg) == pytest.approx(6e-5)


# ------------------------------------------------------------------------------ parity
def build_nanogpt_lr(step: int, max_lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step > max_steps:
        return min_lr
    ratio = (step - warmup) / (max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


class DataLoaderLite:
    """build-nanogpt's loader: sequential (B, T) windows over sorted shards, next shard when one does not fit."""

    def __init__(self, directory: Path, B: int, T: int):
        self.shards = sorted(directory.glob("*_train_*.npy"))
        self.B, self.T, self.shard = B, T, 0
        self.tokens, self.pos = np.load(self.shards[0]).astype(np.int64), 0

    def next_batch(self):
        import torch

        B, T = self.B, self.T
        buf = torch.from_numpy(self.tokens[self.pos : self.pos + B * T + 1])
        self.pos += B * T
        if self.pos + B * T + 1 > len(self.tokens):
            self.shard = (self.shard + 1) % len(self.shards)
            self.tokens, self.pos = np.load(self.shards[self.shard]).astype(np.int64), 0
        return buf[:-1].view(B, T), buf[1:].view(B, T)


def pytorch_reference(hf_dir: Path, data: Path, cfg: TrainConfig,
                      autocast: bool = False) -> tuple[list[float], list[float], dict]:
    """build-nanogpt's training loop (train_gpt2.py) on the Hugging Face model, in float32 (`autocast`: its
    forward under bf16 autocast, as build-nanogpt runs it on a GPU)."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir)
    model.eval()  # no dropout; build-nanogpt's GPT has none
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    loader = DataLoaderLite(data, cfg.batch_size, cfg.seq_len)
    accum = cfg.total_batch_size // (cfg.batch_size * cfg.seq_len)
    losses, norms = [], []
    for step in range(cfg.max_steps):
        optimizer.zero_grad()
        loss_accum = 0.0
        for _ in range(accum):
            x, y = loader.next_batch()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(x).logits
            # in float32 as CUDA's autocast runs cross_entropy (the CPU's would round the loss to bf16)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)) / accum
            loss_accum += loss.detach()
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = build_nanogpt_lr(step, cfg.max_lr, cfg.max_lr * cfg.min_lr_ratio, cfg.warmup_steps, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        losses.append(loss_accum.item())
        norms.append(norm.item())
    weights = sanitize({k: mx.array(v.detach().numpy()) for k, v in model.state_dict().items()})
    return losses, norms, {k: np.array(v) for k, v in weights.items()}


def test_parity_with_pytorch_build_nanogpt_loop(small_hf_dir, data_dir, tmp_path):
    """Same weights, data order, AdamW groups, clip, warmup + cosine and 2-step accumulation: same losses."""
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), init_from=str(small_hf_dir), batch_size=4,
                      seq_len=32, total_batch_size=256, max_lr=3e-3, warmup_steps=5, max_steps=32, val_every=0,
                      sample_every=0, hellaswag_every=0, checkpoint_every=0, dtype="float32")  # (GPUs: bf16)
    Trainer(cfg).train()
    ours = logged(tmp_path / "run")
    ref_losses, ref_norms, ref_weights = pytorch_reference(small_hf_dir, data_dir, cfg)

    assert [r["step"] for r in ours] == list(range(32))
    losses = np.array([r["loss"] for r in ours])
    assert ref_losses[-1] < ref_losses[0] - 0.5, "the reference run should learn something"
    print(f"max relative loss difference vs PyTorch over 32 steps: {np.max(np.abs(losses / ref_losses - 1)):.2e}")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
    np.testing.assert_allclose([r["norm"] for r in ours], ref_norms, rtol=1e-3)
    np.testing.assert_allclose([r["lr"] for r in ours], [build_nanogpt_lr(s, 3e-3, 3e-4, 5, 32) for s in range(32)])
    weights = flat_weights(tmp_path / "run")
    assert weights.keys() == ref_weights.keys()
    for k, w in weights.items():
        np.testing.assert_allclose(w, ref_weights[k], atol=2e-4, rtol=1e-3, err_msg=k)


@pytest.mark.parametrize("profile", ["cuda", "metal", "cpu-x86"])
def test_bfloat16_loss_curve_is_pytorch_autocasts(profile, small_hf_dir, data_dir, tmp_path):
    """From the same weights, 40 steps of `--dtype bfloat16` under each profile's kernels (forced on the CPU: the GPU
    head + loss, attention and MLP backward) follow build-nanogpt's bf16 autocast run within 0.01 at every step
    (the bound for GPT-2 124M on a GPU is 0.05; float32 PyTorch is within ~0.001 of autocast here)."""
    out = tmp_path / "run"
    run_cli("train", "--data", str(data_dir), "--out", str(out), "--init-from", str(small_hf_dir), "--dtype",
            "bfloat16", "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "256", "--max-lr", "3e-3",
            "--warmup-steps", "5", "--max-steps", "40", "--val-every", "0", "--sample-every", "0",
            "--hellaswag-every", "0", "--checkpoint-every", "0", check=True, env={"NANOGPT_MLX_PROFILE": profile})
    cfg = TrainConfig(data=str(data_dir), batch_size=4, seq_len=32, total_batch_size=256, max_lr=3e-3,
                      warmup_steps=5, max_steps=40)
    ref_losses, _, _ = pytorch_reference(small_hf_dir, data_dir, cfg, autocast=True)
    losses = np.array([r["loss"] for r in logged(out)])
    assert len(losses) == 40 and ref_losses[-1] < ref_losses[0] - 0.5, "the reference run should learn something"
    print(f"{profile}: max |bf16 loss - PyTorch autocast's| over 40 steps: {np.abs(losses - ref_losses).max():.4f}")
    assert np.abs(losses - ref_losses).max() <= 0.01


def test_build_nanogpt_updates_packed_buckets_and_saves_per_tensor_state(data_dir, tmp_path):
    """The Trainer keeps build-nanogpt's float32 masters in optim.Packing's buckets (the model's weights are views
    of them) and writes the optimizer state per tensor: the layout of an unpacked AdamW's state."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=2))
    assert {optim_mod.Packing.group_of(k) for k in trainer.master["params"]} == {"decay", "no_decay"}
    trainer.train()
    saved = mx.load(str(checkpoints(tmp_path / "run")[-1] / "optimizer.safetensors"))
    unpacked = optim_mod.build_nanogpt_adamw(3e-3, 0.1, (0.9, 0.95), 1e-8)
    unpacked.init(trainer.model.trainable_parameters())
    assert saved.keys() == dict(tree_flatten(unpacked.state)).keys()
    assert saved["states.0.h.1.mlp.c_fc.weight.v"].shape == trainer.model.h[1].mlp.c_fc.weight.shape


# ------------------------------------------------------------------------------ resume
def test_resume_is_exact(data_dir, tmp_path):
    """N steps straight == k steps, a new process-like Trainer from the checkpoint, N - k more steps."""
    cfg = tiny_config(data_dir, tmp_path / "a", shuffle=True, val_every=4, val_steps=2)
    Trainer(cfg).train()
    split = replace(cfg, out=str(tmp_path / "b"))
    Trainer(split).train(until=6)
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["ckpt-000006"]
    Trainer(split, resume=True).train()

    a, b = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(10))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["norm"] for r in a] == [r["norm"] for r in b]
    assert logged(tmp_path / "a", "val") == logged(tmp_path / "b", "val")
    assert (tmp_path / "a" / "log.txt").read_text() == (tmp_path / "b" / "log.txt").read_text()
    wa, wb = flat_weights(tmp_path / "a"), flat_weights(tmp_path / "b")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_a_checkpoint_mid_run_holds_its_step_not_the_one_queued_ahead_of_it(data_dir, tmp_path):
    """With steps queued ahead (one step thread), the step after a checkpoint waits for it: ckpt-000002 of a run
    to step 4 is byte for byte that of a run stopped at step 2, weights, optimizer and data position alike."""
    full = tiny_config(data_dir, tmp_path / "a", checkpoint_every=2, max_steps=4, threads=1)
    Trainer(full).train()
    Trainer(replace(full, out=str(tmp_path / "b"))).train(until=2)
    a, b = tmp_path / "a" / "ckpt-000002", tmp_path / "b" / "ckpt-000002"
    for name in ("model.safetensors", "optimizer.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    loader = [json.loads((d / "trainer.json").read_text())["train_loader"] for d in (a, b)]
    assert loader[0] == loader[1]


def test_a_ctrl_c_in_the_last_step_says_no_stop(data_dir, tmp_path, capsys):
    """A Ctrl-C during the last step: the run ends as it would have, but said "stopping: saving a checkpoint (Ctrl-C
    again to quit without saving)" first."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=3))
    finish = trainer.queue.finish

    def ctrl_c_in_the_last_step(queued):
        if queued.step == 2:
            trainer.stops.on_signal(signal.SIGINT, None)
        return finish(queued)

    trainer.queue.finish = ctrl_c_in_the_last_step
    capsys.readouterr()
    assert trainer.train()["train_loss"] == logged(tmp_path / "run")[2]["loss"]
    assert "stopping" not in capsys.readouterr().out and trainer.step == 3


def test_each_train_call_returns_its_own_result(data_dir, tmp_path):
    """train() returned the Trainer's own dict, which the next train() changed: a notebook's first result showed the
    second call's losses."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=5))
    first = trainer.train(until=2)
    assert repr(trainer) == f"Trainer(out={str(tmp_path / 'run')!r}, step 2 of 5, recipe build-nanogpt, float32)"
    second = trainer.train()
    assert first == {"train_loss": logged(tmp_path / "run")[1]["loss"]} != second
    assert second == {"train_loss": logged(tmp_path / "run")[4]["loss"]}


def test_train_returns_the_latest_evaluation(data_dir, tmp_path):
    """Its val loss is the last validation's, each call (a result that kept the first one passed every test)."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=5, val_every=2, val_steps=2))
    first = trainer.train(until=2)
    assert [r["step"] for r in logged(out, "val")] == [0] and first["val_loss"] == logged(out, "val")[0]["loss"]
    second = trainer.train()
    losses = [r["loss"] for r in logged(out, "val")]
    assert [r["step"] for r in logged(out, "val")] == [0, 2, 4] and len(set(losses)) == 3  # (it trains)
    assert second["val_loss"] == losses[2]


@pytest.mark.parametrize("micro_steps", [1, 2])
def test_next_micro_step_is_built_while_the_device_runs_the_last(data_dir, tmp_path, micro_steps):
    """Each micro-step's graph is built (b) before the work queued before it is waited for (w), across steps too
    (step n is finished, f, after step n + 1 was queued), except where an evaluation (val at step 4, the last
    step 5) must see the weights between two steps. The losses are those of waiting after every micro-step,
    and every step's time is measured from when the step before it ended, also when building a step updates the
    weights before the step before it was waited for (one micro-step a step). One step thread: several compute a
    micro-step before they return, and nothing is queued ahead (test_threads.py)."""
    cfg = tiny_config(data_dir, tmp_path / "a", total_batch_size=64 * micro_steps, batch_size=2, max_steps=6,
                      val_every=4, val_steps=1, threads=1)
    trainer, events = Trainer(cfg), []
    for owner, name, tag in ((trainer, "_accumulate", "b"), (trainer, "_update", "b"), (trainer.queue, "finish", "f")):
        fn = getattr(owner, name)
        setattr(owner, name, lambda *a, fn=fn, tag=tag: events.append(tag) or fn(*a))
    sync = trainer.dist.sync
    trainer.dist.sync = lambda *a: events.append("w") or sync(*a)
    finish, steps = trainer.queue.finish, []
    trainer.queue.finish = lambda s: steps.append(s) or finish(s)
    trainer.train()
    step = "bw" * micro_steps  # "fw": finished where nothing was queued behind it
    assert "".join(events) == step * 2 + "f" + step + "f" + step + "f" + "fw" + step + "fw" + step + "fw"

    waiting = Trainer(replace(cfg, out=str(tmp_path / "b")))
    queue = waiting.queue.put
    waiting.queue.put = lambda *a, **k: (queue(*a, **k), queue())  # wait for each micro-step before building the next
    waiting.train()
    assert [r["loss"] for r in logged(tmp_path / "a")] == [r["loss"] for r in logged(tmp_path / "b")]
    dts = [r["dt"] for r in logged(tmp_path / "a")]
    assert min(dts) > 0.2 * median(dts)  # no step is timed from after its own end
    ends = [s.ended for s in steps]  # nor from before the end of the step it was queued behind
    assert all(dt <= end - before for dt, end, before in zip(dts[1:], ends[1:], ends)), (dts, ends)


def test_cap_memory_measures_the_first_step_then_caps_mlx_while_training(data_dir, tmp_path, capsys):
    """--cap-memory: the first step runs op by op (nothing built ahead of it) and its peak is the need; MLX's
    memory is then capped 25% above it for the rest of the run (and again after a resume of train()), the
    losses are unchanged, and the limit in force before train() is back after it. One step thread, whose steps
    are queued ahead of the device."""
    cfg = tiny_config(data_dir, tmp_path / "a", max_steps=5, val_every=0, threads=1)
    Trainer(cfg).train()
    capped = Trainer(replace(cfg, out=str(tmp_path / "b"), cap_memory=True))
    ahead, limits = [], []
    queue_ahead = capped._queue_ahead
    capped._queue_ahead = lambda *a: ahead.append(queue_ahead(*a)) or ahead[-1]
    finish = capped.queue.finish
    capped.queue.finish = lambda s: limits.append(mx.get_memory_limit()) or finish(s)
    before = mx.get_memory_limit()
    capped.train(until=3)
    assert mx.get_memory_limit() == before
    capped.train()
    assert mx.get_memory_limit() == before
    (event,) = logged(tmp_path / "b", "memory")
    assert event["step"] == 0 and 0 < event["need"] and event["cap"] == int(event["need"] * memory.CAP_HEADROOM)
    assert ahead[0] is False and any(ahead[1:])  # no step is built ahead of the measured one
    assert limits == [memory.MEASURE_LIMIT] + [event["cap"]] * 4
    assert [r["loss"] for r in logged(tmp_path / "a")] == [r["loss"] for r in logged(tmp_path / "b")]
    said = re.search(r"a step needs (\d+\.\d) MB \(measured op by op\)", capsys.readouterr().out)
    assert said and float(said[1]) == round(event["need"] / 1e6, 1)  # MB, where GB read "0.00"


def test_cap_memory_within_max_memory_warns_when_the_step_needs_more(data_dir, tmp_path, capsys):
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=2, val_every=0, cap_memory=True))
    trainer.cfg = replace(trainer.cfg, max_memory=0.001)  # below what the step needs (after the estimate's check)
    trainer.train()
    (event,) = logged(tmp_path / "run", "memory")
    assert event["cap"] == 1_000_000 < event["need"]
    assert "more than --max-memory 0.001 GB: MLX will wait for queued work" in capsys.readouterr().err


def test_crash_during_save_keeps_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    cfg = tiny_config(data_dir, tmp_path / "run", checkpoint_every=3, max_steps=6)
    trainer = Trainer(cfg)
    trainer.train(until=3)
    before = flat_weights(tmp_path / "run")

    def die(*args, **kwargs):  # the process dies half way through writing the next checkpoint
        raise SystemExit("killed")

    monkeypatch.setattr(train_mod.mx, "save_safetensors", die)
    with pytest.raises(SystemExit):
        trainer.train()
    monkeypatch.undo()
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["ckpt-000003"]
    after = flat_weights(tmp_path / "run")  # OUT/model.safetensors still the step-3 weights
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 3
    resumed.train()
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["ckpt-000003", "ckpt-000006"]  # the latest two
    assert not list((tmp_path / "run").glob(".ckpt-*"))  # the dead save's leftovers are cleaned up


# ------------------------------------------------------------------------------ learning
def test_overfits_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, 4 * 32 + 1)  # exactly one batch: the loader repeats it
    data = write_shards(tmp_path / "data", [batch], batch)
    cfg = tiny_config(data, tmp_path / "run", n_embd=64, vocab_size=256, total_batch_size=128, max_lr=3e-3,
                      warmup_steps=10, max_steps=300, min_lr_ratio=1.0, weight_decay=0.0)
    trainer = Trainer(cfg)
    for stop in range(25, 301, 25):  # stop as soon as it is there
        trainer.train(until=stop)
        if trainer.result["train_loss"] < 0.1:
            break
    assert trainer.result["train_loss"] < 0.1, trainer.result
    assert logged(tmp_path / "run")[0]["loss"] > 5.0  # it started at chance (ln 256 = 5.5)


def stop_during_step(trainer: Trainer, step: int) -> KeyboardInterrupt:
    """trainer.train(), with a stop requested while `step` runs, as the signal handler does: it saves and raises
    (returned)."""
    finish = trainer.queue.finish

    def finish_then_stop(s):
        trainer.stops.requested = trainer.stops.requested or s.step == step
        return finish(s)

    trainer.queue.finish = finish_then_stop
    try:
        with pytest.raises(KeyboardInterrupt) as e:
            trainer.train()
    finally:
        trainer.queue.finish = finish
    return e.value


def test_an_interrupted_trainer_trains_on_when_called_again(data_dir, tmp_path):
    """A notebook's interrupt saves the step; calling train() again continues (every later call stopped at once)."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=6))
    stopped = stop_during_step(trainer, 2)
    assert trainer.step in (3, 4)  # step 3 may have been queued behind step 2 already
    # its text says what was saved (it was the bare signal number, "2")
    assert str(stopped) == (f"stopped by Ctrl-C: saved {checkpoints(tmp_path / 'run')[-1]} (step {trainer.step}); "
                            "train() again continues")
    trainer.train()
    assert trainer.step == 6 and [r["step"] for r in logged(tmp_path / "run")] == list(range(6))


def test_a_stop_between_micro_steps_rereads_their_batches_on_resume(data_dir, tmp_path):
    """A stop after step 2's second micro-step (of 4) applies nothing of step 2 and puts its batches back: the
    resumed run's losses and weights are those of a run never stopped."""
    full = tiny_config(data_dir, tmp_path / "full", total_batch_size=4 * 4 * 32, max_steps=5)
    Trainer(full).train()
    cut = replace(full, out=str(tmp_path / "cut"))
    trainer, calls = Trainer(cut), []
    accumulate = trainer._accumulate

    def accumulate_then_stop(*args):
        calls.append(1)
        trainer.stops.requested = trainer.stops.requested or len(calls) == 2 * 3 + 2  # 3 accumulations, an update
        return accumulate(*args)

    trainer._accumulate = accumulate_then_stop
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in checkpoints(tmp_path / "cut")] == ["ckpt-000002"]
    Trainer(cut, resume=True).train()
    assert [r["loss"] for r in logged(tmp_path / "cut")] == [r["loss"] for r in logged(tmp_path / "full")]
    wa, wb = flat_weights(tmp_path / "full"), flat_weights(tmp_path / "cut")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_samples_during_training_are_seeded_by_the_step(data_dir, tmp_path):
    """build-nanogpt seeds each step's samples anew (seed + step here): other steps, other samples."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", vocab_size=50304, num_samples=2, sample_tokens=12))
    texts = {}
    for step in (0, 5, 0):
        trainer.step = step
        texts.setdefault(step, []).append(trainer.samples())
    assert texts[0][0] == texts[0][1] != texts[5][0]
    want = sample_texts(trainer.model, trainer.cfg.prompt, SampleConfig(max_new_tokens=12, top_k=50,
                                                                        seed=trainer.cfg.seed + 5, crop=True), 2)
    assert texts[5][0] == want


def plain_mean_loss(model, data_dir, batches: int) -> float:
    """The mean of `batches` val batch losses from full logits and MLX's own cross-entropy."""
    from nanogpt_mlx.data import DataLoader

    loader = DataLoader(data_dir, "val", 4, 32, vocab_size=VOCAB)
    losses = [nn.losses.cross_entropy(model(mx.array(x)), mx.array(y), reduction="mean").item()
              for x, y in (loader.next_batch() for _ in range(batches))]
    return sum(losses) / batches


def test_val_loss_is_build_nanogpts(data_dir, tmp_path):
    """The mean of val_steps batch losses from the start of the val split, every time."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", val_every=5, val_steps=3))
    expected = plain_mean_loss(trainer.model, data_dir, 3)
    assert trainer.val_loss() == pytest.approx(expected, rel=1e-5)
    assert trainer.val_loss() == pytest.approx(expected, rel=1e-5)  # the val loader starts over


def test_log_txt_lines_are_build_nanogpts(tmp_path):
    """train_gpt2.py's log lines: `{step} train {loss:.6f}`, `{step} val {loss:.4f}`, `{step} hella {acc:.4f}`
    (what `plot` and build-nanogpt's notebook read); log.jsonl keeps the full values."""
    from nanogpt_mlx.checkpoint import RunLog

    log = RunLog(tmp_path, start_step=0, enabled=True)
    log.metric(0, "train", 10.987654321, lr=6e-5)
    log.metric(0, "val", 10.98765)
    log.metric(0, "hella", 0.2501234)
    assert (tmp_path / "log.txt").read_text() == "0 train 10.987654\n0 val 10.9877\n0 hella 0.2501\n"
    assert logged(tmp_path)[0] == {"step": 0, "kind": "train", "loss": 10.987654321, "lr": 6e-5}
    assert logged(tmp_path, "hella")[0] == {"step": 0, "kind": "hella", "hella": 0.2501234}


def test_evaluations_run_every_n_steps_and_at_the_last(data_dir, tmp_path):
    """build-nanogpt's cadence: `step % every == 0 or last_step`, samples not at step 0."""
    cfg = tiny_config(data_dir, tmp_path / "run", max_steps=6, val_every=4, val_steps=1, sample_every=2,
                      vocab_size=50304, num_samples=1, sample_tokens=2)
    Trainer(cfg).train()
    assert [r["step"] for r in logged(tmp_path / "run", "val")] == [0, 4, 5]
    assert sorted({r["step"] for r in logged(tmp_path / "run", "sample")}) == [2, 4, 5]


def test_val_steps_past_the_split_validate_on_it_once(data_dir, tmp_path, capsys):
    """The val split holds 15 batches: 10^6 val steps read it once instead of averaging it 66,000 times over."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", val_every=5, val_steps=10**6))
    val = trainer.evaluations
    assert val.val_steps == 15 and "validating on all its 15 batches" in capsys.readouterr().err
    assert val.val_loader.within_one_pass(10**6) == 15 and val.val_loader.within_one_pass(7) == 7
    assert trainer.val_loss() == pytest.approx(plain_mean_loss(trainer.model, data_dir, 15), rel=1e-5)


def test_bfloat16_keeps_float32_masters(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console, "_said", set())  # (said once a process)
    cfg = tiny_config(data_dir, tmp_path / "run", dtype="bfloat16", max_steps=4)
    trainer = Trainer(cfg)
    assert ("bfloat16 is slow" in capsys.readouterr().err) == device.PROFILE.cpu_backend  # (a GPU's is fast)
    assert trainer.model.wte.weight.dtype == mx.bfloat16
    trainer.train()
    losses = [r["loss"] for r in logged(tmp_path / "run")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    saved = mx.load(str(tmp_path / "run" / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in saved.values())


def test_init_from_pads_vocab_with_the_mean_row(small_hf_dir, data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", init_from=str(small_hf_dir), vocab_size=1024, max_steps=1)
    trainer = Trainer(cfg)
    wte = np.array(trainer.model.wte.weight)
    src = np.array(load_model(small_hf_dir).wte.weight)
    assert wte.shape == (1024, 64)
    np.testing.assert_array_equal(wte[:VOCAB], src)
    np.testing.assert_allclose(wte[VOCAB:], np.broadcast_to(src.mean(0), (1024 - VOCAB, 64)), rtol=1e-6)
    assert Trainer(replace(cfg, out=str(tmp_path / "b"), vocab_size=0)).model.config.vocab_size == VOCAB


def test_padding_the_vocab_grows_an_untied_head_and_value_embeddings_with_their_mean_rows():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=100, tie_embeddings=False,
                          value_embeds=1))
    grown = model.grow_vocab(128)
    assert grown.config.vocab_size == 128 and model.grow_vocab(100) is model
    with pytest.raises(UserError, match="vocab_size 99 is smaller than the source model's 100"):
        model.grow_vocab(99)
    for name in ("wte.weight", "lm_head.weight", "ve.0.weight"):
        old, new = (np.array(dict(m.parameters_flat())[name]) for m in (model, grown))
        assert new.shape == (128, 16)
        np.testing.assert_array_equal(new[:100], old)
        np.testing.assert_allclose(new[100:], np.broadcast_to(old.mean(0), (28, 16)), rtol=1e-6)
    np.testing.assert_array_equal(np.array(grown.h[0].mlp.c_fc.weight), np.array(model.h[0].mlp.c_fc.weight))


def test_init_from_records_the_models_sizes_not_the_presets(small_hf_dir, data_dir, tmp_path):
    """The checkpoint's config said the preset's n_embd 32 of a 64-wide model, and a resume then demanded 32."""
    out = tmp_path / "run"
    Trainer(tiny_config(data_dir, out, init_from=str(small_hf_dir), max_steps=1)).train()
    saved = json.loads((checkpoints(out)[-1] / "trainer.json").read_text())["config"]
    assert (saved["n_layer"], saved["n_head"], saved["n_embd"], saved["block_size"]) == (2, 2, 64, 64)
    run_cli("train", "--resume", str(out), "--max-steps", "2", "--n-embd", "64", check=True)


def test_init_from_says_which_sizes_set_by_hand_it_ignores(small_hf_dir, data_dir, tmp_path, capsys):
    """The CLI refuses --n-layer with --init-from; the API trained the source's shape without a word. A preset's
    shape, which every config made from it carries, is no size asked for."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "a", init_from=str(small_hf_dir), n_layer=3))
    assert (trainer.cfg.n_layer, trainer.cfg.n_embd) == (2, 64)
    assert capsys.readouterr().err == (
        f"nanogpt-mlx: warning: init_from trains {small_hf_dir} in its own shape; n_layer 3 (the source's 2), n_embd "
        "32 (the source's 64), block_size 32 (the source's 64) ignored (shape fields size a random init)\n")
    overrides = dict(data=str(data_dir), init_from=str(small_hf_dir), vocab_size=VOCAB, seq_len=32,
                     total_batch_size=2048, val_every=0, sample_every=0, hellaswag_every=0, dtype="float32")
    Trainer(TrainConfig.preset("shakespeare", out=str(tmp_path / "b"), **overrides))
    Trainer(TrainConfig(out=str(tmp_path / "c"), **overrides))
    assert capsys.readouterr().err == ""
    # one size set on a preset's: that one alone (n_head 12, n_embd 768 and block_size 1024 were said too)
    Trainer(TrainConfig(out=str(tmp_path / "d"), n_layer=3, **overrides))
    assert capsys.readouterr().err == (f"nanogpt-mlx: warning: init_from trains {small_hf_dir} in its own shape; "
                                       "n_layer 3 (the source's 2) ignored (shape fields size a random init)\n")


def test_the_finetune_preset_trains_its_source_at_nanogpts_constant_lr(small_hf_dir, data_dir, tmp_path):
    """nanoGPT's finetune_shakespeare.py as a preset: 32 rows of 1024 tokens a step at a constant 3e-5, evaluated
    every 5 steps and at the last; here over a small source and rows of 32 tokens."""
    preset = PRESETS["finetune-shakespeare"]
    assert (preset.init_from, preset.total_batch_size, preset.seq_len) == ("gpt2", 32 * 1024, 1024)
    assert preset.max_steps == 20
    assert {get_lr(step, preset) for step in range(25)} == {3e-5}
    out = tmp_path / "run"
    cfg = TrainConfig.preset("finetune-shakespeare", init_from=str(small_hf_dir), data=str(data_dir), out=str(out),
                             seq_len=32, total_batch_size=256, max_steps=7, val_steps=2, sample_every=0,
                             dtype="float32")
    Trainer(cfg).train()
    assert [r["lr"] for r in logged(out)] == [3e-5] * 7
    assert [r["step"] for r in logged(out, "val")] == [0, 5, 6]
    assert [c.name for c in checkpoints(out)] == ["ckpt-000007"]  # saved at the end only
    saved = json.loads((checkpoints(out)[-1] / "trainer.json").read_text())["config"]
    assert (saved["n_layer"], saved["n_embd"], saved["block_size"]) == (2, 64, 64)


def test_the_finetune_preset_is_not_switched_to_another_recipe(capsys):
    """`--preset finetune-shakespeare --recipe speedrun` fine-tuned at the speedrun's pretraining LRs (Muon 0.025,
    a 70% cooldown) in place of the preset's constant 3e-5."""
    with pytest.raises(UserError, match="'finetune-shakespeare' fine-tunes with the build-nanogpt recipe; the "
                                        "speedrun recipe has no fine-tuning preset"):
        TrainConfig.preset("finetune-shakespeare", recipe="speedrun")
    assert TrainConfig.preset("finetune-shakespeare", recipe="build-nanogpt").max_lr == 3e-5
    assert_one_line_error(run_main(capsys, "train", "--preset", "finetune-shakespeare", "--recipe", "speedrun"),
                          "--recipe speedrun --init-from DIR, a speedrun model's checkpoint, --max-lr")
    with pytest.raises(UserError, match="^unknown recipe 'bogus'"):  # not "the bogus recipe has no fine-tuning preset"
        TrainConfig.preset("finetune-shakespeare", recipe="bogus")
    # without init_from it is no fine-tuning: the preset's data and evaluations, the recipe's optimizer
    assert TrainConfig.preset("finetune-shakespeare", recipe="speedrun", init_from="").max_lr == 0.025


def test_init_from_without_a_preset_notes_the_fine_tuning_one(small_hf_dir, data_dir, tmp_path, capsys):
    """`train --init-from gpt2` took the shakespeare preset's pretraining settings (max_lr 1e-3, cosine) unsaid."""
    args = ["train", "--data", str(data_dir), "--init-from", str(small_hf_dir), "--vocab-size", "0", "--seq-len", "32",
            "--total-batch-size", "512", "--max-steps", "1", "--val-every", "0", "--sample-every", "0"]
    note = ("nanogpt-mlx: note: --init-from trains with the shakespeare preset's settings, made to pretrain a small "
            "model (max_lr 0.001, warmup and cosine decay, rows of 32 tokens); --preset finetune-shakespeare "
            "fine-tunes as nanoGPT does (a constant 3e-5, rows of 1024)\n")
    assert run_main(capsys, *args, "--out", str(tmp_path / "a")).stderr == note
    for given in (["--max-lr", "1e-4"], ["--preset", "finetune-shakespeare"]):
        assert run_main(capsys, *args, "--out", str(tmp_path / given[0]), *given).stderr == ""


def test_a_val_split_too_short_for_the_batch_says_what_fits(tmp_path, small_hf_dir):
    """A fine-tuning set's val split (a tenth) is often shorter than one training batch: the run was refused
    without a word of what to change."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(100, 2))
    with pytest.raises(UserError, match=r"no val shard holds one batch: .*\(100 tokens\); one of B\*T\*ranks <= 99 "
                                        r"tokens fits \(a smaller batch size or sequence length\); val_every 0 "
                                        r"\(--val-every 0\) turns validation off$"):
        Trainer(tiny_config(data, tmp_path / "run", val_every=5))


def test_a_seed_near_2_to_the_64_samples_past_it(data_dir, tmp_path):
    """Samples are seeded by seed + step, which passed 2^64 mid-run and stopped it unsaved."""
    cfg = tiny_config(data_dir, tmp_path / "run", seed=2**64 - 1, max_steps=3, sample_every=1, num_samples=1,
                      sample_tokens=2, prompt="The")
    Trainer(cfg).train()
    assert len([r for r in logged(tmp_path / "run", "sample")]) == 2


def test_a_seed_out_of_range_is_refused_alike_everywhere():
    """TrainConfig, GPT and SampleConfig each said it in words of their own."""
    model = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8)
    for make in (lambda s: TrainConfig(seed=s), lambda s: GPT(model, seed=s), lambda s: SampleConfig(seed=s)):
        for seed in (-1, 2**64):
            with pytest.raises(UserError, match=re.escape(f"seed must be an integer in [0, 2^64), got {seed}")):
                make(seed)


def test_a_warmup_as_long_as_the_run_is_noted(data_dir, tmp_path, capsys):
    """A short run that kept build-nanogpt's 715 warmup steps would train at a rising, small LR without a word."""
    Trainer(tiny_config(data_dir, tmp_path / "short", warmup_steps=2, max_steps=2)).train()
    assert "note: warmup_steps 2 is not below max_steps 2: the LR rises for the whole run" in capsys.readouterr().out
    Trainer(tiny_config(data_dir, tmp_path / "long", warmup_steps=1, max_steps=2)).train()
    assert "warmup_steps" not in capsys.readouterr().out


def test_mfu_on_a_cpu_is_against_float32_matmuls(data_dir, tmp_path, monkeypatch, capsys):
    """bfloat16 matmuls on MLX's CPU backend are emulated, slower than the step's float32 parts: MFU read 200%."""
    from nanogpt_mlx import device

    monkeypatch.setattr(device, "peak_flops", lambda dtype="float32": {"float32": 100e9, "bfloat16": 5e9}[dtype])
    Trainer(tiny_config(data_dir, tmp_path / "run", dtype="bfloat16", max_steps=1)).train()
    assert "peak 100 GFLOP/s a rank" in capsys.readouterr().out


def test_mfu_is_nanogpts_estimate(data_dir, tmp_path, monkeypatch):
    """nanoGPT's estimate_mfu: 6 N (parameters without the position table) + 12 L C T flops a token, times tok/s,
    over the peak."""
    from nanogpt_mlx import device

    monkeypatch.setattr(device, "mfu_peak", lambda dtype: 1e9)
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", n_layer=1, n_embd=16, max_steps=3))
    trainer.train()
    n = sum(p.size for k, p in trainer.model.parameters_flat() if k != "wpe.weight")
    for r in logged(tmp_path / "run"):
        assert r["mfu"] == pytest.approx((6 * n + 12 * 1 * 16 * 32) * r["tok_per_s"] / 1e9, rel=1e-9)


# ------------------------------------------------------------------------------ CLI
def cli_config(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--vocab-size", str(VOCAB), "--batch-size", "4", "--seq-len", "32",
            "--total-batch-size", "256", "--warmup-steps", "2",
            "--prompt", "The", "--sample-tokens", "8", *extra]  # "The" is token 464, within VOCAB


def test_init_from_refuses_sizes_it_would_ignore(data_dir, small_hf_dir, tmp_path, capsys):
    """The source's shape is trained: --n-layer 2 with --init-from trained its one layer without a word."""
    proc = run_main(capsys, "train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--init-from",
                    str(small_hf_dir), "--n-layer", "2", "--block-size", "64", "--max-steps", "1")
    assert_one_line_error(proc, f"--init-from trains {small_hf_dir} in its own shape; --n-layer, --block-size cannot")
    assert not (tmp_path / "run").exists()
    proc = run_main(capsys, "train", "--preset", "finetune-shakespeare", "--out", str(tmp_path / "run"), "--n-embd",
                    "64")  # (a warning, after gpt2 was downloaded)
    assert_one_line_error(proc, "--init-from trains gpt2 (the finetune-shakespeare preset's) in its own shape; "
                          "--n-embd cannot change it")
    assert not (tmp_path / "run").exists()


def test_cli_trains_samples_and_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*cli_config(data_dir, out, "--max-steps", "6", "--val-every", "3", "--val-steps", "2",
                               "--sample-every", "3", "--num-samples", "1", "--sample-tokens", "5",
                               "--checkpoint-every", "4"), check=True)
    assert "step     5 | loss" in proc.stdout and "| MFU" in proc.stdout and "sample 0:" in proc.stdout
    log = (out / "log.txt").read_text().splitlines()
    assert log[0].startswith("0 val ") and log[1].startswith("0 train ")
    assert [l.split()[0] for l in log if " train " in l] == [str(s) for s in range(6)]
    assert all(len(l.split()[2].split(".")[1]) == (6 if " train " in l else 4) for l in log)
    assert [p.name for p in checkpoints(out)] == ["ckpt-000004", "ckpt-000006"]
    # the last line's losses are step 5's, before its update (its val loss differed from the model's, unsaid)
    val = next(l.split()[2] for l in log if l.startswith("5 val "))
    assert re.search(rf"^done: step 6; step 5's, before its update: val_loss {val}, train_loss \S+; model in ",
                     proc.stdout.splitlines()[-1]), proc.stdout.splitlines()[-1]
    run_cli("sample", "--model", str(out), "--prompt", "The", "--max-new-tokens", "4", "--num-samples", "1", "--seed",
            "0", check=True)

    again = run_cli(*cli_config(data_dir, out, "--max-steps", "6"))
    assert_one_line_error(again, "already holds a checkpoint", "--resume")
    proc = run_cli("train", "--resume", str(out), "--max-steps", "8", "--cap-memory", check=True)
    assert "step     7 | loss" in proc.stdout and "memory: a step needs" in proc.stdout
    assert [l.split()[0] for l in (out / "log.txt").read_text().splitlines() if " train " in l] == \
        [str(s) for s in range(8)]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP", "stdout closed"])
def test_a_stop_request_saves_a_checkpoint_and_exits_cleanly(how, data_dir, tmp_path):
    """Ctrl-C, SIGTERM, SIGHUP, or stdout's reader gone (`train | head`, or `| tee` that a Ctrl-C ended): the run
    ended unsaved with exit status 0 there, and a buffer's worth of steps after the pipe closed."""
    out = tmp_path / "run"
    args = cli_config(data_dir, out, "--max-steps", "100000")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout into a pipe: block-buffered
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_mlx.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # not nohup's
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "log.txt").exists() and (out / "log.txt").read_text().count(
            "train") >= 3):
        time.sleep(0.1)
    if how == "stdout closed":
        stopped_at = (out / "log.txt").read_text().count(" train ")
        proc.stdout.close()
        stdout, stderr = "", proc.stderr.read()
        proc.wait(timeout=60)
    else:
        proc.send_signal(getattr(signal, how))
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, how, signal.SIGINT), stderr  # as the shell reports the signal
    assert "Traceback" not in stderr and "interrupted" in stderr
    (ckpt,) = checkpoints(out)
    steps_logged = (out / "log.txt").read_text().count(" train ")
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == steps_logged == int(ckpt.name[5:]) >= 3
    if how == "stdout closed":
        assert steps_logged <= stopped_at + 3 and f"--resume {out}" in stderr  # the last line goes to stderr
    else:
        assert f"--resume {out}" in stdout


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_stdout_on_a_full_disk_saves_and_says_so(data_dir, tmp_path):
    """`train > run.log` on a full disk: the run saved and stopped, but said "interrupted" with status 130, as if
    someone had pressed Ctrl-C."""
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", *cli_config(data_dir, out, "--max-steps", "6")],
                              stdout=full, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "interrupted" not in proc.stderr, proc.stderr
    (ckpt,) = checkpoints(out)
    assert proc.stderr.splitlines()[-1] == (f"nanogpt-mlx: error: stdout: cannot write (No space left on device); "
                                            f"saved {ckpt} (step {int(ckpt.name[5:])}): make room for the output, "
                                            f"then --resume {out}")


@pytest.mark.skipif(sys.platform != "linux", reason="F_SETPIPE_SZ is Linux's")
def test_a_signal_while_stdout_is_blocked_saves_once_it_drains(data_dir, tmp_path):
    """`train | less` that stopped reading, then SIGTERM: the handler's own line landed inside the blocked write
    ("reentrant call"), a traceback and no checkpoint."""
    import fcntl

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_mlx", *cli_config(data_dir, out, "--max-steps", "100000",
                                                                               "--val-every", "0")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    fcntl.fcntl(proc.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: full after a few dozen lines
    deadline, steps = time.time() + 120, -1
    while steps != (steps := (out / "log.txt").read_text().count(" train ") if (out / "log.txt").exists() else 0) \
            or steps < 3:  # until the run stops logging: blocked on its stdout
        assert time.time() < deadline and proc.poll() is None
        time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)  # drains the pipe
    assert proc.returncode == 128 + signal.SIGTERM and b"Traceback" not in stderr, stderr
    (ckpt,) = checkpoints(out)
    assert int(ckpt.name[5:]) == (out / "log.txt").read_text().count(" train ") >= 3 and b"stopping" in stdout


def test_a_closed_terminal_saves_a_checkpoint(data_dir, tmp_path):
    """The terminal's SIGHUP, then every write to it fails (EIO, not EPIPE): the run ended unsaved."""
    import pty

    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the run, leading a session whose terminal is the pty
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "nanogpt_mlx", *cli_config(data_dir, out, "--max-steps",
                                                                                    "100000")])
    deadline = time.time() + 120
    while not ((out / "log.txt").exists() and (out / "log.txt").read_text().count(" train ") >= 3):
        assert time.time() < deadline
        with contextlib.suppress(OSError):
            os.read(fd, 1 << 16)  # a terminal's reader: the run blocks on a full one
    os.close(fd)  # the terminal window closes
    _, status = os.waitpid(pid, 0)
    (ckpt,) = checkpoints(out)
    assert int(ckpt.name[5:]) == (out / "log.txt").read_text().count(" train ") >= 3, os.waitstatus_to_exitcode(status)


def test_a_signal_during_the_last_save_lets_it_finish(data_dir, tmp_path):
    """The run's end is saved after its last step: a Ctrl-C there interrupted the save, losing every step since the
    last periodic checkpoint."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=2, checkpoint_every=0))
    save = trainer.save

    def interrupted_save():
        os.kill(os.getpid(), signal.SIGINT)
        return save()

    trainer.save = interrupted_save
    try:
        trainer.train()
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C interrupted the save")
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["ckpt-000002"]


def test_a_second_process_into_a_running_runs_out_is_refused(data_dir, tmp_path):
    """The same command twice (or a scheduler's retry of a live job) would interleave checkpoints and logs."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "nanogpt_mlx", *cli_config(data_dir, out, "--max-steps", "100000",
                                                                                 "--checkpoint-every", "1")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "log.txt").exists() and (out / "log.txt").read_text().count(" train ") >= 2):
        assert time.time() < deadline and first.poll() is None, first.stderr.read()
        time.sleep(0.1)
    # without --overwrite too: it was told to pass --overwrite, which was then refused for the live run
    for args in (["train", "--resume", str(out), "--max-steps", "100001"],
                 cli_config(data_dir, out, "--max-steps", "3", "--overwrite"), cli_config(data_dir, out)):
        assert_one_line_error(run_cli(*args), f"{out} is being written by another run (pid {first.pid})")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) == 130
    steps = json.loads((checkpoints(out)[-1] / "trainer.json").read_text())["step"]
    run_cli("train", "--resume", str(out), "--max-steps", str(steps + 1), check=True)  # the lock ended with it


def test_a_stop_request_skips_the_evaluations_due_next(data_dir, tmp_path):
    """Ctrl-C during step 2 saves step 3 without first running step 3's evaluations (HellaSwag takes minutes)."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=6, val_every=1, val_steps=1))
    stop_during_step(trainer, 2)
    assert [r["step"] for r in logged(out, "val")] == [0, 1, 2]
    assert [p.name for p in checkpoints(out)] == ["ckpt-000003"]


def test_ctrl_c_during_an_evaluation_stops_it_at_once(data_dir, tmp_path):
    """An evaluation changes no weights: Ctrl-C ends it (a val loss over 150,000 batches here, minutes) and saves the
    step; the resumed run evaluates that step again, and the log holds each evaluation once."""
    out, data = tmp_path / "run", tmp_path / "data"
    write_shards(data, [token_stream(3000, 1)], np.tile(token_stream(4096, 3), 5000))
    args = cli_config(data, out, "--max-steps", "3", "--val-every", "2", "--val-steps", "150000",
                      "--sample-every", "0")
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_mlx", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while not (line := proc.stdout.readline()).startswith("model ") and line:  # the header, then the first val
        pass
    time.sleep(1.0)  # the handlers are installed right after the header
    signal_sent = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert time.time() - signal_sent < 30 and "stopping: saving a checkpoint (Ctrl-C again" in stdout
    assert [p.name for p in checkpoints(out)] == ["ckpt-000000"] and logged(out, "val") == []
    run_cli("train", "--resume", str(out), "--val-steps", "2", check=True)
    assert [r["step"] for r in logged(out, "val")] == [0, 2]
    assert [r["step"] for r in logged(out)] == [0, 1, 2]


def test_a_resumed_runs_log_is_cut_at_its_step_and_left_alone_when_nothing_follows(tmp_path):
    """Resuming at step 3 drops what was logged from step 3 on and a torn last line, keeping the other lines; a log
    that ends before step 3 is not rewritten (a long run's logs are hundreds of MB: each resume read them whole and
    wrote them again). The last line may be longer than one read from the end."""
    from nanogpt_mlx.checkpoint import RunLog
    out = tmp_path / "run"
    out.mkdir()
    long_sample = json.dumps({"step": 2, "kind": "sample", "texts": ["ab" * 50_000]}) + "\n"
    kept_txt, kept_jsonl = "0 train 10.500000\n2 val 9.1000\n", '{"step": 0, "kind": "train"}\n' + long_sample
    (out / "log.txt").write_text(kept_txt + "3 train 9.000000\n4 tra")
    (out / "log.jsonl").write_text(kept_jsonl + '{"step": 3, "kind": "train"}\n{"step": 4, "ki')
    RunLog(out, 3, True)
    assert (out / "log.txt").read_text() == kept_txt and (out / "log.jsonl").read_text() == kept_jsonl
    inodes = [(out / name).stat().st_ino for name in ("log.txt", "log.jsonl")]
    RunLog(out, 3, True)
    RunLog(out, 5, True).restart(4)  # nothing logged at step 4 or later: nothing to drop
    assert [(out / name).stat().st_ino for name in ("log.txt", "log.jsonl")] == inodes
    assert (out / "log.txt").read_text() == kept_txt and (out / "log.jsonl").read_text() == kept_jsonl
    RunLog(out, 1, True)
    assert (out / "log.txt").read_text() == "0 train 10.500000\n"
    assert (out / "log.jsonl").read_text() == '{"step": 0, "kind": "train"}\n'
    (out / "log.jsonl").unlink()
    os.mkfifo(out / "log.jsonl")  # its open waited for a writer, forever
    with pytest.raises(UserError, match=r"log.jsonl: cannot read the run's log \(not a regular file\)$"):
        RunLog(out, 1, True)


def test_the_logs_reach_the_disk_before_each_checkpoint(data_dir, tmp_path, monkeypatch):
    """A power cut after a checkpoint must not lose the log lines before its step (they were never fsynced)."""
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or fsync(fd))
    out = tmp_path / "run"
    Trainer(tiny_config(data_dir, out, max_steps=2, checkpoint_every=1)).train()
    logs = {(out / name).stat().st_ino for name in ("log.txt", "log.jsonl")}
    since = 0
    for step in (1, 2):
        state = synced.index((out / f"ckpt-{step:06d}" / "trainer.json").stat().st_ino)
        assert logs <= set(synced[since:state])
        since = state


def test_a_trainer_does_not_write_over_a_run_continued_by_another_process(data_dir, tmp_path):
    """Between two train() calls OUT is unlocked: another process that continued the run there and saved its own
    checkpoints had them, its model and its log lines replaced by this Trainer's steps trained again."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=4, checkpoint_every=2))
    trainer.train(until=2)
    run_cli("train", "--resume", str(out), "--max-steps", "6", check=True)
    theirs = (out / "log.jsonl").read_text()
    for again in (trainer.train, trainer.save):
        with pytest.raises(UserError, match=f"{out}'s latest checkpoint is ckpt-000006, written by another run since "
                                            "this Trainer's ckpt-000002: continue from it with Trainer"):
            again()
    assert (out / "log.jsonl").read_text() == theirs and [c.name for c in checkpoints(out)] == ["ckpt-000004",
                                                                                                 "ckpt-000006"]
    resumed = Trainer(resume_config(out), resume=True)  # as the error says; OUT was unlocked again
    assert resumed.step == 6


def test_a_trainer_does_not_write_over_another_runs_checkpoint_of_the_same_name(data_dir, tmp_path):
    """Another process's fresh run (--overwrite) wrote its own ckpt-000002 where this Trainer had saved one: the
    same name is not the same checkpoint (a new inode or time), and this Trainer would replace that run's."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=4, checkpoint_every=2))
    trainer.train(until=2)
    run_cli(*cli_config(data_dir, out, "--max-steps", "2", "--sample-every", "0", "--overwrite"), check=True)
    theirs = (out / "ckpt-000002" / "model.safetensors").read_bytes()
    for again in (trainer.train, trainer.save):
        with pytest.raises(UserError, match=f"{out}'s latest checkpoint is ckpt-000002, written by another run since "
                                            "this Trainer's ckpt-000002: continue from it"):
            again()
    assert [c.name for c in checkpoints(out)] == ["ckpt-000002"]
    assert (out / "ckpt-000002" / "model.safetensors").read_bytes() == theirs


def test_a_trainer_saves_again_after_its_checkpoint_was_saved_but_not_published(data_dir, tmp_path, monkeypatch):
    """OUT's model could not be pointed at the checkpoint just written (a full disk): the checkpoint is this
    Trainer's all the same (it was taken for another run's, and this Trainer could not save again)."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=4))
    publish = checkpoint_mod._publish

    def full(out, final):
        monkeypatch.setattr(checkpoint_mod, "_publish", publish)  # once
        raise UserError("No space left on device")

    monkeypatch.setattr(checkpoint_mod, "_publish", full)
    with pytest.raises(UserError, match="No space left on device"):
        trainer.save()
    assert trainer.save() == out / "ckpt-000000" and load_model(out).config.n_layer == 2
    trainer.train()
    assert trainer.step == 4


def test_a_trainer_saves_its_state_where_its_checkpoints_were_removed(data_dir, tmp_path):
    """Checkpoints removed by hand (no other run wrote any) leave a Trainer's state the only copy: it was refused
    as "written by another run", with advice to resume from a checkpoint no longer there."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=4))
    trainer.train(until=2)
    for ckpt in checkpoints(out):
        shutil.rmtree(ckpt)
    assert trainer.save() == out / "ckpt-000002"
    trainer.train()
    assert [c.name for c in checkpoints(out)] == ["ckpt-000002", "ckpt-000004"]


def test_a_trainer_that_stopped_amid_a_step_refuses_to_save(data_dir, tmp_path):
    """After a NaN, save() wrote the NaN weights as OUT's latest checkpoint and model (train() refused)."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_lr=1e30, grad_clip=0.0, warmup_steps=1, max_steps=4))
    with pytest.raises(UserError, match="is not finite"):
        trainer.train()
    for again in (trainer.save, trainer.train):
        with pytest.raises(UserError, match="this Trainer stopped amid a step"):
            again()
    assert checkpoints(out) == []


class _Ranks(distributed.Dist):
    """One of two ranks in this process, the other's share of each sum given."""

    def __init__(self, rank: int, others: float):
        super().__init__(rank=rank, world=2)
        self.others = others

    def sum(self, value: float, at_least: float = 0.0) -> float:
        return value + self.others


def test_every_rank_stops_where_rank_0_cannot_train(data_dir, tmp_path):
    """Rank 0 alone refused to train in an OUT another run had written to: the other ranks waited for it in their
    first collective until the watchdog ended them (300 s)."""
    other = tmp_path / "other"
    Trainer(tiny_config(data_dir, other, max_steps=1)).train()
    cfg = tiny_config(data_dir, tmp_path / "run", max_steps=4, total_batch_size=512)
    rank0 = Trainer(cfg, dist=_Ranks(0, others=0.0))
    shutil.copytree(other / "ckpt-000001", tmp_path / "run" / "ckpt-000001")  # another run's, written meanwhile
    with pytest.raises(UserError, match="latest checkpoint is ckpt-000001, written by another run since this Trainer "
                                        "started"):  # though it never saved
        rank0.train()
    rank1 = Trainer(replace(cfg, out=str(tmp_path / "run1")), dist=_Ranks(1, others=1.0))  # (rank 0's refusal)
    with pytest.raises(UserError, match=f"rank 0 cannot train in {tmp_path / 'run1'} now"):
        rank1.train()


def test_a_sigterm_held_back_by_a_save_of_several_ranks_says_the_save(data_dir, tmp_path, monkeypatch, capsys):
    """With several ranks a SIGTERM during a save ends rank 0 once the save is done (143): it did so silently, the
    user not knowing whether the checkpoint was written nor how to go on."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=4, total_batch_size=512), dist=_Ranks(0, others=0.0))
    write = checkpoint_mod.write

    def terminated_midway(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # (held back until the save is whole)
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoint_mod, "write", terminated_midway)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="143"):
        trainer.save()
    assert capsys.readouterr().out == f"stopped by SIGTERM: saved {out / 'ckpt-000000'} (step 0); continue with " \
                                      f"--resume {out} on the same 2 ranks\n"
    assert [c.name for c in checkpoints(out)] == ["ckpt-000000"]


def test_an_evaluation_stopped_in_a_notebook_is_logged_once_when_train_is_called_again(data_dir, tmp_path):
    """A stop during step 2's samples, after its val loss was logged: the next train() evaluates step 2 again and
    the log holds its val loss once (it held it twice)."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=4, val_every=2, val_steps=1, sample_every=2,
                                  num_samples=1, sample_tokens=2, prompt="a"))
    samples = trainer.samples

    def stop_at_step_2():
        if trainer.step == 2:
            trainer.stops.on_signal(signal.SIGINT, None)  # what Ctrl-C does: the evaluation ends at once
        return samples()

    trainer.samples = stop_at_step_2
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.step == 2 and [r["step"] for r in logged(out, "val")] == [0, 2]
    trainer.samples = samples
    trainer.train()
    assert [r["step"] for r in logged(out, "val")] == [0, 2, 3]
    assert [r["step"] for r in logged(out, "sample")] == [2, 3]
    assert [line.split()[:2] for line in (out / "log.txt").read_text().splitlines() if " val " in line] == \
        [["0", "val"], ["2", "val"], ["3", "val"]]


def test_a_resume_says_its_checkpoint_and_what_changed(data_dir, tmp_path):
    """A resumed run names the checkpoint it continues from and the fields given that changed since, in its output
    and its log.jsonl; a longer max_steps stretches the LR schedule from there, which it says (it did so silently,
    the LR going back up). Its OUT is no field changed: the run was moved there after it was saved."""
    out = tmp_path / "run"
    run_cli(*cli_config(data_dir, tmp_path / "before", "--max-steps", "4", "--sample-every", "0", "--val-every", "0"),
            check=True)
    (tmp_path / "before").rename(out)
    # a finished run trains nothing: changes were saved (a later resume took them), a resume logged, "done" said
    before = {f: f.read_bytes() for f in [*out.rglob("*.json"), *out.glob("log.*")]}
    assert_one_line_error(run_cli("train", "--resume", str(out), "--max-lr", "2e-3"),
                          f"nothing to train: {out} is at step 4, its max_steps, and the changes (max_lr) would only "
                          "be saved; pass a larger --max-steps")
    assert {f: f.read_bytes() for f in [*out.rglob("*.json"), *out.glob("log.*")]} == before
    same = run_cli("train", "--resume", str(out), "--data", f"{data_dir}/.", check=True).stdout  # spelled apart
    assert f"note: resuming from {out}/ckpt-000004 (step 4)\n" in same
    extended = run_cli("train", "--resume", str(out), "--max-steps", "8", "--threads", "1", check=True).stdout
    saved, now = resume_config(out, max_steps=4, threads=0), resume_config(out)
    assert now.max_steps == 8 and get_lr(4, now) > get_lr(3, saved)
    assert f"note: resuming from {out}/ckpt-000004 (step 4); changed since: max_steps 4 -> 8, threads 0 -> 1; the " \
           f"LR at step 4 is {get_lr(4, now):.4e} by the new schedule ({get_lr(3, saved):.4e} by the checkpoint's " \
           "at its last step, 3)" in extended
    assert logged(out, "resume") == [{"step": 4, "kind": "resume", "checkpoint": f"{out}/ckpt-000004",
                                      "changed": {"max_steps": [4, 8], "threads": [0, 1]},
                                      "lr": {"now": get_lr(4, now), "before": get_lr(3, saved), "before_at": 3}}]
    assert [r["lr"] for r in logged(out)][4:] == [get_lr(s, now) for s in range(4, 8)]


def test_a_resumed_run_is_advised_only_what_it_may_change(data_dir, tmp_path):
    """--batch-size was advised to a resumed run, whose batches the data position fixes (refused when followed)."""
    out = tmp_path / "run"
    run_cli(*cli_config(data_dir, out, "--max-steps", "2", "--sample-every", "0"), check=True)
    assert "--batch-size 2 or" in run_cli(*cli_config(data_dir, tmp_path / "new", "--total-batch-size", "320")).stderr
    proc = run_cli("train", "--resume", str(out), "--max-steps", "3", "--total-batch-size", "320")
    assert_one_line_error(proc, "total_batch_size 320 is not divisible", "; use --total-batch-size 384")
    assert "--batch-size" not in proc.stderr


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case, needles", [
    ("missing-dir", ["data directory not found"]),
    ("no-train", ["no train shards"]),
    ("token-too-big", ["token id 1500", "vocab_size 1000"]),
    ("not-divisible", ["total_batch_size 300", "not divisible", "128", "use --total-batch-size 384"]),
    ("batch-not-dividing", ["not divisible", "3 * 32 * 1 = 96", "use --batch-size 2 or --total-batch-size 288"]),
    ("too-long", ["seq_len 64", "context"]),
    ("bad-dtype", ["dtype"]),
    ("resume-nothing", ["no checkpoint"]),
    ("resume-a-checkpoint", ["ckpt-000002 is a checkpoint of the run in", "resume the run (--resume",
                             "in Python Trainer(cfg, resume=True) with cfg.out", "which continues from it"]),
    ("resume-other-model", ["resumed run keeps its model", "n_layer 1 (not 3)", "vocab_size 1000 (not 2000)"]),
    ("resume-other-batches", ["data position with other batches", "batch_size 4 (this run: 2)", "--init-from"]),
    ("resume-below-its-step", ["ckpt-000002 is at step 2, beyond max_steps 1: nothing to train"]),
    ("resume-hellaswag-too-long", ["HellaSwag example 0: a row has", "more than the model's context of 32"]),
    ("resume-empty", ["--resume needs the run's directory"]),
    ("out-empty", ["out must name a directory"]),  # "" was the current directory
    ("seed-too-big", [f"seed must be an integer in [0, 2^64), got {2**64}"]),
    ("size-too-big", ["n_embd must be in 1..2^31-1"]),
    # MLX's gather would read past the embedding for the GPT-2 token ids of a prompt or of HellaSwag
    ("prompt-outside-vocab", ["samples: the prompt: token id 15496", "vocab_size of 1000", "sample_every 0"]),
    ("hellaswag-outside-vocab", ["HellaSwag needs GPT-2's 50257 tokens", "vocab_size 1000"]),
    # a config that cannot run is said before its data is read (and before a missing data directory)
    ("hellaswag-outside-vocab-no-data", ["HellaSwag needs GPT-2's 50257 tokens", "vocab_size 1000"]),
    # the examples are loaded at start: a resumed run would otherwise train until its first HellaSwag step
    ("resume-hellaswag-missing", ["nope.jsonl: file not found"]),
])
def test_bad_input_is_one_clear_line(case, needles, data_dir, tmp_path):
    out = tmp_path / "run"
    args = cli_config(data_dir, out, "--max-steps", "2")
    if case == "missing-dir":
        args[2] = str(tmp_path / "nope")
    elif case == "no-train":
        args[2] = str(write_shards(tmp_path / "d", [], token_stream(500, 0)))
    elif case == "token-too-big":
        args[2] = str(write_shards(tmp_path / "d", [np.full(500, 1500)], token_stream(500, 0)))
    elif case == "not-divisible":
        args += ["--total-batch-size", "300"]
    elif case == "batch-not-dividing":
        args += ["--batch-size", "3"]
    elif case == "too-long":
        args += ["--seq-len", "64"]
    elif case == "bad-dtype":
        args += ["--dtype", "float16"]
    elif case == "resume-nothing":
        (tmp_path / "empty").mkdir()
        args = ["train", "--resume", str(tmp_path / "empty")]
    elif case == "resume-a-checkpoint":
        run_cli(*args, check=True)
        args = ["train", "--resume", str(out / "ckpt-000002")]
    elif case == "resume-other-model":
        run_cli(*args, check=True)
        args = ["train", "--resume", str(out), "--max-steps", "3", "--n-layer", "3", "--vocab-size", "2000",
                "--n-head", "2"]  # the same n_head is no change
    elif case == "resume-hellaswag-too-long":  # found at the first HellaSwag step, after training, before
        from test_evaluate import make_hellaswag, write_jsonl

        run_cli(*args, "--vocab-size", "50304", check=True)
        data = write_jsonl(tmp_path / "long.jsonl", [{**make_hellaswag(1)[0], "ctx": "word " * 40}])
        args = ["train", "--resume", str(out), "--max-steps", "6", "--hellaswag-every", "1000", "--hellaswag-data",
                str(data)]
    elif case == "resume-empty":
        args = ["train", "--resume", ""]
    elif case == "out-empty":
        args[4] = ""
    elif case == "seed-too-big":
        args += ["--seed", str(2**64)]
    elif case == "size-too-big":
        args += ["--n-embd", str(2**40)]
    elif case == "resume-below-its-step":
        run_cli(*args, check=True)
        args = ["train", "--resume", str(out), "--max-steps", "1"]
    elif case == "resume-other-batches":
        run_cli(*args, check=True)
        args = ["train", "--resume", str(out), "--max-steps", "3", "--batch-size", "2"]
    elif case == "prompt-outside-vocab":
        args += ["--sample-every", "1", "--prompt", "Hello"]
    elif case == "hellaswag-outside-vocab":
        args += ["--hellaswag-every", "1"]
    elif case == "hellaswag-outside-vocab-no-data":
        args[2] = str(tmp_path / "nope")
        args += ["--hellaswag-every", "1"]
    elif case == "resume-hellaswag-missing":
        run_cli(*args, "--vocab-size", "50304", check=True)
        args = ["train", "--resume", str(out), "--max-steps", "40", "--hellaswag-every", "30", "--hellaswag-data",
                str(tmp_path / "nope.jsonl")]
    log = (out / "log.txt").read_text() if case.startswith("resume-") and (out / "log.txt").exists() else None
    assert_one_line_error(run_cli(*args), *needles)
    # refused before the first step
    assert ((out / "log.txt").read_text() if (out / "log.txt").exists() else None) == log
    if case in ("resume-nothing", "resume-a-checkpoint"):  # no lock file left in what is no run
        assert not (Path(args[2]) / ".lock").exists()


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    # lr 1e30 makes the weights ~1e30 after one update: the next forward overflows
    proc = run_cli(*cli_config(data_dir, out, "--max-steps", "5", "--max-lr", "1e30", "--warmup-steps", "0",
                               "--checkpoint-every", "1"))
    assert_one_line_error(proc, "step 1:", "not finite", "previous checkpoint")
    assert [p.name for p in checkpoints(out)] == ["ckpt-000001"]
    assert all(np.isfinite(w).all() for w in flat_weights(out).values())


def test_an_infinite_gradient_norm_stops_as_a_nan_loss_does(data_dir, tmp_path):
    """A finite loss with an overflowing gradient would be clipped to nan weights: stopped at that step too."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=4))
    finish = trainer.queue.finish
    trainer.queue.finish = lambda s: (lambda loss, norm, dt: (loss, math.inf if s.step == 1 else norm, dt))(
        *finish(s))
    with pytest.raises(UserError, match="step 1: loss .* / grad norm inf is not finite"):
        trainer.train()
    assert checkpoints(tmp_path / "run") == []


def test_config_validation():
    with pytest.raises(UserError, match="unknown training preset"):
        TrainConfig.preset("gpt5")
    with pytest.raises(UserError, match="max_lr"):
        TrainConfig(max_lr=0)
    with pytest.raises(UserError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(UserError, match="eps must be > 0"):  # AdamW would write 0 / 0 = nan into every weight
        TrainConfig(eps=0)  # whose gradient is exactly 0 (wpe's rows past seq_len)
    for name in ("batch_size", "max_lr"):  # one bound per field, whichever side the value is on
        for bad in (0, -1):
            with pytest.raises(UserError, match=f"{name} must be > 0, got {bad}"):
                TrainConfig(**{name: bad})
    # the cosine would rise from max_lr to its "minimum"
    with pytest.raises(UserError, match="min_lr 0.01 exceeds max_lr 0.001"):
        TrainConfig(max_lr=1e-3, min_lr=1e-2)
    with pytest.raises(UserError, match="min_lr_ratio must be at most 1"):
        TrainConfig(min_lr_ratio=2)
    assert TrainConfig(max_lr=1e-3, min_lr=1e-3, min_lr_ratio=1).final_lr == 1e-3  # a constant LR is fine
    # one range said for each value out of it: -1 was told ">= 0", then 0 "1..2^31-1" (or "(0, 1]")
    for name, bad, said in (("n_layer", -1, "in 1..2\\^31-1"), ("n_layer", 0, "in 1..2\\^31-1"),
                            ("block_size", 2**31, "in 1..2\\^31-1"), ("cooldown_frac", -1, "in \\(0, 1\\]"),
                            ("cooldown_frac", 0, "in \\(0, 1\\]")):
        with pytest.raises(UserError, match=f"^{name} must be {said}, got {bad}$"):
            TrainConfig(**{name: bad})
    # it was "samples: max_new_tokens must be >= 1", a name TrainConfig does not have, once a Trainer was made
    with pytest.raises(UserError, match="^sample_tokens must be > 0 where samples are taken, got 0"):
        TrainConfig(sample_tokens=0)
    assert TrainConfig(sample_tokens=0, sample_every=0).sample_tokens == 0  # no samples: no tokens needed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the GPUs' default
def test_hellaswag_during_training_is_logged(dtype, data_dir, tmp_path, monkeypatch):
    from test_evaluate import make_hellaswag, write_jsonl

    from nanogpt_mlx import evaluate
    from nanogpt_mlx.evaluate import load_hellaswag, score_hellaswag

    data = write_jsonl(tmp_path / "hellaswag_val.jsonl", make_hellaswag(12, ctx_words=(3, 10), ending_words=(1, 8)))
    cfg = tiny_config(data_dir, tmp_path / "run", vocab_size=50304, block_size=64, max_steps=3, hellaswag_every=2,
                      hellaswag_data=str(data), hellaswag_limit=10, dtype=dtype)
    encoded, encode = [], evaluate.encode
    monkeypatch.setattr(evaluate, "encode", lambda text: encoded.append(text) or encode(text))
    result = Trainer(cfg).train()
    assert len(encoded) == 10 * 5  # each example's context and 4 endings, once: at the start, not at each evaluation
    monkeypatch.undo()
    hella = [line.split() for line in (tmp_path / "run" / "log.txt").read_text().splitlines() if " hella " in line]
    assert [h[0] for h in hella] == ["0", "2"]  # every 2 steps and at the last step
    assert result["hellaswag"] == logged(tmp_path / "run", "hella")[-1]["hella"]  # the latest, returned
    # step 0 scores the freshly initialised model on the first 10 examples
    init = GPT(Trainer(replace(cfg, out=str(tmp_path / "fresh"))).model.config, seed=cfg.seed)
    init.set_dtype(getattr(mx, dtype))
    expected = score_hellaswag(init, load_hellaswag(data, limit=10), progress=False).acc_norm
    assert float(hella[0][2]) == pytest.approx(expected, abs=1e-4)


def test_adamw_step_scalars_are_shared_and_match_pytorch():
    """Bias corrections and the decay factor are computed once per step for every tensor of a group (not three
    kernels per tensor on a GPU), and the update is still PyTorch's AdamW."""
    import torch

    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2)}
    rng = np.random.default_rng(0)
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    opt = optim_mod.build_nanogpt_adamw(1e-2, 0.1, (0.9, 0.95), 1e-8)
    params = {k: mx.array(v) for k, v in init.items()}
    step = mx.compile(lambda g, p: opt.apply_gradients(g, p), inputs=[opt.state], outputs=[opt.state])
    for g in grads:
        params = step({k: mx.array(v) for k, v in g.items()}, params)
        assert [len(o._scalars) for o in opt.optimizers] == [1, 1]  # per group and dtype, not per tensor
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    topt = torch.optim.AdamW([{"params": [tp["a"], tp["c"]], "weight_decay": 0.1},
                              {"params": [tp["b"]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for g in grads:
        for k, t in tp.items():
            t.grad = torch.tensor(g[k])
        topt.step()
    for k, t in tp.items():
        np.testing.assert_allclose(np.array(params[k]), t.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_failed_hellaswag_download_names_trains_option(data_dir, tmp_path, monkeypatch):
    """The download's hint names --hellaswag-data (train's --data is the token shards), at start."""
    from nanogpt_mlx import evaluate

    monkeypatch.setattr(evaluate, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setenv(evaluate.URL_ENV, "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens there
    cfg = tiny_config(data_dir, tmp_path / "run", vocab_size=50304, hellaswag_every=5)
    with pytest.raises(UserError, match="could not download HellaSwag.*pass --hellaswag-data FILE.*\\(Python: "
                                        "TrainConfig\\(hellaswag_data=FILE\\)\\)"):  # not load_hellaswag(FILE)
        Trainer(cfg)


def test_samples_that_cannot_fit_are_refused_at_the_start(data_dir, tmp_path):
    """--num-samples 10^7 trained until the first samples' step, to be refused there (after a save)."""
    with pytest.raises(UserError, match="^samples: 10000000 samples at once need ~.* GB beside the model, more than "
                                        "this device's memory leaves; at most \\d+ fit \\(sample_every 0 turns "
                                        "them off\\)$"):
        Trainer(tiny_config(data_dir, tmp_path / "run", sample_every=5, num_samples=10**7, prompt="a"))
    assert not (tmp_path / "run").exists()


def test_a_training_prompt_longer_than_the_context_keeps_its_end(data_dir, tmp_path):
    """Samples during training crop the prompt (nanoGPT's generate does), rather than refusing a run at start
    with `sample`'s --crop hint, a flag train does not have."""
    out = tmp_path / "run"
    Trainer(tiny_config(data_dir, out, max_steps=2, sample_every=1, num_samples=1, sample_tokens=4,
                        prompt="The " * 40)).train()  # 40 tokens, a context of 32
    (event,) = logged(out, "sample")
    assert event["texts"][0].startswith(" The The") and event["texts"][0].count("The") < 40  # the end: " The"s


def test_config_values_of_the_wrong_type_are_one_line():
    """From Python a "2" or 2.5 failed far from its cause (a TypeError in a comparison, or in range())."""
    from nanogpt_mlx.sample import SampleConfig

    for bad, needle in [({"n_layer": "2"}, "n_layer must be an integer, got '2'"),
                        ({"batch_size": 2.0}, "batch_size must be an integer, got 2.0"),
                        ({"max_lr": "1e-3"}, "max_lr must be a number"), ({"seed": None}, "seed must be an integer"),
                        ({"shuffle": 1}, "shuffle must be true or false"),
                        ({"n_layer": True}, "n_layer must be an integer, got True"),  # a bool is an int to Python
                        ({"max_lr": False}, "max_lr must be a number, got False")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            TrainConfig(**bad)
    assert TrainConfig(max_lr=1, min_lr=None).max_lr == 1  # an int is a number; None where the field allows it
    with pytest.raises(UserError, match="TrainConfig has no field nlayer"):
        TrainConfig.preset("shakespeare", nlayer=3)
    with pytest.raises(UserError, match="max_new_tokens must be an integer"):
        SampleConfig(max_new_tokens="5")


def test_numpy_scalars_in_configs_become_python_values():
    """A sweep over np.arange or np.linspace gives NumPy's scalars: they were refused (np.int64 is no int), and a
    config that kept them could not be written to JSON (a checkpoint's config.json)."""
    from dataclasses import asdict

    from nanogpt_mlx.model import GPTConfig
    from nanogpt_mlx.prepare import PrepareConfig
    from nanogpt_mlx.sample import SampleConfig

    configs = [TrainConfig(max_steps=np.int64(5), max_lr=np.float32(0.5), min_lr=np.int32(0), shuffle=np.True_,
                           seed=np.uint8(3)),
               replace(TrainConfig(), batch_size=np.int16(2)),
               SampleConfig(max_new_tokens=np.int64(5), temperature=np.float64(0.5), greedy=np.False_),
               PrepareConfig(shard_size=np.int64(1000)), GPTConfig(n_layer=np.int32(2))]
    for config in configs:
        values = asdict(config)
        assert {type(v) for v in values.values()} <= {int, float, str, bool, type(None)}, values
        json.dumps(values)
    assert (configs[0].max_steps, configs[0].max_lr, configs[0].min_lr, configs[0].shuffle) == (5, 0.5, 0, True)
    assert type(configs[0].min_lr) is int and configs[1].batch_size == 2  # an int stays an int in a float field
    for bad, needle in [({"max_steps": np.float64(5)}, "max_steps must be an integer, got np.float64(5.0)"),
                        ({"max_lr": np.True_}, "max_lr must be a number, got np.True_"),
                        ({"shuffle": np.int64(1)}, "shuffle must be true or false, got np.int64(1)")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            TrainConfig(**bad)


def test_a_seq_len_past_the_context_is_refused_before_the_memory_estimate(data_dir, tmp_path, small_hf_dir):
    """--seq-len 10^20 ran the estimate first, for minutes (a list of T/128 attention blocks); 10^8 was told its
    step needs ~640,009,216 GB, not that it exceeds the model's context. A fine-tuned model's context counts."""
    for seq_len in (10**8, 100):
        with pytest.raises(UserError, match=f"^seq_len {seq_len} exceeds the model's context \\(block_size\\) of 32: "
                                            "give a seq_len \\(--seq-len\\) of at most 32$"):
            Trainer(tiny_config(data_dir, tmp_path / "run", seq_len=seq_len))
    with pytest.raises(UserError, match="^seq_len 100000000 exceeds the model's context \\(block_size\\) of 64: "
                                        "give a seq_len \\(--seq-len\\) of at most 64$"):
        Trainer(tiny_config(data_dir, tmp_path / "tuned", seq_len=10**8, init_from=str(small_hf_dir)))


def test_a_stdout_closed_at_start_saves_and_says_so(data_dir, tmp_path):
    """`train ... >&-`: the run stopped after its first step as if interrupted (status 130, no reason given)."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", *cli_config(data_dir, out, "--max-steps", "6")],
                          stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1), timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "interrupted" not in proc.stderr, proc.stderr
    (ckpt,) = checkpoints(out)
    assert proc.stderr.splitlines()[-1] == (f"nanogpt-mlx: error: stdout: cannot write (it was closed when the command "
                                            f"started); saved {ckpt} (step {int(ckpt.name[5:])}): give it a stdout, "
                                            f"then --resume {out}")


def test_a_closed_stderr_is_no_failure(data_dir, tmp_path):
    """`train ... 2>&-`: the progress bar's stderr was None, the run ended at once with status 1 and no message."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", *cli_config(data_dir, out, "--max-steps", "2")],
                          stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(2), timeout=300)
    assert proc.returncode == 0 and [p.name for p in checkpoints(out)] == ["ckpt-000002"], proc.stdout


def test_a_relative_out_stays_put_when_the_working_directory_changes(data_dir, tmp_path, monkeypatch):
    """A notebook's os.chdir between Trainer(...) and train(): the lock and logs were in the first directory, the
    checkpoints in the second, and the first one's lock was held until the process ended."""
    from nanogpt_mlx import locks

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    trainer = Trainer(tiny_config(data_dir, Path("run"), max_steps=2))
    monkeypatch.chdir(tmp_path / "b")
    trainer.train()
    assert not (tmp_path / "b" / "run").exists() and checkpoints(tmp_path / "a" / "run")
    assert (tmp_path / "a" / "run").resolve() not in locks._locked


@pytest.mark.parametrize("threads", [1, 2])
def test_a_dropped_trainer_frees_its_memory_without_the_cycle_collector(data_dir, tmp_path, threads):
    """The compiled steps' closures held the Trainer: a notebook's sweep kept each finished Trainer's weights,
    optimizer state and step threads until Python's cycle collector ran, which MLX's allocations do not prompt."""
    import gc
    import weakref

    import mlx.core as mx

    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=2, threads=threads, val_every=1,
                                  sample_every=1, num_samples=1, sample_tokens=2, prompt="a", checkpoint_every=1))
    trainer.train()
    # what it alone holds: the float32 masters and the optimizer's moments (other tests' arrays may be alive too)
    own = sum(a.nbytes for _, a in tree_flatten([trainer.master, trainer.optimizer.state]))
    gone, before = weakref.ref(trainer), mx.get_active_memory()
    gc.disable()
    try:
        del trainer
        assert gone() is None
        assert before - mx.get_active_memory() >= own
    finally:
        gc.enable()


def test_a_trainer_saved_in_one_thread_trains_in_another(data_dir, tmp_path):
    """save() left the model's weights lazy on its thread's stream: train() or a sample in another thread failed
    ("There is no Stream(cpu, 0) in current thread"), and the Trainer then refused to go on, as if broken amid a
    step."""
    import threading

    import mlx.core as mx

    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=4))
    trainer.train(until=1)
    trainer.save()
    errors = []

    def in_a_thread(until: int) -> None:
        try:
            trainer.train(until=until)
            sample_texts(trainer.model, "The", SampleConfig(max_new_tokens=2, seed=0))
            trainer.save()  # and back: the main thread trains after this thread's save
        except Exception as e:  # (re-raised in the main thread)
            errors.append(e)
        mx.clear_streams()  # as the README asks of a thread that used MLX

    thread = threading.Thread(target=in_a_thread, args=(2,))
    thread.start()
    thread.join()
    assert not errors, errors
    trainer.train(until=3)
    assert trainer.step == 3


def test_no_second_trainer_of_an_out_while_one_trains_in_a_thread(data_dir, tmp_path):
    """A Trainer made (resume=True) while another of the same OUT trained in a notebook's thread was accepted: both
    trained at once, their log lines interleaved, until the older one's next save refused and lost its steps."""
    import threading

    cfg = tiny_config(data_dir, tmp_path / "run", max_steps=4, checkpoint_every=2)
    first = Trainer(cfg)
    inside, go_on = threading.Event(), threading.Event()
    finish = first.queue.finish

    def held(queued):
        if queued.step == 3:  # (after its checkpoint of step 2, which a resume reads)
            inside.set()
            go_on.wait(60)
        return finish(queued)

    first.queue.finish = held
    thread = threading.Thread(target=first.train)
    thread.start()
    try:
        assert inside.wait(60)
        for make in (lambda: Trainer(cfg, resume=True), lambda: Trainer(cfg, overwrite=True), first.train):
            with pytest.raises(UserError, match=r"a Trainer of .*run is training in this process \(another thread\)"):
                make()
    finally:
        go_on.set()
        thread.join()
    assert first.step == 4 and [r["step"] for r in logged(tmp_path / "run")] == [0, 1, 2, 3]
    assert Trainer(cfg, resume=True).step == 4  # once it has returned


def test_a_notebooks_trainer_after_an_escaped_error_a_newer_one_or_a_thread(data_dir, tmp_path, monkeypatch):
    """In one process: train() after an error had escaped amid a step (a second Ctrl-C) went on from weights, step
    and data position that disagree; an older Trainer of the same OUT wrote that run's checkpoints and logs too; a
    Trainer trained in a thread could not be used from the main thread afterwards (MLX's per-thread streams); and
    resuming with other model sizes trained the checkpoint's model without a word."""
    import threading

    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, max_steps=4, checkpoint_every=2)
    first = Trainer(cfg)
    thread = threading.Thread(target=first.train, kwargs={"until": 2})
    thread.start()
    thread.join()
    assert first.step == 2 and sample_texts(first.model, "The", SampleConfig(max_new_tokens=2, seed=0))
    newer = Trainer(cfg, resume=True)
    with pytest.raises(UserError, match="a newer Trainer of .* was made in this process"):
        first.train()
    with pytest.raises(UserError, match="a newer Trainer of .* was made in this process"):
        first.save()  # its step 2 published over the newer run's model
    reads = 0
    real = newer.train_loader.next_batch

    def interrupted():
        nonlocal reads
        reads += 1
        if reads == 2:  # while step 3 is being queued
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(newer.train_loader, "next_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        newer.train()
    with pytest.raises(UserError, match="stopped amid a step \\(KeyboardInterrupt\\).*resume=True"):
        newer.train()
    for until in ("3", 2.5, -1):  # a TypeError, or trained to step 3
        with pytest.raises(UserError, match="until must be a step number"):
            Trainer(cfg, resume=True).train(until=until)
    with pytest.raises(UserError, match="until 1 is behind this Trainer's step 2"):  # it returned the old result
        Trainer(cfg, resume=True).train(until=1)
    # a truthy string overwrote (removed) the run's checkpoints; not a TrainConfig failed on its first attribute
    for kwargs, match in ((dict(overwrite="no"), "overwrite must be True or False, got 'no'"),
                          (dict(resume=1), "resume must be True or False, got 1")):
        with pytest.raises(UserError, match=match):
            Trainer(cfg, **kwargs)
    assert checkpoints(out)
    with pytest.raises(UserError, match="cfg must be a TrainConfig .*got str"):
        Trainer(str(out))
    with pytest.raises(UserError, match=r"keeps its model: .*ckpt-000002 has n_layer 2 \(not 3\)"):
        Trainer(replace(cfg, n_layer=3), resume=True)
    assert Trainer(cfg, resume=np.True_).train()["train_loss"] > 0  # (a NumPy bool was refused)
