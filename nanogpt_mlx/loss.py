"""Next-token cross-entropy through the tied vocabulary head, with forward and backward fused.

With a 50304-token vocabulary the head dominates a small GPT's step: the logits of a (B, T)
batch are B*T x 50304 floats (412 MB at B*T = 2048). The plain graph writes them, then reads
and writes arrays of that size about six more times (log-softmax forward, softmax backward),
and MLX's CPU backend runs each of those element-wise passes on one thread.

Here the loss and its gradient are computed together, chunk by chunk of rows: the logits of a
chunk, their row max and sum of exp, and `softmax - onehot` stay small enough to be reused from
cache; the two gradient GEMMs then run once over all rows. A custom VJP returns the
precomputed gradients scaled by the incoming cotangent, so the step computes no logits twice.
"""

from __future__ import annotations

import math
import platform

import mlx.core as mx

ROWS_PER_CHUNK = 128  # 128 x 50304 floats = 26 MB: the chunk's arrays are reused from cache
_TAYLOR = [1 / math.factorial(k) for k in range(9, -1, -1)]  # exp's Taylor coefficients, degree 9 first


def exp_nonpositive(z: mx.array) -> mx.array:
    """exp(z) for z <= 0 (relative error < 3e-5, exp(z) for z < -86 is ~4e-38), built from multiply-adds.

    MLX's CPU exp evaluates its polynomial with a software fma, ~13 ns per element. Multiply-adds
    fuse into one compiled kernel instead: exp(z) = exp(z / 128) ** 128, a degree-9 Taylor
    polynomial on [-0.68, 0] squared 7 times.
    """
    u = mx.maximum(z, -86.0) * (1 / 128)
    p = _TAYLOR[0]
    for c in _TAYLOR[1:]:
        p = p * u + c
    for _ in range(7):
        p = p * p
    return p


def _slow_exp() -> bool:
    """MLX's x86 CPU build has no SIMD math; elsewhere (Apple CPUs, GPUs) its exp is fast and exact."""
    return mx.default_device() == mx.cpu and platform.machine().lower() in ("x86_64", "amd64")


def _chunks(h: mx.array, w: mx.array, y: mx.array):
    """Per chunk of rows: (targets (n, 1), summed loss, exp(logits - row max), row sums of that)."""
    exp = exp_nonpositive if _slow_exp() else mx.exp
    for start in range(0, h.shape[0], ROWS_PER_CHUNK):
        hc, yc = h[start : start + ROWS_PER_CHUNK], y[start : start + ROWS_PER_CHUNK, None]
        logits = hc @ w.T
        top = logits.max(axis=-1, keepdims=True)
        e = exp(logits - top)
        total = e.sum(axis=-1, keepdims=True)
        yield yc, (top + mx.log(total) - mx.take_along_axis(logits, yc, axis=-1)).sum(), e, total


@mx.custom_function
def _loss_and_grads(h: mx.array, w: mx.array, y: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(mean loss, d loss / d h, d loss / d w) for logits h @ w.T, h (N, C), w (V, C), y (N,)."""
    n = h.shape[0]
    classes = mx.arange(w.shape[0], dtype=y.dtype)
    losses, dlogits = [], []
    for yc, loss, e, total in _chunks(h, w, y):
        losses.append(loss)
        dlogits.append(e / (total * n) - (classes == yc) * (1.0 / n))  # (softmax - onehot) / N
    dlogits = mx.concatenate(dlogits)  # (N, V): one large GEMM per gradient is faster than many small
    return sum(losses) / n, dlogits @ w, dlogits.T @ h


@_loss_and_grads.vjp
def _loss_and_grads_vjp(primals, cotangents, outputs):
    g = cotangents[0]
    return g * outputs[1], g * outputs[2], mx.zeros_like(primals[2])


def cross_entropy(h: mx.array, w: mx.array, y: mx.array) -> mx.array:
    """Mean cross-entropy of the logits h @ w.T against y, for training (its gradient comes with it);
    h (..., C), w (V, C), y (...). Float32."""
    h = h.reshape(-1, h.shape[-1]).astype(mx.float32)
    return _loss_and_grads(h, w.astype(mx.float32), y.reshape(-1))[0]


def eval_cross_entropy(h: mx.array, w: mx.array, y: mx.array) -> mx.array:
    """The same mean loss without the gradient, for evaluation."""
    h = h.reshape(-1, h.shape[-1]).astype(mx.float32)
    y = y.reshape(-1)
    return sum(loss for _, loss, _, _ in _chunks(h, w.astype(mx.float32), y)) / h.shape[0]
