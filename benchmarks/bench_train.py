"""Training tokens/s: nanogpt-mlx vs PyTorch (build-nanogpt's GPT and loop, eager and torch.compile).

Configs (fp32, all cores, one optimizer step per micro-batch):
  a: 4 layers, 256 dims, 4 heads, vocab 50304, B8 x T256
  b: GPT-2 124M (12 layers, 768 dims, 12 heads), vocab 50304, B4 x T256
  c: config a's model and tokens per step at GPT-2's sequence length, B2 x T1024
Each engine runs in its own process (MLX loads MKL or OpenBLAS globally, which would change
PyTorch's BLAS in the same process). A step is forward + backward + clip + AdamW, timed after warm-up
steps; engines take turns for --rounds rounds and the table shows each engine's best round
(median step of the round), which filters out other load on a shared machine. nanogpt-mlx runs
through its public `Trainer` on random token shards, with the device's step threads (threads.py);
`mlx-1thread` with --threads 1 (one stream, GEMMs on all cores); `mlx-2ranks` is `nanogpt-mlx train --ranks 2`
(two single-threaded data-parallel ranks on this machine, B/2 rows each, same tokens per step); `mlx-openblas`
with the system OpenBLAS where `mlx` runs on MKL (an Intel CPU with nanogpt-mlx[mkl]).
PyTorch runs build-nanogpt's train_gpt2.py model and loop written here. MFU = 6N + 12LdT FLOPs
per token against the best measured fp32 GEMM (2048^3) of either library.

    flock /tmp/nanogpt-cpu.lock python benchmarks/bench_train.py
    python benchmarks/bench_train.py --configs a --steps 3 --engines mlx torch

--device gpu (an NVIDIA GPU with mlx[cuda] and PyTorch CUDA in one environment): GPT-2 124M at B16 and
B32 x T1024 and the gpt2-medium shape at B16; engines `mlx` (the device profile's bf16), `mlx-fp32`
(TF32 matmuls), `torch.compile` (build-nanogpt: bf16 autocast, fused AdamW, flash SDPA), `torch`
(eager, bf16 autocast) and `torch-fp32` (eager, TF32); MFU against the measured bf16 GEMM (8192^3) of
either library; peak memory from mx.get_peak_memory / torch.cuda.max_memory_allocated.

    python benchmarks/bench_train.py --device gpu --rounds 1
    python benchmarks/bench_train.py --device gpu --configs 124m-b16 --engines mlx --memory-limit 12
    python benchmarks/bench_train.py --device gpu --configs 124m-b16 --engines mlx --cap-memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from workers import blas, missing_gpu, openblas_beside_mkl, spawn

CONFIGS = {  # n_layer, n_embd, n_head, B, T
    "a": (4, 256, 4, 8, 256),
    "b": (12, 768, 12, 4, 256),
    "c": (4, 256, 4, 2, 1024),
}
VOCAB = 50304
# mlx-2ranks: 2 single-threaded ranks; mlx-openblas: OpenBLAS where MKL is the default BLAS (cpu.py), by default
# only where both are installed
ENGINES = ["mlx", "mlx-1thread", "mlx-2ranks", "mlx-openblas", "torch", "torch.compile"]
GPU_CONFIGS = {
    "124m-b16": (12, 768, 12, 16, 1024),
    "124m-b32": (12, 768, 12, 32, 1024),
    "350m-b16": (24, 1024, 16, 16, 1024),
}
GPU_ENGINES = ["mlx", "mlx-fp32", "torch.compile", "torch", "torch-fp32"]


def flops_per_token(L: int, d: int, T: int) -> float:
    """PaLM / nanoGPT estimate: 6 * params (without wpe, with the tied head) + attention."""
    params = VOCAB * d + L * (12 * d * d + 13 * d) + 2 * d
    return 6 * params + 12 * L * d * T


# ------------------------------------------------------------------------------------- workers
def run_mlx(cfg_name: str, steps: int, warmup: int, ranks: int = 1, dtype: str = "", threads: int = 0) -> dict:
    """Through the public API, or with ranks > 1 as `nanogpt-mlx train --ranks N` (one BLAS thread each,
    B / N rows each: the same tokens per optimizer step)."""
    import numpy as np

    import nanogpt_mlx  # noqa: F401  (OpenBLAS before mlx.core)
    from nanogpt_mlx.config import TrainConfig
    from nanogpt_mlx.launch import launch_local
    from nanogpt_mlx.train import Trainer

    import mlx.core as mx

    L, d, nh, B, T = {**CONFIGS, **GPU_CONFIGS}[cfg_name]
    if os.environ.get("BENCH_MEMORY_LIMIT"):  # --memory-limit
        mx.set_memory_limit(int(float(os.environ["BENCH_MEMORY_LIMIT"]) * 1e9))
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        n = B * T * (steps + warmup) + 1
        np.save(Path(tmp) / "bench_val_000000.npy", rng.integers(0, 50257, n).astype(np.uint16))
        np.save(Path(tmp) / "bench_train_000001.npy", rng.integers(0, 50257, n).astype(np.uint16))
        fields = dict(data=tmp, out=str(Path(tmp) / "out"), n_layer=L, n_head=nh, n_embd=d, block_size=1024,
                      batch_size=B // ranks, seq_len=T, total_batch_size=B * T, warmup_steps=10,
                      max_steps=warmup + steps, val_every=0, sample_every=0, hellaswag_every=0, checkpoint_every=0,
                      dtype=dtype, cap_memory=bool(os.environ.get("BENCH_CAP_MEMORY")), threads=threads)
        if ranks == 1:
            Trainer(TrainConfig(**fields)).train()
        else:
            argv = ["train"]
            for k, v in fields.items():
                flag = f"--{k.replace('_', '-')}"
                if isinstance(v, bool):  # a switch: given or not
                    argv += [flag] if v else []
                elif v != "":  # an empty value keeps the CLI's default
                    argv += [flag, str(v)]
            if launch_local(ranks, argv, threads_per_rank=1):
                raise SystemExit("a rank failed")
        records = [json.loads(line) for line in open(Path(tmp) / "out" / "log.jsonl")]
    need = [r["need"] / 1e9 for r in records if r["kind"] == "memory"]  # --cap-memory's measured step
    # with ranks, this process only launched them: their peaks are not its own
    peak_gb = mx.get_peak_memory() / 1e9 if ranks == 1 else math.nan
    return {"dt": [r["dt"] for r in records if r["kind"] == "train"][warmup:], "peak_gb": peak_gb,
            **({"need_gb": need[0]} if need else {})}


def torch_step(cfg_name: str, compile: bool, gpu: bool = False, amp: bool = False):
    """build-nanogpt's model, AdamW and loop body for config `cfg_name`: a function that runs one optimizer step
    on random tokens and waits for it."""
    import contextlib

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(1337)
    torch.set_float32_matmul_precision("high")  # build-nanogpt: TF32 where the GPU has it
    dev = "cuda" if gpu else "cpu"
    L, d, nh, B, T = {**CONFIGS, **GPU_CONFIGS}[cfg_name]

    class Block(nn.Module):  # build-nanogpt's Block (CausalSelfAttention + MLP)
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            Bx, Tx, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (t.view(Bx, Tx, nh, C // nh).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(Bx, Tx, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, d), nn.Embedding(1024, d)
            self.h = nn.ModuleList([Block() for _ in range(L)])
            self.ln_f = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, VOCAB, bias=False)
            self.wte.weight = self.lm_head.weight  # weight tying
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    model = GPT().to(dev)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=gpu)
    forward = torch.compile(model) if compile else model
    autocast = (lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def step() -> None:
        x, y = torch.randint(0, 50257, (B, T), device=dev), torch.randint(0, 50257, (B, T), device=dev)
        optimizer.zero_grad()
        with autocast():
            loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 6e-4
        optimizer.step()
        loss.item()

    return step


def run_torch(cfg_name: str, steps: int, warmup: int, compile: bool, gpu: bool = False, amp: bool = False) -> dict:
    import torch

    step, dts = torch_step(cfg_name, compile, gpu, amp), []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        dts.append(time.perf_counter() - t0)
    return {"dt": dts[warmup:], "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else math.nan}


def run_gemm(engine: str, gpu: bool = False, seconds: float = 1.0) -> dict:
    n = 8192 if gpu else 2048
    if engine == "mlx":
        import nanogpt_mlx  # noqa: F401
        import mlx.core as mx

        a = mx.random.normal((n, n)).astype(mx.bfloat16 if gpu else mx.float32)
        mm = lambda: mx.eval(a @ a)  # noqa: E731
    else:
        import torch

        torch.set_num_threads(os.cpu_count())
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16) if gpu else torch.randn(n, n)
        mm = (lambda: (a @ a).sum().item()) if gpu else (lambda: a @ a)  # noqa: E731  (.item(): wait for the GPU)
    mm()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mm()
        reps += 1
    return {"gflops": 2 * n**3 * reps / (time.perf_counter() - start) / 1e9}


def worker(args: list[str]) -> None:
    kind, gpu = args[0], os.environ.get("BENCH_DEVICE") == "gpu"
    if kind == "gemm":
        out = run_gemm(args[1], gpu)
    elif kind.startswith("mlx"):
        out = run_mlx(args[1], int(args[2]), int(args[3]), ranks=2 if kind == "mlx-2ranks" else 1,
                      dtype="float32" if kind == "mlx-fp32" or not gpu else "", threads=int(kind == "mlx-1thread"))
    else:
        out = run_torch(args[1], int(args[2]), int(args[3]), compile=kind == "torch.compile", gpu=gpu,
                        amp=gpu and kind != "torch-fp32")
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------------- driver
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    # the driver's own: a worker, which may run PyTorch, must not load MLX's BLAS
    from nanogpt_mlx.arguments import non_negative_int, positive_float, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: fp32 configs a, b, c; gpu: bf16, GPT-2 shapes")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS) + list(GPU_CONFIGS),
                   help="default: a b c on a CPU, the GPU configs on a GPU")
    p.add_argument("--engines", nargs="+", choices=list(dict.fromkeys(ENGINES + GPU_ENGINES)),
                   help="default: all of the device's")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps per engine (default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--rounds", type=positive_int, default=2, help="turns per engine; the best counts (default: 2)")
    p.add_argument("--memory-limit", type=positive_float, default=0.0,
                   help="GB: MLX engines run under mx.set_memory_limit (MLX then waits for queued work rather than "
                        "allocate past it), to see how much of their peak is work queued ahead (default: none)")
    p.add_argument("--cap-memory", action="store_true",
                   help="MLX engines train with --cap-memory: the first step runs op by op to measure the step's "
                        "need, then MLX's memory is capped 25%% above it (the warm-up should cover that step)")
    args = p.parse_args()
    gpu = args.device == "gpu"
    os.environ["BENCH_DEVICE"] = args.device  # read by the workers
    if args.memory_limit:
        os.environ["BENCH_MEMORY_LIMIT"] = str(args.memory_limit)
    if args.cap_memory:
        os.environ["BENCH_CAP_MEMORY"] = "1"
    configs = GPU_CONFIGS if gpu else CONFIGS
    args.configs = args.configs or list(configs)
    if other := [c for c in args.configs if c not in configs]:  # before the GEMMs are measured
        p.error(f"--configs {' '.join(other)}: not a --device {args.device} config ({', '.join(configs)})")
    if args.engines is None:
        args.engines = GPU_ENGINES if gpu else [e for e in ENGINES if e != "mlx-openblas" or openblas_beside_mkl()]
    if "mlx-openblas" in args.engines and not blas("openblas").startswith("OpenBLAS"):
        p.error("--engines mlx-openblas: no OpenBLAS here (cpu.py finds none)")
    if gpu and (missing := missing_gpu(args.engines)):
        p.error(f"--device gpu: {missing} (mlx[cuda], PyTorch with CUDA)")

    peaks = {e: max(spawn(__file__, "gemm", e)["gflops"] for _ in range(args.rounds)) for e in ("mlx", "torch")}
    peak = max(peaks.values())
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {'bf16 GEMM 8192' if gpu else 'fp32 GEMM 2048'}^3: "
          f"MLX {peaks['mlx']:.0f}, PyTorch {peaks['torch']:.0f} GFLOP/s (MFU against {peak:.0f})")
    rows = []
    for name in args.configs:
        L, d, nh, B, T = configs[name]
        results, memory = {}, {}
        for _ in range(args.rounds):
            for engine in args.engines:
                env = {"NANOGPT_MLX_BLAS": "openblas"} if engine == "mlx-openblas" else {}
                out = spawn(__file__, engine, name, str(args.steps), str(args.warmup), env=env)
                dt = median(out["dt"])
                if B * T / dt > results.get(engine, 0.0):  # the best round's memory beside its tok/s
                    results[engine], memory[engine] = B * T / dt, out.get("peak_gb", math.nan)
                need = f" (a step needs {out['need_gb']:.1f} GB)" if "need_gb" in out else ""
                print(f"  {name} {engine:14s} {dt * 1000:8.1f} ms/step {B * T / dt:8.0f} tok/s "
                      f"{out.get('peak_gb', math.nan):6.1f} GB{need}", flush=True)
        best_torch = max((v for k, v in results.items() if k.startswith("torch")), default=math.nan)
        for engine, tps in results.items():
            mfu = 100 * flops_per_token(L, d, T) * tps / (peak * 1e9)
            rows.append((f"({name}) L{L} d{d} B{B}xT{T}", engine, tps, mfu, tps / best_torch, memory[engine]))
    print("\n| config | engine | tok/s | MFU | vs faster PyTorch | peak memory GB |\n|---|---|---:|---:|---:|---:|")
    for cfg, engine, tps, mfu, ratio, gb in rows:
        vs = f"{ratio:.2f}x" if math.isfinite(ratio) else "-"  # no PyTorch engine ran
        print(f"| {cfg} | {engine} | {tps:.0f} | {mfu:.1f}% | {vs} | {f'{gb:.1f}' if math.isfinite(gb) else '-'} |")


if __name__ == "__main__":
    main()
