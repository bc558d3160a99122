"""Where a bf16 training step's time and memory go on the default MLX device, part by part.

GPT-2 124M, vocab 50304, B16 x T1024 (--quick: a tiny model, as a smoke test on the CPU). Each part is
compiled and timed in this one process (median of timed reps after warm-up), with the peak memory
above what was live before it. Parts: the bf16 GEMM; the CUDA cross-entropy kernel against MLX's ops
(values and speed); the head + loss (forward and backward) through MLX's ops in chunks, through the
kernel, and as plain autodiff; each op of one block alone (attention's variants: bench_attention.py); the
body; AdamW, clipping, casts; the host's time to build a step's graph; and whole Trainer steps with each
head + loss swapped in. Results are printed and written to OUT/profile_step.json as they come, so a run
stopped early still reports what it measured.

    python benchmarks/profile_step.py [--quick] [--parts block model ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

import nanogpt_mlx  # noqa: F401  (sets the device up before mlx.core)
from nanogpt_mlx import cuda, device, kernels
from nanogpt_mlx import train as train_mod
from nanogpt_mlx.loss import make_losses
from nanogpt_mlx.model import GPT, GPTConfig
from nanogpt_mlx.optim import Packing, apply_scaled, build_nanogpt_adamw, clip_grad_norm, clip_scale, decay_group

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

VOCAB = 50304
PARTS = ["gemm", "kernel", "head", "block", "model", "optimizer", "host", "trainer"]
results: dict = {}
out_file = Path("profile_step.json")


def record(name: str, value) -> None:
    results[name] = value
    print(f"{name:44s} {value}", flush=True)
    out_file.write_text(json.dumps(results, indent=1))


def timed(name: str, fn, reps: int = 8, warmup: int = 2, **extra) -> float | None:
    """Median ms of mx.eval(fn()), and the peak memory (GB) above what was live before."""
    try:
        for _ in range(warmup):
            mx.eval(fn())
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        ms = median(times) * 1000
        record(name, {"ms": round(ms, 3), "peak_gb": round((mx.get_peak_memory() - base) / 1e9, 3), **extra})
        return ms
    except Exception as e:  # noqa: BLE001  (keep profiling the other parts)
        record(name, {"error": f"{type(e).__name__}: {e}"[:400]})
        return None


def normal_bf16(rng: np.random.Generator, shape: tuple[int, ...], std: float = 1.0) -> mx.array:
    """A bfloat16 array of N(0, std^2) values (numpy's generator: the same values on every device)."""
    return mx.array(rng.normal(0, std, shape).astype(np.float32)).astype(mx.bfloat16)


def plain_loss(h, w, y, softcap=0.0):
    """Autodiff reference: bf16 logits, cross-entropy in float32."""
    logits = (h.reshape(-1, h.shape[-1]) @ w.T).astype(mx.float32)
    if softcap:
        logits = softcap * mx.tanh(logits / softcap)
    return nn.losses.cross_entropy(logits, y.reshape(-1), reduction="mean")


def check_kernel(n_rows: int) -> None:
    """The CUDA kernel's loss and gradient against float32 MLX ops on the same bf16 logits."""
    rng = np.random.default_rng(0)
    logits = normal_bf16(rng, (n_rows, VOCAB), 4.0)
    y = mx.array(rng.integers(0, VOCAB, n_rows).astype(np.int32))
    for cap in (0.0, 15.0):
        z = logits.astype(mx.float32)
        if cap:
            z = cap * mx.tanh(z / cap)
        lse = mx.logsumexp(z, axis=-1)
        ref_loss = lse - mx.take_along_axis(z, y[:, None], axis=-1)[:, 0]
        ref_d = (mx.exp(z - lse[:, None]) - (mx.arange(VOCAB) == y[:, None])) / n_rows
        if cap:
            ref_d = ref_d * (1 - mx.square(z / cap))
        loss, d = cuda.cross_entropy_rows(logits, y, cap, n_rows)
        err_loss = mx.max(mx.abs(loss - ref_loss)).item()
        err_d = (mx.max(mx.abs(d.astype(mx.float32) - ref_d)) / mx.max(mx.abs(ref_d))).item()
        record(f"kernel check cap={cap:g}", {"max_abs_loss_err": err_loss, "max_rel_grad_err": err_d,
                                             "ok": err_loss < 1e-3 and err_d < 1e-2})


def head_variants(N: int, C: int) -> dict:
    """name -> training loss function (h, w, y, softcap) with its gradient."""
    sizes = {"4096": 4096, "all": N}
    found = {f"ops rows={k}": make_losses(r)[0] for k, r in sizes.items()}
    if cuda.available():
        found.update({f"kernel rows={k}": make_losses(r, rowwise=cuda.cross_entropy_rows)[0] for k, r in sizes.items()})
    found["plain autodiff"] = plain_loss
    return found


def head_part(B: int, T: int, C: int) -> None:
    N = B * T
    rng = np.random.default_rng(1)
    h, w = normal_bf16(rng, (N, C)), normal_bf16(rng, (VOCAB, C), 0.02)
    y = mx.array(rng.integers(0, 50257, N).astype(np.int32))
    ref = mx.value_and_grad(lambda h_, w_: plain_loss(h_.astype(mx.float32), w_.astype(mx.float32), y), argnums=(0, 1))(h, w)
    mx.eval(ref)
    for name, loss in head_variants(N, C).items():
        vg = mx.compile(mx.value_and_grad(lambda h_, w_, loss=loss: loss(h_, w_, y), argnums=(0, 1)))
        got = vg(h, w)
        errs = {"loss_err": abs(got[0].item() - ref[0].item()),
                "dh_rel_err": (mx.max(mx.abs(got[1][0] - ref[1][0])) / mx.max(mx.abs(ref[1][0]))).item(),
                "dw_rel_err": (mx.max(mx.abs(got[1][1] - ref[1][1])) / mx.max(mx.abs(ref[1][1]))).item()}
        timed(f"head+loss fwd+bwd, {name}", lambda vg=vg: vg(h, w), **{k: float(f"{v:.2e}") for k, v in errs.items()})


def block_part(B: int, T: int, C: int, nh: int, L: int) -> None:
    """Each op of one GPT-2 block, forward + backward alone (against a random cotangent), and their sum times L:
    what the body's time would be if nothing else happened."""
    rng = np.random.default_rng(4)
    x, x4 = normal_bf16(rng, (B, T, C)), normal_bf16(rng, (B, T, 4 * C))
    ln = nn.LayerNorm(C)
    ln.set_dtype(mx.bfloat16)
    ops = {"layernorm": (lambda a: ln(a), [x])}
    for name, (n_in, n_out) in {"c_attn": (C, 3 * C), "attn c_proj": (C, C), "c_fc": (C, 4 * C)}.items():
        ops[f"linear {name}"] = (lambda a, w, b: mx.addmm(b, a, w.T),
                                 [normal_bf16(rng, (B, T, n_in)), normal_bf16(rng, (n_out, n_in), 0.02),
                                  normal_bf16(rng, (n_out,))])
    ops["gelu + mlp c_proj (kernels.activation_matmul)"] = (
        lambda a, w, b: kernels.activation_matmul("gelu", a, w, b),
        [x4, normal_bf16(rng, (C, 4 * C), 0.02), normal_bf16(rng, (C,))])

    def attention(qkv):  # the model's layout: split, heads out, fused attention, heads back
        q, k, v = (a.reshape(B, T, nh, C // nh).transpose(0, 2, 1, 3) for a in mx.split(qkv, 3, axis=-1))
        return kernels.attention(q, k, v, (C // nh) ** -0.5, True).transpose(0, 2, 1, 3).reshape(B, T, C)

    ops["attention with its layout"] = (attention, [normal_bf16(rng, (B, T, 3 * C))])
    ops["residual add"] = (mx.add, [x, x])
    total = 0.0
    for name, (f, args) in ops.items():
        g = mx.random.normal(f(*args).shape).astype(mx.bfloat16)
        vg = mx.compile(mx.value_and_grad(lambda *a, f=f, g=g: (f(*a) * g).astype(mx.float32).sum(),
                                          argnums=tuple(range(len(args)))))
        ms = timed(f"block op fwd+bwd, {name}", lambda vg=vg, args=args: vg(*args))
        total += (ms or 0.0) * (2 if name in ("layernorm", "residual add") else 1)
    record(f"block ops x {L} layers (2 layernorms, 2 residual adds per block)", {"ms": round(total * L, 2)})


def model_parts(model: GPT, x: mx.array, y: mx.array, N: int) -> None:
    state = [model.state]
    timed("body fwd (hidden)", mx.compile(lambda: model.hidden(x), inputs=state, outputs=state))
    body = nn.value_and_grad(model, lambda m: m.hidden(x).astype(mx.float32).square().mean())
    timed("body fwd+bwd (no head)", mx.compile(lambda: body(model), inputs=state, outputs=state))
    for name, loss in head_variants(N, model.config.n_embd).items():
        vg = nn.value_and_grad(model, lambda m, loss=loss: loss(m.hidden(x), m.head_weight, y))
        timed(f"model fwd+bwd, {name}", mx.compile(lambda vg=vg: vg(model), inputs=state, outputs=state))


VIEWS = {"Reshape", "Slice", "Squeeze", "ExpandDims", "Broadcast", "View", "Transpose"}  # no kernel: metadata


def kernel_count(outputs) -> int:
    """Primitives other than views in the graph of `outputs` (of a compiled call: its fused kernels)."""
    buf = io.StringIO()
    mx.export_to_dot(buf, *(a for _, a in tree_flatten(outputs)))
    labels = re.findall(r'label ="([^"]+)", shape=rectangle', buf.getvalue())
    return sum(label not in VIEWS for label in labels)


def optimizer_parts(model: GPT) -> None:
    """Clipping + AdamW + the bf16 copy of float32 masters, per tensor against optim.Packing's buckets (what
    the Trainer runs for build-nanogpt's recipe: the gradients are packed first, in bf16)."""
    master = tree_map(lambda p: p.astype(mx.float32), model.parameters())
    keys = iter(mx.random.split(mx.random.key(0), len(tree_flatten(master))))
    grads = tree_map(lambda p: (mx.random.normal(p.shape, key=next(keys)) * 1e-3).astype(mx.bfloat16), master)
    mx.eval(master, grads)
    for packing in (Packing(master, None), Packing(master, decay_group)):
        label = "packed" if packing.slots else "per tensor"
        opt = build_nanogpt_adamw(6e-4, 0.1, (0.9, 0.95), 1e-8)
        box = {"master": packing.pack(tree_map(lambda a: a, master))}
        opt.init(box["master"])
        mx.eval(box, opt.state)

        def update():
            g = tree_map(lambda a: a.astype(mx.float32), packing.pack(grads))
            scale, norm = clip_scale(g, 1.0)  # as the Trainer: the factor inside AdamW's kernels
            box["master"] = apply_scaled(opt, g, box["master"], scale)
            box["model"] = packing.unpack(box["master"], mx.bfloat16)
            return norm, box

        state = [opt.state, box]
        step = mx.compile(update, inputs=state, outputs=state)
        timed(f"clip + AdamW + bf16 copy, {label}", step, kernels=kernel_count(step()))
    timed("clip_grad_norm alone, per tensor", mx.compile(lambda: clip_grad_norm(grads, 1.0)))


def write_shards(directory: str, n: int) -> None:
    rng = np.random.default_rng(0)
    np.save(f"{directory}/p_val_000000.npy", rng.integers(0, 50257, n).astype(np.uint16))
    np.save(f"{directory}/p_train_000001.npy", rng.integers(0, 50257, n).astype(np.uint16))


def host_part(L: int, d: int, nh: int) -> None:
    """The host's share of a Trainer step: building the compiled step's graph (the call, before evaluation), which
    the device waited for between steps before the Trainer built each step while the device ran the one before;
    and the graph's size. At B1 x T128 (the graph is the same at any B and T), float32 on a CPU (faster there)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(tmp, 128 * 12 + 1)
        dtype = "float32" if mx.default_device() == mx.cpu else "bfloat16"
        cfg = train_mod.TrainConfig(data=tmp, out=f"{tmp}/out", n_layer=L, n_head=nh, n_embd=d, block_size=1024,
                                    batch_size=1, seq_len=128, total_batch_size=128, dtype=dtype, val_every=0,
                                    sample_every=0, hellaswag_every=0)
        trainer = train_mod.Trainer(cfg)
        state = (trainer.model.state, trainer.optimizer.state, trainer.master)
        mx.eval(state)
        builds, size = [], 0
        for _ in range(6):
            x, y = (mx.array(a) for a in trainer.train_loader.next_batch())
            start = time.perf_counter()
            loss, norm = trainer._update(x, y, None)
            builds.append(time.perf_counter() - start)
            size = size or kernel_count((loss, norm, state))  # the same graph every time: count it once
            mx.eval(loss, norm, state)
    record(f"host: build a Trainer step's graph ({dtype})", {"ms": round(median(builds[2:]) * 1000, 2),
                                                            "primitives": size})


def trainer_step(label: str, loss, L: int, d: int, nh: int, B: int, T: int, **overrides) -> None:
    """Median step (after 3) and peak memory of the public Trainer with `loss` as the head + loss."""
    saved = kernels.cross_entropy
    kernels.cross_entropy = loss
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_shards(tmp, B * T * 12 + 1)
            cfg = train_mod.TrainConfig(data=tmp, out=f"{tmp}/out", n_layer=L, n_head=nh, n_embd=d, block_size=1024,
                                        batch_size=B, seq_len=T, total_batch_size=B * T, warmup_steps=5,
                                        max_steps=11, val_every=0, sample_every=0, hellaswag_every=0,
                                        checkpoint_every=0, dtype="bfloat16", **overrides)
            mx.clear_cache()
            mx.reset_peak_memory()
            train_mod.Trainer(cfg).train()
            dts = [json.loads(line)["dt"] for line in open(f"{tmp}/out/log.jsonl") if '"train"' in line][3:]
        ms = median(dts) * 1000
        record(f"Trainer step, {label}", {"ms": round(ms, 2), "tok_s": round(B * T / ms * 1000),
                                          "peak_gb": round(mx.get_peak_memory() / 1e9, 2)})
    except Exception as e:  # noqa: BLE001
        record(f"Trainer step, {label}", {"error": f"{type(e).__name__}: {e}"[:400]})
    finally:
        kernels.cross_entropy = saved


def main() -> None:
    global out_file
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model: a smoke test of the script on any device")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"),
                    help="folder for profile_step.json (default: $OUT, else out/)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="what to time (default: all)")
    args = ap.parse_args()
    out_file = Path(args.out) / "profile_step.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    L, d, nh, B, T = (2, 64, 2, 2, 128) if args.quick else (12, 768, 12, 16, 1024)
    N = B * T

    record("setup", {"mlx": mx.__version__, "device": str(mx.default_device()), "profile": device.PROFILE.name,
                     "kernel": cuda.available(), "info": mx.device_info().get("device_name", ""),
                     "attention": device.PROFILE.attention_note("bfloat16", d // nh, T)
                     or ("fused both ways" if device.PROFILE.fused_attention("bfloat16", d // nh) else "plain ops")})
    if "gemm" in args.parts:
        n = 1024 if args.quick else 8192
        a = mx.random.normal((n, n)).astype(mx.bfloat16)
        ms = timed(f"bf16 GEMM {n}^3", lambda: a @ a)
        if ms:
            record("bf16 GEMM TFLOP/s", round(2 * n**3 / ms / 1e9, 1))
    if "kernel" in args.parts and cuda.available():
        check_kernel(256 if args.quick else 2048)
    if "head" in args.parts:
        head_part(B, T, d)
    if "block" in args.parts:
        block_part(B, T, d, nh, L)
    model = GPT(GPTConfig(block_size=1024, vocab_size=VOCAB, n_layer=L, n_head=nh, n_embd=d), seed=0)
    model.set_dtype(mx.bfloat16)
    rng = np.random.default_rng(3)
    x, y = (mx.array(rng.integers(0, 50257, (B, T)).astype(np.int32)) for _ in range(2))
    mx.eval(model.parameters())
    if "model" in args.parts:
        model_parts(model, x, y, N)
    if "optimizer" in args.parts:
        optimizer_parts(model)
    del model
    if "host" in args.parts:
        host_part(L, d, nh)
    if "trainer" not in args.parts:
        return
    for name, loss in head_variants(N, d).items():
        trainer_step(name, loss, L, d, nh, B, T)
    best = min((k for k, v in results.items() if k.startswith("Trainer step") and "ms" in v),
               key=lambda k: results[k]["ms"], default=None)
    if best:
        name = best.removeprefix("Trainer step, ")
        trainer_step(f"{name}, activation checkpointing", head_variants(N, d)[name], L, d, nh, B, T,
                     activation_checkpointing=True)
        trainer_step(f"{name}, B{2 * B}", head_variants(2 * N, d)[name], L, d, nh, 2 * B, T)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
