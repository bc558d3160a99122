"""Next-token cross-entropy through the vocabulary head, with forward and backward fused.

With a 50304-token vocabulary the head dominates a small GPT's step: the logits of a (B, T)
batch are B*T x 50304 numbers. The plain graph writes them, then reads and writes arrays of
that size about six more times (log-softmax forward, softmax backward), in float32.

Here the loss and its gradient are computed together, chunk by chunk of rows: the logits of a
chunk are one matmul in the compute dtype (bfloat16 on GPUs), upcast to float32 for the row
max, the sum of exp and `softmax - onehot`, which is stored back in the compute dtype. The
chunk's float32 arrays are the only float32 N x V data and never exist for all rows at once;
the two gradient GEMMs then run once over all rows (one large GEMM beats many small ones). A
custom VJP returns the precomputed gradients scaled by the incoming cotangent, so the step
computes no logits twice. A logit soft-cap (c tanh(logits / c), the speedrun's) is applied per
chunk, its derivative folded into the stored gradient; as it bounds the logits by c, it also saves
the row max. The chunk size and the exp come from the device profile (kernels.py):
small chunks stay in a CPU's cache, large ones keep a GPU busy.

On an NVIDIA GPU a device kernel (cuda.py) replaces the float32 chunk arithmetic: it reads the
bf16 logits of all rows and writes their loss and gradient in one pass, so training holds two
N x V arrays in the compute dtype (logits, gradient) and no float32 one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx

EVAL_ROWS = 4096  # evaluation's chunk when training takes all rows at once
MAX_BOUND_CAP = 40.0  # exp(-2 * 40) ~ 1.8e-35: the largest soft-cap whose bound cannot underflow a row's sum
Loss = Callable[..., mx.array]  # (h, head weight, targets, softcap=0.0) -> mean loss


Rowwise = Callable[[mx.array, mx.array, float, int], tuple[mx.array, mx.array]]
# (logits (n, V), targets (n,), soft-cap, N) -> (per-row loss in float32, (softmax - onehot) / N in the logits' dtype)


def make_losses(rows: int, exp: Callable[[mx.array], mx.array] = mx.exp,
                rowwise: Rowwise | None = None) -> tuple[Loss, Loss]:
    """(training loss, evaluation loss) for logits h @ w.T: `rows` rows of logits at a time (0: all rows in
    training, EVAL_ROWS in evaluation, whose float32 chunks a device kernel does not replace), `exp` for
    exp(x <= 0). Both take h (..., C), w (V, C), y (...) and a soft-cap c (logits -> c tanh(logits / c),
    0: none) and return the mean loss in float32. `rowwise`, a device kernel for a chunk's loss and
    gradient (cuda.py), replaces the MLX ops of the training loss."""

    def chunks(h: mx.array, w: mx.array, y: mx.array, softcap: float, size: int):
        """Per chunk: (targets (n, 1), summed loss, exp(logits - m) for a per-row bound m >= the logits, row sums
        of that, d capped / d raw logits or None), in float32."""
        for start in range(0, h.shape[0], size):
            hc, yc = h[start : start + size], y[start : start + size, None]
            logits = (hc @ w.T).astype(mx.float32)
            dcap = None
            if softcap:
                # c tanh(x / c) = c (1 - 2q) with q = sigmoid(-2x / c), from the profile's exp of a non-positive
                # argument (MLX's own tanh is 4-5x slower on the CPU); d capped / dx = 1 - tanh^2 = 4q (1 - q)
                e = exp(mx.abs(logits) * (-2 / softcap))
                q = mx.where(logits > 0, e, 1.0) / (1 + e)
                logits, dcap = softcap * (1 - 2 * q), 4 * q * (1 - q)
            # capped logits are <= c, so c can stand in for the row max (one pass fewer) while exp(-2c)
            # stays a normal float32
            top = softcap if 0 < softcap <= MAX_BOUND_CAP else logits.max(axis=-1, keepdims=True)
            e = exp(logits - top)
            total = e.sum(axis=-1, keepdims=True)
            yield yc, (top + mx.log(total) - mx.take_along_axis(logits, yc, axis=-1)).sum(), e, total, dcap

    @lru_cache
    def fused(softcap: float):
        """The custom function (mean loss, d loss / d h, d loss / d w) of h (N, C), w (V, C), y (N,)."""

        def op_chunks(h: mx.array, w: mx.array, y: mx.array):
            """Per chunk: (summed loss, (softmax - onehot) / N in the compute dtype), from MLX ops."""
            n = h.shape[0]
            classes = mx.arange(w.shape[0], dtype=y.dtype)
            for yc, loss, e, total, dcap in chunks(h, w, y, softcap, rows or n):
                d = e / (total * n) - (classes == yc) * (1.0 / n)
                yield loss, (d if dcap is None else d * dcap).astype(h.dtype)

        def kernel_chunks(h: mx.array, w: mx.array, y: mx.array):
            n = h.shape[0]
            size = rows or n
            for start in range(0, n, size):
                loss, d = rowwise(h[start : start + size] @ w.T, y[start : start + size], softcap, n)
                yield loss.sum(), d

        @mx.custom_function
        def loss_and_grads(h: mx.array, w: mx.array, y: mx.array) -> tuple[mx.array, mx.array, mx.array]:
            losses, dlogits = zip(*(kernel_chunks if rowwise else op_chunks)(h, w, y))
            dlogits = dlogits[0] if len(dlogits) == 1 else mx.concatenate(dlogits)  # (N, V), compute dtype
            return sum(losses) / h.shape[0], dlogits @ w, dlogits.T @ h

        @loss_and_grads.vjp
        def loss_and_grads_vjp(primals, cotangents, outputs):
            g = cotangents[0]
            h, w = primals[0], primals[1]
            return (g * outputs[1]).astype(h.dtype), (g * outputs[2]).astype(w.dtype), mx.zeros_like(primals[2])

        return loss_and_grads

    def flat(h: mx.array, w: mx.array, y: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        return h.reshape(-1, h.shape[-1]), w.astype(h.dtype), y.reshape(-1)

    def cross_entropy(h: mx.array, w: mx.array, y: mx.array, softcap: float = 0.0) -> mx.array:
        """Mean cross-entropy, for training (its gradient comes with it)."""
        return fused(float(softcap))(*flat(h, w, y))[0]

    def eval_cross_entropy(h: mx.array, w: mx.array, y: mx.array, softcap: float = 0.0) -> mx.array:
        """The same mean loss without the gradient, for evaluation."""
        h, w, y = flat(h, w, y)
        return sum(c[1] for c in chunks(h, w, y, float(softcap), rows or EVAL_ROWS)) / h.shape[0]

    return cross_entropy, eval_cross_entropy
