"""The few primitives that differ per device, bound once from the chosen profile (device.py).

The model, the loss and the optimizer call `kernels.attention`, `kernels.activation_matmul`, `kernels.sqrt`,
`kernels.cross_entropy`... and never ask which device they run on. On MLX's x86 CPU backend
these are cpu.py's multiply-add versions; everywhere else they are MLX's own (the fused
`mx.fast.scaled_dot_product_attention`, `mx.exp`, `mx.sqrt`) and a float32 tanh GELU, with backwards that
recompute rather than keep: the MLP's activation from its input, and, where MLX has no fused attention
backward, the attention probabilities. The fused head + loss of loss.py is sized for the device: its rows per
chunk come from the profile, and on an NVIDIA GPU its float32 arithmetic is cuda.py's kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import device
from .loss import Loss, make_losses

Unary = Callable[[mx.array], mx.array]


_GELU_C = math.sqrt(2 / math.pi)


def mlx_gelu(x: mx.array) -> mx.array:
    """GPT-2's tanh GELU, computed in float32 (as PyTorch's bf16 autocast does) and rounded to x's dtype."""
    xf = x.astype(mx.float32)
    return (0.5 * xf * (1 + mx.tanh(_GELU_C * (xf + 0.044715 * xf * xf * xf)))).astype(x.dtype)


def relu2(x: mx.array) -> mx.array:
    """The speedrun's ReLU squared."""
    return mx.square(nn.relu(x))


def _gelu_and_slope(h: mx.array) -> tuple[mx.array, mx.array]:
    """(gelu(h), d gelu / dh) in float32, with (1 + tanh z) / 2 as sigmoid(2z): expressions apart from
    mlx_gelu's, since mx.compile merges identical ones, and a recomputation merged with the forward is no
    recomputation (the forward's 4x-wide arrays would stay alive until the backward)."""
    x = mx.contiguous(h).astype(mx.float32)  # not the forward's cast of h itself (see above); h is contiguous,
    # so this shares its buffer. (h * float32 1.0 would not do: type promotion inserts that very cast.)
    xc = mx.clip(x, -100, 100)  # beyond, the slope is exactly 0 or 1: no 0 * inf
    s = mx.sigmoid((2 * _GELU_C) * xc * (1 + 0.044715 * xc * xc))
    return x * s, s + 2 * xc * s * (1 - s) * _GELU_C * (1 + 3 * 0.044715 * xc * xc)


def _relu2_and_slope(h: mx.array) -> tuple[mx.array, mx.array]:
    """(relu(h)^2, 2 relu(h)), by other ops than relu2's (see _gelu_and_slope)."""
    r = h * (h > 0)
    return r * r, 2 * r


ActivationMatmul = Callable[..., mx.array]  # (mlp kind, h, w, bias=None) -> act(h) @ w.T (+ bias)


def plain_activation_matmul(gelu: Unary) -> ActivationMatmul:
    """act(h) @ w.T (+ bias) by autodiff: the backward keeps h and act(h)."""
    acts = {"gelu": gelu, "relu2": relu2}

    def activation_matmul(kind: str, h: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
        a = acts[kind](h)
        return a @ w.T if bias is None else mx.addmm(bias, a, w.T)

    return activation_matmul


def _recomputing(act: Unary, act_and_slope: Callable[[mx.array], tuple[mx.array, mx.array]]):
    @mx.custom_function
    def act_matmul(h: mx.array, w: mx.array) -> mx.array:
        return act(h) @ w.T

    @act_matmul.vjp
    def act_matmul_vjp(primals, cotangent, output):
        h, w = primals
        a, slope = act_and_slope(h)
        dh = ((cotangent @ w) * slope).astype(h.dtype)
        dw = cotangent.reshape(-1, w.shape[0]).T @ a.astype(h.dtype).reshape(-1, w.shape[1])
        return dh, dw

    return act_matmul


def recomputing_activation_matmul() -> ActivationMatmul:
    """act(h) @ w.T (+ bias) whose backward keeps only h and recomputes act(h) from it (as torch.compile's
    partitioner does): 4 n_embd-units per layer and token fewer, for one cheap elementwise pass."""
    fns = {"gelu": _recomputing(mlx_gelu, _gelu_and_slope), "relu2": _recomputing(relu2, _relu2_and_slope)}

    def activation_matmul(kind: str, h: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
        y = fns[kind](h, w)
        return y if bias is None else y + bias

    return activation_matmul


@dataclass(frozen=True)
class Kernels:
    attention: Callable[..., mx.array]  # (q, k, v, scale, causal): softmax(q k^T scale) v, causal from the last query
    gelu: Unary  # GPT-2's tanh GELU
    activation_matmul: ActivationMatmul  # the MLP's activation and output projection
    exp: Unary  # for x <= 0
    sqrt: Unary
    cross_entropy: Loss  # fused head + loss for training: (h, head weight, targets, softcap) -> mean loss
    eval_cross_entropy: Loss  # the same without the gradient
    described: tuple[tuple[str, str], ...] = ()  # (label, what was bound) lines for `nanogpt-mlx info`


def mlx_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """MLX's fused attention; its causal mask is aligned to the last query (cached keys come first)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)


def recomputing_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """MLX's fused attention with a backward that recomputes the probabilities from q and k, for devices where
    MLX has no fused backward: autodiff of its unfused graph keeps every layer's T x T scores and probabilities
    until the backward, this holds one layer's at a time (flash attention's trade, without the tiling)."""
    return _recomputing_attention(float(scale), bool(causal))(q, k, v)


@lru_cache(maxsize=None)
def _recomputing_attention(scale: float, causal: bool):
    @mx.custom_function
    def attend(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return mlx_attention(q, k, v, scale, causal)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        q, k, v = primals
        s = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)  # (B, nh, T, S)
        if causal:
            T, S = s.shape[-2:]
            s = mx.where(mx.arange(S) <= mx.arange(S - T, S)[:, None], s, -mx.inf)
        p = mx.softmax(s, axis=-1)
        do = cotangent
        dv = p.astype(v.dtype).swapaxes(-1, -2) @ do
        dp = (do @ v.swapaxes(-1, -2)).astype(mx.float32)
        # softmax's backward: p (dp - sum_j p dp), the row sum being do . o
        ds = (p * (dp - (do * output).astype(mx.float32).sum(axis=-1, keepdims=True))).astype(q.dtype)
        return (ds @ k) * scale, (ds.swapaxes(-1, -2) @ q) * scale, dv

    return attend


def for_profile(profile: device.Profile) -> Kernels:
    """The kernels of a profile (any profile runs on any backend: tests force GPU profiles on the CPU)."""
    if profile.software_math:
        from . import cpu

        # autodiff: recomputing the GELU's software tanh would cost more time than the memory is worth here
        return Kernels(cpu.attention, cpu.gelu, plain_activation_matmul(cpu.gelu), cpu.exp, cpu.sqrt,
                       *make_losses(profile.loss_rows, cpu.exp),
                       described=(("attention", "cpu.py's multiply-add softmax"), ("mlp backward", "autodiff")))
    described = [("attention", "MLX's fused forward; the backward recomputes the probabilities"
                  if profile.recomputed_attention else "MLX's fused kernel both ways where cuDNN applies"),
                 ("mlp backward", "recomputes the activation from its input")]
    rowwise = None
    if profile.cuda_kernels:
        from . import cuda

        rowwise = cuda.cross_entropy_rows if cuda.available() else None  # forced on a CPU: MLX's ops
        described.append(("loss kernel", "cuda.py, one pass over the bf16 logits" if rowwise
                          else "MLX ops (no NVIDIA GPU under this forced profile)"))
    attention = recomputing_attention if profile.recomputed_attention else mlx_attention
    return Kernels(attention, mlx_gelu, recomputing_activation_matmul(), mx.exp, mx.sqrt,
                   *make_losses(profile.loss_rows, mx.exp, rowwise), described=tuple(described))


BOUND = for_profile(device.PROFILE)
attention = BOUND.attention
activation_matmul = BOUND.activation_matmul
sqrt = BOUND.sqrt
cross_entropy = BOUND.cross_entropy
eval_cross_entropy = BOUND.eval_cross_entropy
