"""HellaSwag scoring speed: this project (MLX, batched) vs the PyTorch reference (build-nanogpt's loop).

Both score the same synthetic HellaSwag-format examples (lengths like the real set: ~45 context
tokens, endings of ~5-55 tokens) with the same random GPT-2 124M weights, in fp32 (or both in bf16, --dtype). The
reference runs one example (4 rows) per forward, as build-nanogpt's hellaswag.py does.

    flock /tmp/nanogpt-cpu.lock python benchmarks/bench_hellaswag.py [--examples 64]
    python benchmarks/bench_hellaswag.py --device gpu   # mlx[cuda] vs PyTorch on CUDA
    python benchmarks/bench_hellaswag.py --device gpu --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nanogpt_mlx  # noqa: E402,F401  (before mlx.core: loads OpenBLAS)
from conftest import save_hf_gpt2  # noqa: E402
from test_evaluate import make_hellaswag, reference_scores, write_jsonl  # noqa: E402

from nanogpt_mlx import device  # noqa: E402
from nanogpt_mlx.evaluate import load_hellaswag, score_hellaswag  # noqa: E402
from nanogpt_mlx.weights import load_model  # noqa: E402
from nanogpt_mlx.arguments import positive_int  # noqa: E402


def timed(fn, warmup, *args) -> tuple[float, object]:
    fn(*warmup)
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=positive_int, default=64, help="synthetic examples scored (default: 64)")
    ap.add_argument("--batches", type=positive_int, nargs="+",
                    help="examples per MLX forward (default: 1 4 8 on the CPU, 8 16 32 on a GPU; `eval hellaswag` "
                         "uses 1 and 8)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: the reference on CUDA, nanogpt-mlx on mlx[cuda] (its default device)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="both scorers' weights and computation, losses in float32 (default: float32)")
    args = ap.parse_args()
    batches = args.batches or ([8, 16, 32] if args.device == "gpu" else [1, 4, 8])
    torch_device = "cuda" if args.device == "gpu" else "cpu"
    if args.device == "gpu" and device.PROFILE.cpu_backend:
        raise SystemExit("--device gpu: MLX runs on its CPU backend here; install mlx[cuda] (see README)")

    import torch
    from transformers import GPT2LMHeadModel

    if args.device == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--device gpu: PyTorch sees no CUDA GPU; install PyTorch with CUDA")

    raw = make_hellaswag(args.examples, seed=1, ctx_words=(10, 50), ending_words=(8, 30))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf_gpt2(Path(tmp) / "gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024)
        examples = load_hellaswag(write_jsonl(Path(tmp) / "hs.jsonl", raw))
        model = load_model(hf_dir, args.dtype)
        hf = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=getattr(torch, args.dtype)).eval().to(torch_device)
    where = torch.cuda.get_device_name() if args.device == "gpu" else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"{args.examples} examples, GPT-2 124M random weights, {args.dtype}, {where}")

    ref_s, ref = timed(reference_scores, (hf, raw[:2], torch_device), hf, raw, torch_device)
    rows = [(f"pytorch reference (4 rows/forward, {torch_device})", ref_s)]
    for b in batches:
        s, res = timed(lambda ex: score_hellaswag(model, ex, batch_examples=b, progress=False),
                       (examples[:b],), examples)
        agree = sum(r.predicted_norm == w["predicted_norm"] and r.predicted == w["predicted"]
                    for r, w in zip(res.records, ref))
        rows.append((f"nanogpt-mlx batch {b} ({4 * b} rows/forward), {agree}/{len(ref)} agree", s))
    print(f"{'scorer':58s} {'examples/s':>10s} {'vs torch':>9s}")
    for name, s in rows:
        print(f"{name:58s} {len(raw) / s:10.2f} {ref_s / s:8.2f}x")


if __name__ == "__main__":
    main()
