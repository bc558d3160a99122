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

import mlx.core as mx

from .ops import exp_nonpositive

ROWS_PER_CHUNK = 128  # 128 x 50304 floats = 26 MB: the chunk's arrays are reused from cache


def _chunks(h: mx.array, w: mx.array, y: mx.array):
    """Per chunk of rows: (targets (n, 1), summed loss, exp(logits - row max), row sums of that)."""
    for start in range(0, h.shape[0], ROWS_PER_CHUNK):
        hc, yc = h[start : start + ROWS_PER_CHUNK], y[start : start + ROWS_PER_CHUNK, None]
        logits = hc @ w.T
        top = logits.max(axis=-1, keepdims=True)
        e = exp_nonpositive(logits - top)
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
