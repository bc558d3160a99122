"""One layer's causal attention, forward + backward, each way kernels.py can run it, side by side.

Variants: MLX's fused kernel (cuDNN on an NVIDIA GPU; on a CPU MLX falls back to one T x T graph), the same
over T padded to a multiple of 128 (kernels.padded_attention: what CUDA training runs where T is not one, as
cuDNN's backward takes whole tiles of 128 queries), its fused forward with kernels.recomputing_attention's
backward, and kernels.plain_attention (plain ops, the profile's float32 exp and reductions, its backward
written out) with all queries in one block and in blocks of 128 and 256 queries (a causal block skips the keys
after its last query). Each is compiled and timed in this one process (median of --reps after warm-up), with
its peak memory above what was live before and its ratio to the one-block plain ops; outputs and gradients are
checked against the one-block plain ops. Defaults: GPT-2's attention (12 heads of 64) at T = 1024, B4 on a
CPU, B16 on a GPU, float32 on a CPU, both dtypes on a GPU.

    python benchmarks/bench_attention.py [--batch 4] [--seq 1024] [--dtypes float32 bfloat16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from statistics import median


import nanogpt_mlx  # noqa: F401  (sets the device up before mlx.core)
from nanogpt_mlx import device, kernels
from nanogpt_mlx.arguments import positive_int

import mlx.core as mx  # noqa: E402


def variants(T: int) -> dict:
    ops = kernels.BOUND.exp, kernels.BOUND.row_max, kernels.BOUND.row_sum  # the profile's: cpu_math.py's on the x86 CPU
    return {"plain ops, all queries at once": kernels.plain_attention(*ops, T),
            "plain ops, 128 queries at a time": kernels.plain_attention(*ops, 128),
            "plain ops, 256 queries at a time": kernels.plain_attention(*ops, 256),
            "fused forward, recomputing backward": kernels.recomputing_attention,
            "fused (cuDNN on a GPU)": kernels.mlx_attention,
            "fused, T padded to a multiple of 128": kernels.padded_attention}


def measure(att, q, k, v, g, reps: int) -> tuple[float, float, list[mx.array]]:
    """(median ms, peak GB above live, [output, dq, dk, dv]) of a compiled forward + backward."""
    def fwd_bwd(q, k, v, g):
        out, vjp = mx.vjp(lambda q, k, v: att(q, k, v, q.shape[-1] ** -0.5, True), [q, k, v], [g])
        return [out[0], *vjp]

    step = mx.compile(fwd_bwd)
    results = step(q, k, v, g)
    mx.eval(results)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(step(q, k, v, g))
        times.append(time.perf_counter() - start)
    return median(times) * 1000, (mx.get_peak_memory() - base) / 1e9, results


def main() -> None:
    gpu = mx.default_device() == mx.gpu
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=positive_int, default=16 if gpu else 4, help="B (default: 16 on a GPU, 4 on a CPU)")
    ap.add_argument("--heads", type=positive_int, default=12, help="attention heads (default: 12)")
    ap.add_argument("--head-dim", type=positive_int, default=64, help="head size (default: 64)")
    ap.add_argument("--seq", type=positive_int, default=1024, help="T, queries and keys (default: 1024)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                    default=["bfloat16", "float32"] if gpu else ["float32"],
                    help="default: both on a GPU, float32 on a CPU")
    ap.add_argument("--reps", type=positive_int, default=5 if gpu else 3,
                    help="timed runs per variant, median (default: 5 / 3)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="also write bench_attention.json here")
    args = ap.parse_args()
    B, nh, T, hs = args.batch, args.heads, args.seq, args.head_dim
    print(f"{device.PROFILE.name} on {mx.default_device()}: B{B} x {nh} heads x T{T} x {hs}, causal, "
          f"forward + backward, compiled")
    keys = mx.random.split(mx.random.key(0), 4)
    rows = []
    for dtype in args.dtypes:
        q, k, v, g = (mx.random.normal((B, nh, T, hs), key=key).astype(getattr(mx, dtype)) for key in keys)
        mx.eval(q, k, v, g)
        base_ms, ref = None, None
        for name, att in variants(T).items():
            try:
                ms, gb, got = measure(att, q, k, v, g, args.reps)
            except Exception as e:  # noqa: BLE001  (a variant this device lacks; the others still run)
                print(f"  {dtype:8s} {name:38s} error: {type(e).__name__}: {str(e)[:200]}")
                continue
            if ref is None:
                base_ms, ref = ms, got
            diff = max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() /
                       max(mx.abs(b.astype(mx.float32)).max().item(), 1e-30) for a, b in zip(got, ref))
            rows.append({"dtype": dtype, "variant": name, "ms": round(ms, 2), "peak_gb": round(gb, 3),
                         "vs_one_block": round(base_ms / ms, 2), "max_rel_diff": float(f"{diff:.1e}")})
            print(f"  {dtype:8s} {name:38s} {ms:9.2f} ms {gb:7.3f} GB  {base_ms / ms:5.2f}x  "
                  f"(max diff {diff:.1e} of the largest value)", flush=True)
    print("\n| dtype | attention | ms | peak GB | speed vs one block |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['variant']} | {r['ms']:.1f} | {r['peak_gb']:.2f} | {r['vs_one_block']:.2f}x |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_attention.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
