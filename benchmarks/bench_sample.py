"""Token-by-token decoding speed: nanogpt-mlx vs transformers `generate`, same weights, side by side.

Random GPT-2 124M weights (transformers `save_pretrained`, fp32), batch 1, the build-nanogpt prompt,
greedy, a fixed number of new tokens (no stop at <|endoftext|>), KV cache on both sides, the same
thread count. Each engine runs in its own process (MKL or OpenBLAS loaded globally slows PyTorch in
the same process), the engines take turns for several rounds and the table shows the median. It also
checks that all engines produce the same greedy tokens.

    flock /tmp/nanogpt-cpu.lock python benchmarks/bench_sample.py
    python benchmarks/bench_sample.py --device gpu     # mlx[cuda] vs transformers on CUDA, both fp32
    python benchmarks/bench_sample.py --device gpu --dtype bfloat16  # both engines' weights and compute in bf16
    python benchmarks/bench_sample.py --new-tokens 64 --rounds 3 --model path/to/hf_dir
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from workers import blas, missing_gpu

PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model,"

# Each worker defines run() -> new token ids and a dict `info`; TIMING then measures run().
TIMING = """
run()  # warm-up
times = []
for _ in range(reps):
    start = time.perf_counter()
    tokens = run()
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "tokens": tokens, **info}))
"""

WORKER = {
    "mlx": """
import json, sys, time
import nanogpt_mlx
from nanogpt_mlx import device
if device.PROFILE.cpu_backend:
    from nanogpt_mlx import cpu
from nanogpt_mlx.sample import SampleConfig, generate
from nanogpt_mlx.weights import load_model
path, prompt, n, reps, dtype = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = load_model(path, dtype)
cfg = SampleConfig(max_new_tokens=n, greedy=True, stop_at_eot=False)
run = lambda: [t.item() for t in generate(model, prompt, cfg)]
info = {"blas": cpu.blas, "gemv": cpu.gemv} if device.PROFILE.cpu_backend else {"blas": "-", "gemv": "-"}
""",
    "transformers": """
import json, os, sys, time
import torch
from transformers import GPT2LMHeadModel
path, prompt, n, reps, dtype = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(os.cpu_count())
dev = "cuda" if os.environ.get("BENCH_DEVICE") == "gpu" else "cpu"
model = GPT2LMHeadModel.from_pretrained(path, dtype=getattr(torch, dtype)).eval().to(dev)
model.generation_config.eos_token_id = None  # exactly n new tokens
x = torch.tensor([prompt], device=dev)
def run():
    with torch.inference_mode():
        out = model.generate(x, do_sample=False, max_new_tokens=n, use_cache=True, pad_token_id=0)
    return out[0, len(prompt):].tolist()
info = {"threads": torch.get_num_threads()}
""",
}

ENGINES = {  # name -> (worker, extra environment); main() keeps the OpenBLAS ones where they compare something
    "transformers generate (PyTorch)": ("transformers", {}),
    "nanogpt-mlx, OpenBLAS sgemm only": ("mlx", {"NANOGPT_MLX_BLAS": "openblas", "NANOGPT_MLX_NO_GEMV_SHIM": "1"}),
    "nanogpt-mlx, OpenBLAS and the gemv shim": ("mlx", {"NANOGPT_MLX_BLAS": "openblas"}),
    "nanogpt-mlx": ("mlx", {}),  # MKL on an Intel CPU where installed, else OpenBLAS and the shim (cpu.py)
}


def make_weights(directory: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(directory)  # GPT-2 124M, random
    return directory


def run_worker(worker: str, env: dict, path: Path, new_tokens: int, reps: int, dtype: str) -> dict:
    argv = [sys.executable, "-c", WORKER[worker] + TIMING, str(path), json.dumps(PROMPT), str(new_tokens), str(reps),
            dtype]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        sys.exit(f"{worker} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def main() -> None:
    from nanogpt_mlx.arguments import positive_int  # (the workers, processes of their own, load their BLAS)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="Hugging Face GPT-2 directory (default: random 124M weights)")
    ap.add_argument("--new-tokens", type=positive_int, default=128, help="greedy tokens generated (default: 128)")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="turns each engine takes (fresh process each; default: 3)")
    ap.add_argument("--reps", type=positive_int, default=3,
                    help="timed generations per turn, after one warm-up (default: 3)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: transformers on CUDA, nanogpt-mlx on mlx[cuda]; the OpenBLAS engines are CPU-only")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="both engines' weights and computation (bfloat16 is slow on CPUs; default: float32)")
    args = ap.parse_args()
    if args.device == "gpu" and (missing := missing_gpu(["mlx", "torch"])):
        ap.error(f"--device gpu: {missing} (mlx[cuda], PyTorch with CUDA)")
    os.environ["BENCH_DEVICE"] = args.device  # read by the transformers worker
    # the OpenBLAS engines where OpenBLAS is installed (the shim against sgemm alone), and OpenBLAS with the shim
    # where it is not the default (MKL); not on a GPU, where the BLAS is the CPU's
    openblas = args.device == "cpu" and blas("openblas").startswith("OpenBLAS")
    if not openblas or blas().startswith("OpenBLAS"):
        del ENGINES["nanogpt-mlx, OpenBLAS and the gemv shim"]
    if not openblas:
        del ENGINES["nanogpt-mlx, OpenBLAS sgemm only"]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_weights(Path(tmp))
        params = sum(math.prod(shape) for f in sorted(path.glob("model*.safetensors"))
                     for shape in safetensors_shapes(f).values())
        results: dict[str, list[dict]] = {name: [] for name in ENGINES}
        for r in range(args.rounds):
            for name, (worker, env) in ENGINES.items():
                results[name].append(run_worker(worker, env, path, args.new_tokens, args.reps, args.dtype))
                print(f"round {r + 1}/{args.rounds}  {name:40s} "
                      f"{args.new_tokens / min(results[name][-1]['times']):6.1f} tok/s",
                      file=sys.stderr)

    rates = {name: [args.new_tokens / t for res in runs for t in res["times"]] for name, runs in results.items()}
    rate = {name: median(r) for name, r in rates.items()}
    best = {name: max(r) for name, r in rates.items()}  # other load on a shared machine only slows runs down
    base = rate["transformers generate (PyTorch)"]
    best_base = best["transformers generate (PyTorch)"]
    weights_gb = params * {"float32": 4, "bfloat16": 2}[args.dtype] / 1e9  # all streamed once per token (tied head)
    mlx = results["nanogpt-mlx"][0]
    print(f"\nGPT-2 {params / 1e6:.0f}M {args.dtype}, batch 1, greedy, prompt {len(PROMPT)} tokens + "
          f"{args.new_tokens} new, "
          f"median of {args.rounds} x {args.reps} runs")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} threads; "
          f"torch threads {results['transformers generate (PyTorch)'][0]['threads']}; "
          f"MLX BLAS {mlx['blas']}, gemv shim {mlx['gemv']}\n")
    width = max(map(len, ENGINES))
    print(f"| {'engine':{width}s} | tok/s | ms/token | weights GB/s | vs transformers | best tok/s "
          "| best vs transformers |")
    print(f"|{'-' * (width + 2)}|------:|---------:|-------------:|----------------:|-----------:"
          "|---------------------:|")
    for name, r in rate.items():
        print(f"| {name:{width}s} | {r:5.1f} | {1000 / r:8.1f} | {weights_gb * r:12.1f} | {r / base:14.2f}x "
              f"| {best[name]:10.1f} | {best[name] / best_base:19.2f}x |")
    tokens = {name: runs[0]["tokens"] for name, runs in results.items()}
    ref = tokens["transformers generate (PyTorch)"]
    same = all(t == ref for t in tokens.values())
    print(f"\ngreedy tokens identical across engines: {same}")
    if not same and args.dtype == "bfloat16":  # bfloat16's rounding, which differs between kernels, may move a tie
        agree = {name: next((i for i, (a, b) in enumerate(zip(t, ref)) if a != b), len(t))
                 for name, t in tokens.items()}
        print("leading tokens equal to transformers': " + ", ".join(f"{name} {n}" for name, n in agree.items()))
    elif not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
