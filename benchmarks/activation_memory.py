"""What the backward keeps per layer and token, in n_embd units, on the default MLX device.

A compiled forward + backward of the model's blocks (no head) is run at two depths; the slope of the peak
memory, less the extra layers' weights and gradients, divided by n_embd values of the compute dtype per
token, is what one block keeps for its backward (memory.py's `saved_per_layer`). Side by side: the MLP's
activation and output projection as the profile binds it (kernels.activation_matmul) against plain autodiff
(the backward keeps both h and act(h)), for GPT-2's GELU and the speedrun's ReLU^2. Force a GPU profile on a
CPU with NANOGPT_MLX_PROFILE=cuda to see its kernels' effect there; on a GPU it measures the real backend.
On the CPU, MLX's LayerNorm and attention backward fall back to unfused float32 graphs whose autodiff keeps more
than the GPU kernels do; --gpu-like swaps in stand-ins that keep what those kernels keep (LayerNorm: its input;
attention: q, k, v and the output, as cuDNN's), so a CPU can estimate a GPU's figure.

    python benchmarks/activation_memory.py [--dtype bfloat16] [--n-embd 256] [--batch 8] [--seq 128] [--gpu-like]
"""

from __future__ import annotations

import argparse


import nanogpt_mlx  # noqa: F401  (sets the device up before mlx.core)
from nanogpt_mlx import device, kernels
from nanogpt_mlx.model import GPT, GPTConfig
from nanogpt_mlx.arguments import positive_int

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


@mx.custom_function
def layer_norm_keeping_input(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """mx.fast.layer_norm whose backward keeps only x, as MLX's fused LayerNorm VJP does on a GPU."""
    return mx.fast.layer_norm(x, weight, bias, 1e-5)


@layer_norm_keeping_input.vjp
def _layer_norm_vjp(primals, cotangent, output):
    x, weight, bias = primals
    recompute = lambda x, w, b: mx.fast.layer_norm(mx.contiguous(x), w, b, 1e-5)  # noqa: E731  (not merged)
    return tuple(mx.vjp(recompute, [x, weight, bias], [cotangent])[1])


def use_gpu_like_kernels() -> None:
    """LayerNorm and attention that keep, on any backend, what MLX's GPU kernels keep for their backward."""
    nn.LayerNorm.__call__ = lambda self, x: layer_norm_keeping_input(x, self.weight, self.bias)
    kernels.attention = kernels.recomputing_attention


def peak(config: GPTConfig, dtype: mx.Dtype, batch: int, seq: int) -> tuple[int, int]:
    """(peak bytes above what was live of a compiled body forward + backward, bytes of the model's weights)."""
    model = GPT(config, seed=0)
    model.set_dtype(dtype)
    x = mx.random.randint(0, config.vocab_size, (batch, seq), key=mx.random.key(0))
    r = mx.random.normal((batch, seq, config.n_embd), key=mx.random.key(1))
    body = nn.value_and_grad(model, lambda m: (m.hidden(x).astype(mx.float32) * r).sum())
    step = mx.compile(lambda: body(model), inputs=[model.state], outputs=[model.state])
    peaks = []
    for _ in range(3):
        mx.eval(step())
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step())
        peaks.append(mx.get_peak_memory() - base)
    return min(peaks), sum(p.nbytes for _, p in model.parameters_flat())


def units_per_layer(config: GPTConfig, dtype: mx.Dtype, batch: int, seq: int, layers=(2, 8)) -> float:
    (p0, w0), (p1, w1) = (peak(GPTConfig(**{**config.to_dict(), "n_layer": n}), dtype, batch, seq) for n in layers)
    kept = (p1 - p0) - (w1 - w0)  # the gradients of the extra layers' weights are part of the peak
    unit = config.n_embd * batch * seq * mx.zeros((), dtype=dtype).itemsize
    return kept / (layers[1] - layers[0]) / unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="compute dtype (default: bfloat16)")
    ap.add_argument("--n-embd", type=positive_int, default=256, help="model width (default: 256)")
    ap.add_argument("--n-head", type=positive_int, default=4, help="attention heads (default: 4)")
    ap.add_argument("--batch", type=positive_int, default=8, help="rows per batch (default: 8)")
    ap.add_argument("--seq", type=positive_int, default=128, help="tokens per row (default: 128)")
    ap.add_argument("--gpu-like", action="store_true", help="LayerNorm and attention stand-ins that keep what MLX's "
                    "GPU kernels keep (for a CPU estimate of a GPU's figure)")
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    if args.gpu_like:
        use_gpu_like_kernels()
    print(f"profile {device.PROFILE.name}, MLX on {mx.default_device()}, {args.dtype}, n_embd {args.n_embd}, "
          f"{args.n_head} heads, B{args.batch} x T{args.seq}{', GPU-like LayerNorm and attention' * args.gpu_like}; "
          "n_embd units kept per layer and token")
    bound = kernels.activation_matmul
    print(f"{'MLP':6s} {'bound (' + device.PROFILE.name + ')':>16s} {'autodiff':>9s} {'ratio':>6s}")
    for mlp in ("gelu", "relu2"):
        config = GPTConfig(n_layer=2, n_head=args.n_head, n_embd=args.n_embd, vocab_size=256,
                           block_size=args.seq, mlp=mlp)
        got = {}
        for name, fn in (("bound", bound), ("autodiff", kernels.plain_activation_matmul(kernels.BOUND.gelu))):
            kernels.activation_matmul = fn
            got[name] = units_per_layer(config, dtype, args.batch, args.seq)
        kernels.activation_matmul = bound
        print(f"{mlp:6s} {got['bound']:16.1f} {got['autodiff']:9.1f} {got['bound'] / got['autodiff']:6.2f}x")


if __name__ == "__main__":
    main()
