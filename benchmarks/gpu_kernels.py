"""Where a GPU training step's time goes, kernel by kernel: nanogpt-mlx against build-nanogpt's torch.compile.

CUPTI, through torch.profiler, records every CUDA kernel the process launches, MLX's (cuBLAS, cuDNN, its own and
its compiled element-wise kernels, cuda.py's) as well as PyTorch's. Each engine runs in its own process: a few
warm-up steps, then `--steps` timed steps under the profiler. nanogpt-mlx runs its Trainer's compiled optimizer
step (forward, backward, clip, AdamW), each built while the one before runs, as in training; PyTorch runs bench_train.py's build-nanogpt step
(torch.compile: bf16 autocast, fused AdamW, flash SDPA; torch-fp32: eager, TF32). Per step it prints the wall time,
the kernels' summed time (below the wall time: the GPU waited), the number of kernels, the time by kind of kernel
side by side, and each engine's largest kernels. The aggregate goes to OUT/gpu_kernels.json, and each engine's
trace to OUT/trace_ENGINE.json.gz (chrome://tracing, Perfetto).

    python benchmarks/gpu_kernels.py [--config 124m-b16] [--steps 5] [--top 25]
    python benchmarks/gpu_kernels.py --engines mlx-fp32 torch-fp32     # the float32 (TF32) step

--quick runs a tiny model on the CPU as a smoke test of the script: there, PyTorch's operators stand in for
kernels and MLX's CPU work is not recorded.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from workers import missing_gpu, spawn

KINDS = [  # the first pattern a kernel's name matches (lower case) gives its kind
    ("element-wise", r"mlx::core::cu::\w+_(contiguous|strided)<"),  # mx.compile's fused kernels (CUPTI's names
    # are demangled: "void mlx::core::cu::..._contiguous<unsigned int, 8>(...)")
    ("attention", r"sdpa|flash|fmha|attn|attention"),
    ("GEMM", r"gemm|cutlass|nvjet|xmma|cublas|s16816|s1688|matmul|aten::mm|aten::addmm|aten::bmm"),
    ("head + loss", r"cross_entropy|nanogpt|log_softmax|nll_loss|logsumexp"),
    ("norm", r"layer_norm|layernorm|rms_norm|rmsnorm|native_layer"),
    ("optimizer", r"adam|multi_tensor|foreach|clip"),
    ("reduction", r"reduce|_red_|triton_per|sum|norm"),
    ("copy, gather, scatter", r"copy|gather|scatter|memcpy|memset|cat|index|slice|transpose|contiguous"),
    ("element-wise", r"triton_poi|compiled|binary|unary|ternary|elementwise|vectorized|fill|add|mul|where|gelu"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


def kernels_in(trace: dict, categories: tuple[str, ...]) -> dict[str, list[float]]:
    """name -> [summed duration in ms, count] of a chrome trace's events in `categories`."""
    found: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in trace.get("traceEvents", []):
        if event.get("ph") == "X" and event.get("cat") in categories:
            found[event["name"]][0] += event.get("dur", 0) / 1000
            found[event["name"]][1] += 1
    return dict(found)


def profile(step, steps: int, warmup: int, quick: bool, trace_path: Path) -> dict:
    """Run `step` warmup + steps times, the last `steps` under torch.profiler; per-step wall time and kernels."""
    import torch
    from torch.profiler import ProfilerActivity

    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] if quick else [ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        raw = Path(f"{tmp}/trace.json").read_bytes()
    trace_path.write_bytes(gzip.compress(raw))
    found = kernels_in(json.loads(raw), ("cpu_op",) if quick else ("kernel", "gpu_memcpy", "gpu_memset"))
    return {"wall_ms": wall * 1000, "kernels": {k: [ms / steps, n / steps] for k, (ms, n) in found.items()}}


def mlx_step(cfg_name: str, tmp: str, dtype: str = ""):
    """The Trainer's compiled optimizer step in `dtype` (default: the device profile's), each step built while
    the one before runs and then waited for, as Trainer.train does (without its evaluations and logging)."""
    from bench_train import CONFIGS, GPU_CONFIGS
    from profile_step import write_shards  # imports nanogpt_mlx, which sets the device up before mlx.core

    from nanogpt_mlx.config import TrainConfig

    from nanogpt_mlx.train import Trainer

    L, d, nh, B, T = {**CONFIGS, **GPU_CONFIGS}[cfg_name]
    write_shards(tmp, B * T * 4 + 1)
    trainer = Trainer(TrainConfig(data=tmp, out=f"{tmp}/out", n_layer=L, n_head=nh, n_embd=d, block_size=1024,
                                  batch_size=B, seq_len=T, total_batch_size=B * T, dtype=dtype, val_every=0,
                                  sample_every=0, hellaswag_every=0, checkpoint_every=0))
    queued = trainer._start_step(trainer.step)

    def step() -> None:
        nonlocal queued
        ahead = trainer._start_step(trainer.step + 1)
        trainer.queue.finish(queued)
        trainer.step, queued = trainer.step + 1, ahead

    return step


def worker(engine: str, cfg_name: str, steps: int, warmup: int, quick: bool, out: str) -> dict:
    from bench_train import torch_step

    if not quick:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_kernels.py: this PyTorch sees no CUDA GPU (on a CPU, --quick runs the smoke test)")
        torch.cuda.init()  # CUDA (and CUPTI's hooks) set up before MLX makes its first CUDA graphs, not inside them
    with tempfile.TemporaryDirectory() as tmp:
        if engine.startswith("mlx"):
            step = mlx_step(cfg_name, tmp, "float32" if engine == "mlx-fp32" else "")
        else:
            step = torch_step(cfg_name, compile=engine == "torch.compile", gpu=not quick,
                              amp=not quick and engine != "torch-fp32")
        return profile(step, steps, warmup, quick, Path(out) / f"trace_{engine.replace('.', '_')}.json.gz")


def report(results: dict[str, dict], top: int) -> None:
    engines = list(results)
    by_kind = {e: defaultdict(lambda: [0.0, 0.0]) for e in engines}  # kind -> [ms, launches] a step
    for e in engines:
        for name, (ms, n) in results[e]["kernels"].items():
            by_kind[e][kind_of(name)][0] += ms
            by_kind[e][kind_of(name)][1] += n
    totals = {e: [sum(v[i] for v in results[e]["kernels"].values()) for i in (0, 1)] for e in engines}
    print("\n| per step: ms (kernels) | " + " | ".join(engines) + " |\n|---|" + "---:|" * len(engines))
    print("| wall time | " + " | ".join(f"{results[e]['wall_ms']:.2f}" for e in engines) + " |")
    rows = [("all kernels, summed (below the wall time: the GPU waited)", lambda e: totals[e])]
    rows += [(kind, lambda e, kind=kind: by_kind[e][kind]) for kind in dict.fromkeys([k for k, _ in KINDS] + ["other"])]
    for label, value in rows:
        print(f"| {label} | " + " | ".join(f"{value(e)[0]:.2f} ({value(e)[1]:.0f})" for e in engines) + " |")
    for e in engines:
        if not results[e]["kernels"]:
            print(f"\n{e}: the profiler recorded no kernels (on a GPU: CUPTI did not see this engine's launches)")
            continue
        print(f"\n{e}: the {top} largest kernels (ms a step, launches a step, kind)")
        ranked = sorted(results[e]["kernels"].items(), key=lambda kv: -kv[1][0])[:top]
        for name, (ms, n) in ranked:
            print(f"  {ms:8.3f} {n:6.1f}  {kind_of(name):22s} {name[:110]}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        engine, cfg_name, steps, warmup, quick, out = sys.argv[2:]
        print("RESULT " + json.dumps(worker(engine, cfg_name, int(steps), int(warmup), quick == "1", out)))
        return
    # the driver's own: a worker, which may run PyTorch, must not load MLX's BLAS
    from bench_train import CONFIGS, GPU_CONFIGS
    from nanogpt_mlx.arguments import non_negative_int, positive_int

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="124m-b16", choices=list(GPU_CONFIGS) + list(CONFIGS),
                   help="a bench_train.py config: its GPU ones, or its CPU ones on a CPU (default: 124m-b16)")
    p.add_argument("--engines", nargs="+", default=["mlx", "torch.compile"],
                   choices=["mlx", "mlx-fp32", "torch.compile", "torch-fp32"],
                   help="mlx: the profile's dtype (bf16 on a GPU); torch.compile: bf16 autocast; the fp32 engines: "
                        "TF32 matmuls, PyTorch eager (default: mlx torch.compile)")
    p.add_argument("--steps", type=positive_int, default=5, help="profiled steps per engine (default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="steps before the profiled ones (default: 3)")
    p.add_argument("--top", type=positive_int, default=25, help="largest kernels listed per engine (default: 25)")
    p.add_argument("--quick", action="store_true", help="config a on the CPU: a smoke test of the script")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="folder for the JSON and traces")
    args = p.parse_args()
    if not args.quick and (missing := missing_gpu(args.engines)):
        p.error(f"{missing} (--quick: a smoke test on the CPU)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cfg_name = "a" if args.quick else args.config
    results = {}
    for engine in args.engines:
        results[engine] = spawn(__file__, engine, cfg_name, str(args.steps), str(args.warmup),
                                "1" if args.quick else "0", args.out)
        (Path(args.out) / "gpu_kernels.json").write_text(json.dumps({"config": cfg_name, **results}, indent=1))
        print(f"{engine}: {results[engine]['wall_ms']:.2f} ms a step", flush=True)
    report(results, args.top)


if __name__ == "__main__":
    main()
