"""Loss curves of nanogpt-mlx and PyTorch trained from the same weights on the same tokens.

A random GPT-2 (transformers GPT2LMHeadModel, vocab 50304, no dropout, written with save_pretrained) is
trained for --steps steps on Tiny Shakespeare's train tokens in order (build-nanogpt's DataLoaderLite,
which starts over at the end), with build-nanogpt's recipe: AdamW (0.9, 0.95), weight decay 0.1 on >= 2-D
tensors, clip 1.0, warmup then cosine from max_lr 6e-4 (the PyTorch loop is given the schedule's numbers,
from nanogpt_mlx.optim.cosine_lr, tested equal to build-nanogpt's get_lr in tests/test_train.py).
Engines, each in its own process:
  mlx        nanogpt-mlx's Trainer in the device's default dtype (bfloat16 on GPUs), from the same weights
  mlx-fp32   the same in float32 (TF32 matmuls on NVIDIA GPUs)
  torch      build-nanogpt's loop on the transformers model: bf16 autocast on a GPU (fused AdamW), fp32 on a CPU
It prints the losses side by side and the largest difference between `mlx` and `torch`.

    python -m nanogpt_mlx prepare shakespeare --out data/shakespeare
    python benchmarks/bench_curve.py --data data/shakespeare                  # GPT-2 124M, B16 x T1024, 40 steps
    python benchmarks/bench_curve.py --data data/shakespeare --size tiny      # a smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from workers import spawn

SIZES = {  # n_layer, n_embd, n_head, B, T
    "124m": (12, 768, 12, 16, 1024),
    "tiny": (2, 128, 2, 4, 128),
}
ENGINES = ["mlx", "mlx-fp32", "torch"]
MAX_LR, WARMUP = 6e-4, 10


def make_weights(size: str, path: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    L, d, nh, _, _ = SIZES[size]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50304, n_positions=1024, n_embd=d, n_layer=L, n_head=nh,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(path)


def run_mlx(weights: str, data: str, size: str, steps: int, dtype: str) -> list[float]:
    import nanogpt_mlx  # noqa: F401
    from nanogpt_mlx.config import TrainConfig
    from nanogpt_mlx.train import Trainer

    _, _, _, B, T = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=data, out=tmp, init_from=weights, batch_size=B, seq_len=T, total_batch_size=B * T,
                          max_lr=MAX_LR, warmup_steps=WARMUP, max_steps=steps, val_every=0, sample_every=0,
                          hellaswag_every=0, checkpoint_every=0, dtype=dtype)
        Trainer(cfg).train()
        return [r["loss"] for r in map(json.loads, open(Path(tmp) / "log.jsonl")) if r["kind"] == "train"]


def run_torch(weights: str, data: str, size: str, lrs: list[float]) -> list[float]:
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    torch.set_float32_matmul_precision("high")
    _, _, _, B, T = SIZES[size]
    model = GPT2LMHeadModel.from_pretrained(weights).to(dev)
    model.eval()  # no dropout (build-nanogpt's GPT has none)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=MAX_LR, betas=(0.9, 0.95), eps=1e-8, fused=gpu)
    shards = sorted(Path(data).glob("*_train_*.npy"))
    tokens, shard, pos = np.load(shards[0]).astype(np.int64), 0, 0
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    losses = []
    for lr in lrs:
        buf = torch.from_numpy(tokens[pos : pos + B * T + 1]).to(dev)
        pos += B * T
        if pos + B * T + 1 > len(tokens):  # DataLoaderLite: on to the next shard (the first again after the last)
            shard = (shard + 1) % len(shards)
            tokens, pos = np.load(shards[shard]).astype(np.int64), 0
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        optimizer.zero_grad()
        with autocast():
            logits = model(x).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        engine, weights, data, size, arg = sys.argv[2:7]  # arg: steps, or for torch the learning rates
        if engine == "weights":
            make_weights(size, Path(weights))
            out = []
        elif engine == "torch":
            out = run_torch(weights, data, size, json.loads(arg))
        else:
            out = run_mlx(weights, data, size, int(arg), "float32" if engine == "mlx-fp32" else "")
        print("RESULT " + json.dumps(out))
        return
    # the driver's own: a worker, which may run PyTorch, must not load MLX's BLAS
    from nanogpt_mlx.arguments import positive_int
    from nanogpt_mlx.optim import cosine_lr

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a folder of token shards (nanogpt-mlx prepare shakespeare)")
    ap.add_argument("--size", choices=list(SIZES), default="124m", help="model and batch (default: 124m, B16 x T1024)")
    ap.add_argument("--steps", type=positive_int, default=40, help="optimizer steps (default: 40)")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=ENGINES, help="default: all")
    ap.add_argument("--out", default="", help="also write the curves to OUT/bench_curve.json")
    args = ap.parse_args()
    if not sorted(Path(args.data).glob("*_train_*.npy")):
        raise SystemExit(f"{args.data}: no *_train_*.npy shards (nanogpt-mlx prepare shakespeare --out {args.data})")
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights")
        spawn(__file__, "weights", weights, args.data, args.size, "0")
        # the PyTorch loop gets the schedule as numbers: its worker imports nothing of nanogpt-mlx (nor MLX)
        lrs = json.dumps([cosine_lr(s, MAX_LR, 0.1 * MAX_LR, WARMUP, args.steps) for s in range(args.steps)])
        curves = {e: spawn(__file__, e, weights, args.data, args.size, lrs if e == "torch" else str(args.steps))
                  for e in args.engines}
    print("step | " + " | ".join(curves))
    for s in range(args.steps):
        if s % 5 == 0 or s == args.steps - 1:
            print(f"{s:4d} | " + " | ".join(f"{c[s]:.4f}" for c in curves.values()))
    summary = {}
    if "mlx" in curves and "torch" in curves:
        diffs = [abs(a - b) for a, b in zip(curves["mlx"], curves["torch"])]
        summary = {"max_abs_diff": max(diffs), "step_of_max": diffs.index(max(diffs)),
                   "last": {e: c[-1] for e, c in curves.items()}}
        print(f"mlx vs torch: max |loss difference| {summary['max_abs_diff']:.4f} at step {summary['step_of_max']}; "
              "last step " + ", ".join(f"{e} {v:.4f}" for e, v in summary["last"].items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, "bench_curve.json").write_text(json.dumps({"curves": curves, **summary}, indent=1))


if __name__ == "__main__":
    main()
