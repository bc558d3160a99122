"""The few primitives that differ per device, bound once from the chosen profile (device.py).

The model (its layers and its loss) and the optimizer call `kernels.attention`, `kernels.activation_matmul`,
`kernels.square_sum`, `kernels.cross_entropy`... and never ask which device they run on (for_profile binds them).
On MLX's x86 CPU backend (cpu-x86) they use cpu_math.py's multiply-add exp and GELU, its row reductions by lanes and
its BLAS sum of squares, and the MLP's activation is left to autodiff. Everywhere else they use `mx.exp`, MLX's
row reductions and a float32 tanh GELU whose backward recomputes the MLP's activation from its input rather than
keeping it; the sum of squares is `mx.sum`'s on the GPUs and cpu_math.py's BLAS one on MLX's ARM CPU backend (cpu-arm),
whose own sum adds one number after another. Attention runs by plain ops on both CPUs (MLX has no fused kernel
there); on Metal it is MLX's fused `mx.fast.scaled_dot_product_attention` forward with a backward that recomputes
the probabilities; on CUDA cuDNN's fused kernel both ways where it applies, and plain ops elsewhere (float32, odd
head sizes). Where attention runs by plain ops or recomputes, it goes 128 queries at a time, so that a causal
block skips the keys after its last query, and its backward is written out (_block_grads) rather than left to
autodiff. The fused head + loss of loss.py is sized for the device: its rows per chunk come from the profile,
and on an NVIDIA GPU its float32 arithmetic is cuda.py's kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import device
from .loss import Loss, Unary, make_losses, row_max, row_sum

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


def linear(x: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ w.T (+ bias), whose gradient for w comes out in w's (out, in) layout. Autodiff of x @ w.T gives
    (x^T dy)^T, a transposed view, which every later reader of the gradient (the optimizer's packing into flat
    buffers, clipping, an all-reduce) must first copy element by element, a slow strided copy on a CPU. dy^T x is
    the same GEMM, written in the weight's layout."""
    return _linear(x, w) if bias is None else _linear_bias(x, w, bias)


def _weight_grad(x: mx.array, w: mx.array, dy: mx.array) -> mx.array:
    return dy.reshape(-1, w.shape[0]).T @ x.reshape(-1, w.shape[1])


@mx.custom_function
def _linear(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.T


@_linear.vjp
def _linear_vjp(primals, dy, output):
    x, w = primals
    return dy @ w, _weight_grad(x, w, dy)


@mx.custom_function
def _linear_bias(x: mx.array, w: mx.array, bias: mx.array) -> mx.array:
    return mx.addmm(bias, x, w.T)


@_linear_bias.vjp
def _linear_bias_vjp(primals, dy, output):
    x, w, bias = primals
    return dy @ w, _weight_grad(x, w, dy), dy.reshape(-1, w.shape[0]).sum(axis=0).astype(bias.dtype)


ActivationMatmul = Callable[..., mx.array]  # (mlp kind, h, w, bias=None) -> act(h) @ w.T (+ bias)


def plain_activation_matmul(gelu: Unary) -> ActivationMatmul:
    """act(h) @ w.T (+ bias) by autodiff: the backward keeps h and act(h)."""
    acts = {"gelu": gelu, "relu2": relu2}

    def activation_matmul(kind: str, h: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
        return linear(acts[kind](h), w, bias)

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
        return dh, _weight_grad(a.astype(h.dtype), w, cotangent)

    return act_matmul


def recomputing_activation_matmul() -> ActivationMatmul:
    """act(h) @ w.T (+ bias) whose backward keeps only h and recomputes act(h) from it (as torch.compile's
    partitioner does): 4 n_embd-units per layer and token fewer, for one cheap elementwise pass."""
    fns = {"gelu": _recomputing(mlx_gelu, _gelu_and_slope), "relu2": _recomputing(relu2, _relu2_and_slope)}

    def activation_matmul(kind: str, h: mx.array, w: mx.array, bias: mx.array | None = None) -> mx.array:
        y = fns[kind](h, w)
        return y if bias is None else y + bias

    return activation_matmul


Attention = Callable[..., mx.array]  # (q, k, v, scale, causal) -> softmax(q k^T scale) v, causal from the last query
ATTENTION_BLOCK = 128  # queries per block where attention is computed by plain ops


@dataclass(frozen=True)
class Kernels:
    attention: Attention
    gelu: Unary  # GPT-2's tanh GELU
    activation_matmul: ActivationMatmul  # the MLP's activation and output projection
    exp: Unary  # for x <= 0
    row_max: Unary  # over the last axis, keepdims: the loss's and plain attention's
    row_sum: Unary
    square_sum: Unary  # the sum of all squares (clipping's norm), in the input's dtype
    cross_entropy: Loss  # fused head + loss for training: (h, head weight, targets, softcap) -> mean loss
    eval_cross_entropy: Loss  # the same without the gradient
    described: tuple[tuple[str, str], ...] = ()  # (label, what was bound) lines for `nanogpt-mlx info`


def mlx_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool,
                  force_fused: bool = False) -> mx.array:
    """MLX's fused attention; its causal mask is aligned to the last query (cached keys come first). With
    force_fused, its fused kernel wherever it has one for these inputs, and its own choice elsewhere."""
    mask = "causal" if causal else None
    if force_fused:
        try:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, force_fused=True)
        except (ValueError, TypeError):  # no fused kernel for this device, dtype or shape (MLX says so as it
            pass  # builds the graph), or an MLX from before force_fused
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def query_blocks(T: int, S: int, causal: bool, block: int = ATTENTION_BLOCK) -> list[tuple[int, int, int]]:
    """(first query, end query, keys seen) for each block of `block` queries. Under a causal mask a block sees
    the keys up to its last query only, so n blocks do (n + 1) / 2n of the T x S work, not all of it."""
    if not causal:
        return [(0, T, S)]
    return [(i, min(i + block, T), S - T + min(i + block, T)) for i in range(0, T, block)]


def _block_scores(q: mx.array, k: mx.array, scale: float, causal: bool, i: int, j: int, end: int) -> mx.array:
    """Queries i:j against keys :end, scaled and causally masked: (B, nh, j - i, end)."""
    s = (q[:, :, i:j] * scale) @ k[:, :, :end].swapaxes(-1, -2)
    if causal:
        s = mx.where(mx.arange(end) <= mx.arange(end - (j - i), end)[:, None], s, -mx.inf)
    return s


def plain_square_sum(x: mx.array) -> mx.array:
    return mx.sum(mx.square(x))


def plain_attention(exp: Unary = mx.exp, row_max: Unary = row_max, row_sum: Unary = row_sum,
                    block: int = ATTENTION_BLOCK) -> Attention:
    """Attention by plain ops, for where no fused kernel applies: one block of queries at a time (query_blocks),
    so a causal layer computes and keeps about half of its T x T scores. The softmax is computed in float32 by
    `exp` (of x <= 0) and the row reductions given; each block keeps e = exp(scores - max), in the compute dtype,
    and the per-query 1 / sum for the backward (_block_grads), which puts that scale on the (queries, head size)
    sides: against autodiff of a softmax, one pass over the scores fewer forward and three fewer backward."""

    @lru_cache(maxsize=None)
    def attend_for(scale: float, causal: bool):
        @mx.custom_function
        def attend(q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, ...]:
            outs, es, rs = [], [], []
            for i, j, end in query_blocks(q.shape[2], k.shape[2], causal, block):
                s = _block_scores(q, k, scale, causal, i, j, end).astype(mx.float32)
                e = exp(s - row_max(s))
                r = 1 / row_sum(e)
                es.append(e.astype(q.dtype))
                rs.append(r)
                outs.append(((es[-1] @ v[:, :, :end]) * r).astype(q.dtype))
            return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2), *es, *rs)

        @attend.vjp
        def attend_vjp(primals, cotangents, outputs):
            n = (len(outputs) - 1) // 2  # blocks
            return _block_grads(*primals, cotangents[0], outputs[0], scale, causal, block,
                                lambda b, i, j, end: (outputs[1 + b], outputs[1 + n + b]))

        return attend

    def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
        return attend_for(float(scale), bool(causal))(q, k, v)[0]

    return attention


def _block_grads(q: mx.array, k: mx.array, v: mx.array, do: mx.array, o: mx.array, scale: float, causal: bool,
                 block: int, probs: Callable[[int, int, int, int], tuple[mx.array, mx.array | None]]):
    """Attention's (dq, dk, dv), one block of queries at a time, from each block's probabilities p = e * r:
    probs(block index, first query, end query, keys seen) -> (e, r), r a per-query scale (None: 1). Softmax's
    backward p (dp - sum_j p dp), whose row sum is do . o, is e (r dp - r (do . o)), so r scales do and that sum,
    and dv = p^T do = e^T (r do)."""
    dq, dk, dv = [], [], []
    for b, (i, j, end) in enumerate(query_blocks(q.shape[2], k.shape[2], causal, block)):
        e, r = probs(b, i, j, end)
        do_b = do[:, :, i:j]
        delta = (do_b * o[:, :, i:j]).astype(mx.float32).sum(axis=-1, keepdims=True)
        if r is not None:
            do_b, delta = (do_b * r).astype(do.dtype), delta * r
        dp = (do_b @ v[:, :, :end].swapaxes(-1, -2)).astype(mx.float32)
        ds = (e * (dp - delta)).astype(q.dtype)
        dq.append((ds @ k[:, :, :end]) * scale)
        dk.append((ds.swapaxes(-1, -2) @ q[:, :, i:j]) * scale)
        dv.append(e.astype(v.dtype).swapaxes(-1, -2) @ do_b)
    return mx.concatenate(dq, axis=2) if len(dq) > 1 else dq[0], _sum_prefixes(dk), _sum_prefixes(dv)


def recomputing_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool,
                          block: int = ATTENTION_BLOCK) -> mx.array:
    """MLX's attention forward (its fused kernel wherever it has one) with a backward that recomputes the
    probabilities from q and k, one block of queries at a time, for devices where MLX has no fused backward:
    autodiff of its unfused graph keeps every layer's T x T scores and probabilities until the backward, this
    holds one block's at a time (flash attention's trade, with its causal block skipping but without its tiling
    of the keys)."""
    return _recomputing_attention(float(scale), bool(causal), block)(q, k, v)


@lru_cache(maxsize=None)
def _recomputing_attention(scale: float, causal: bool, block: int):
    @mx.custom_function
    def attend(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        # while a gradient is traced MLX's Metal backend picks its unfused graph (all T x T scores) for training,
        # as its fused kernel has no backward there; this backward needs nothing from the forward
        return mlx_attention(q, k, v, scale, causal, force_fused=True)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        q, k = primals[:2]
        return _block_grads(*primals, cotangent, output, scale, causal, block, lambda b, i, j, end: (
            mx.softmax(_block_scores(q, k, scale, causal, i, j, end).astype(mx.float32), axis=-1), None))

    return attend


def padded_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """MLX's fused causal self-attention over a sequence padded at its end to whole tiles of cuDNN's backward
    (device.CUDNN_TILE), which MLX would otherwise replace by its unfused graph. No real query sees a padded key
    under the causal mask, and the padded queries' outputs are dropped (their gradients are zero): the values
    and gradients are those without padding."""
    T = q.shape[2]
    widths = [(0, 0), (0, 0), (0, -T % device.CUDNN_TILE), (0, 0)]
    return mlx_attention(*(mx.pad(a, widths) for a in (q, k, v)), scale, causal)[:, :, :T]


def _sum_prefixes(parts: list[mx.array]) -> mx.array:
    """The sum of arrays (B, nh, n_i, hs) that cover the first n_i positions (the longest covers them all), in
    float32 when several: segment by segment, each the sum of the parts that cover it, so that no part is padded
    with zeros to the full length (a pass of writes and one of reads per part)."""
    if len(parts) == 1:
        return parts[0]
    segments, start = [], 0
    for end in sorted({p.shape[2] for p in parts}):
        segments.append(sum(p[:, :, start:end].astype(mx.float32) for p in parts if p.shape[2] >= end))
        start = end
    return mx.concatenate(segments, axis=2).astype(parts[0].dtype)


def profile_attention(profile: device.Profile, plain: Attention) -> Attention:
    """Attention as the profile decides for each dtype and shape (device.Profile.fused_attention):
    MLX's fused kernel (over a causal sequence padded to whole tiles of cuDNN's backward where it is not: after
    cached keys, where padding would move the mask, its forward and recomputing_attention's backward), its fused
    forward with recomputing_attention's backward, or `plain` (plain_attention with the profile's exp and
    reductions). One query (cached decoding) always takes MLX's kernel, which also avoids a copy of the cache."""

    def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
        T = q.shape[2]
        if T == 1:
            return mlx_attention(q, k, v, scale, causal)
        fused = profile.fused_attention(device.dtype_name(q.dtype), q.shape[-1])
        if fused is None:
            return plain(q, k, v, scale, causal)
        if not fused:
            return recomputing_attention(q, k, v, scale, causal)
        if T % device.CUDNN_TILE == 0:
            return mlx_attention(q, k, v, scale, causal)
        return (padded_attention if causal and k.shape[2] == T else recomputing_attention)(q, k, v, scale, causal)

    return attention


def for_profile(profile: device.Profile) -> Kernels:
    """The kernels of a profile (any profile runs on any backend: tests force GPU profiles on the CPU)."""
    if profile.software_math:
        from . import cpu_math

        # autodiff: recomputing the GELU's software tanh would cost more time than the memory is worth here
        plain = plain_attention(cpu_math.exp, cpu_math.row_max, cpu_math.row_sum)
        return Kernels(profile_attention(profile, plain), cpu_math.gelu, plain_activation_matmul(cpu_math.gelu),
                       cpu_math.exp, cpu_math.row_max, cpu_math.row_sum, cpu_math.square_sum,
                       *make_losses(profile.loss_rows, cpu_math.exp, row_max=cpu_math.row_max,
                                    row_sum=cpu_math.row_sum),
                       described=(("attention", f"plain ops with cpu_math.py's exp and reductions, {ATTENTION_BLOCK} "
                                                "queries at a time, backward written out"),
                                  ("mlp backward", "autodiff")))
    blocks = f"{ATTENTION_BLOCK} queries at a time"
    recomputes = f"the backward recomputes the probabilities {blocks}"
    if profile.fused_attention_backward:
        attention = (f"cuDNN's fused kernel both ways where it applies, T padded to a multiple of {device.CUDNN_TILE} "
                     f"(after cached keys its forward; {recomputes}); plain ops {blocks} elsewhere (float32, "
                     f"odd head sizes)")
    else:
        attention = f"plain ops, {blocks}" if profile.cpu_backend else f"MLX's forward; {recomputes}"
    described = [("attention", attention), ("mlp backward", "recomputes the activation from its input")]
    rowwise = None
    if profile.cuda_kernels:
        from . import cuda

        rowwise = cuda.cross_entropy_rows if cuda.available() else None  # forced on a CPU: MLX's ops
        described.append(("loss kernel", "cuda.py, one pass over each chunk's bf16 logits" if rowwise
                          else "MLX ops (no NVIDIA GPU under this forced profile)"))
    square_sum = plain_square_sum
    if profile.cpu_backend:  # MLX's CPU sum adds one number after another: it drifts low over a large bucket
        from . import cpu_math

        square_sum = cpu_math.square_sum
    return Kernels(profile_attention(profile, plain_attention()), mlx_gelu, recomputing_activation_matmul(), mx.exp,
                   row_max, row_sum, square_sum, *make_losses(profile.loss_rows, mx.exp, rowwise),
                   described=tuple(described))


BOUND = for_profile(device.PROFILE)
attention = BOUND.attention
activation_matmul = BOUND.activation_matmul
square_sum = BOUND.square_sum
cross_entropy = BOUND.cross_entropy
eval_cross_entropy = BOUND.eval_cross_entropy
