"""Next-token cross-entropy through the vocabulary head, with forward and backward fused.

With a 50304-token vocabulary the head dominates a small GPT's step: the logits of a (B, T)
batch are B*T x 50304 numbers. The plain graph writes them, then reads and writes arrays of
that size about six more times (log-softmax forward, softmax backward), in float32.

Here the loss and its gradient are computed together, chunk by chunk of rows: the logits of a
chunk are one matmul in the compute dtype (bfloat16 on GPUs), upcast to float32 for the row
max, the sum of exp and `softmax - onehot`, which is stored back in the compute dtype. The two
gradient GEMMs (d loss / d h, d loss / d w) run per group of at least GEMM_ROWS rows, large enough
to be efficient. In float32 the GEMMs take exp(logits - max) as it is (times the soft-cap's slope,
if any), and the per-row 1 / (sum * N) and the -1 / N at each target (times the slope there) are
applied to their (rows, C) sides instead: two passes over the N x V numbers fewer, and no scatter
into them, with float32's rounding either way. (Not in bfloat16: for
a target with a probability near 1, its gradient would be the small difference of two large
rounded numbers; there the float32 difference is formed first.) Each chunk starts only once the
one before it is done with (mx.depends), so one chunk's float32 arrays and one group's gradient
are all the N x V data the step needs at a time; MLX would otherwise be free to compute every
chunk's logits first. (Without a memory cap, MLX still allocates the next chunks' outputs as the
host queues them, see memory.py.) A custom VJP
returns the precomputed gradients scaled by the incoming cotangent, so the step computes no
logits twice. A logit soft-cap (c tanh(logits / c), the speedrun's) is applied per chunk, its
derivative folded into the gradient; as it bounds the logits by c, it also saves the row max. The
chunk size and the exp come from the device profile (kernels.py): small chunks stay in a CPU's
cache, large ones keep a GPU busy.

On an NVIDIA GPU a device kernel (cuda.py) replaces the float32 chunk arithmetic: it reads a
chunk's bf16 logits and writes their loss and gradient in one pass, so no float32 N x V array
exists at all.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import mlx.core as mx

EVAL_ROWS = 4096  # evaluation's chunk when training takes all rows at once
GEMM_ROWS = 512  # fewest rows whose gradient GEMMs run together: a large enough GEMM on any device
MAX_BOUND_CAP = 30.0  # the largest soft-cap whose bound keeps a row's sum from underflowing: exp(-2 * 30) is above
# cpu_math.py's exp's flush to 0 (at exp(-64))
Loss = Callable[..., mx.array]  # (h, head weight, targets, softcap=0.0) -> mean loss


def gemm_group(rows: int) -> int:
    """Rows whose gradient GEMMs run together, for chunks of `rows` rows: whole chunks, at least GEMM_ROWS."""
    return rows * -(-GEMM_ROWS // rows)


def scales_in_gemms(dtype: mx.Dtype) -> bool:
    """Whether MLX ops leave the gradient's row scales and its targets' terms to the GEMMs' (rows, C) sides
    (see above): in float32."""
    return dtype == mx.float32


Unary = Callable[[mx.array], mx.array]
Rowwise = Callable[[mx.array, mx.array, float, int], tuple[mx.array, mx.array]]
# (logits (n, V), targets (n,), soft-cap, N) -> (per-row loss in float32, (softmax - onehot) / N in the logits' dtype)


def row_max(x: mx.array) -> mx.array:
    return x.max(axis=-1, keepdims=True)


def row_sum(x: mx.array) -> mx.array:
    return x.sum(axis=-1, keepdims=True)


def make_losses(rows: int, exp: Unary = mx.exp, rowwise: Rowwise | None = None, row_max: Unary = row_max,
                row_sum: Unary = row_sum) -> tuple[Loss, Loss]:
    """(training loss, evaluation loss) for logits h @ w.T: `rows` rows of logits at a time (0: all rows in
    training, EVAL_ROWS in evaluation, whose float32 chunks a device kernel does not replace), `exp` for
    exp(x <= 0), `row_max` / `row_sum` for reductions over the last axis (keepdims). Both take h (..., C),
    w (V, C), y (...) and a soft-cap c (logits -> c tanh(logits / c), 0: none) and return the mean loss in
    float32. `rowwise`, a device kernel for a chunk's loss and gradient (cuda.py), replaces the MLX ops of
    the training loss."""

    def capped(x: mx.array, softcap: float) -> tuple[mx.array, mx.array]:
        """(c tanh(x / c), its slope): c (1 - 2q) with q = sigmoid(-2x / c), from the profile's exp of a
        non-positive argument (MLX's own tanh is slower on the CPU); the slope 1 - tanh^2 is 4q (1 - q)."""
        e = exp(mx.abs(x) * (-2 / softcap))
        q = mx.where(x > 0, e, 1.0) / (1 + e)
        return softcap * (1 - 2 * q), 4 * q * (1 - q)

    def chunk_loss(hc: mx.array, w: mx.array, yc: mx.array, softcap: float):
        """One chunk's (summed loss, exp(logits - m) for a per-row bound m >= the logits, row sums of that,
        d capped / d raw logits and its value at each row's target, or None, None), in float32."""
        logits = (hc @ w.T).astype(mx.float32)
        target = mx.take_along_axis(logits, yc[:, None], axis=-1)  # (rows, 1): capped after the gather, so that
        dcap = dcap_y = None  # no N x V array of capped logits is written for it
        if softcap:
            (logits, dcap), (target, dcap_y) = capped(logits, softcap), capped(target, softcap)
        # capped logits are <= c, so c can stand in for the row max (one pass fewer) while exp(-2c) is not
        # flushed to 0 (MAX_BOUND_CAP)
        top = softcap if 0 < softcap <= MAX_BOUND_CAP else row_max(logits)
        e = exp(logits - top)
        total = row_sum(e)
        loss = (top + mx.log(total) - target).sum()
        return loss, e, total, dcap, dcap_y

    def chunk_loss_and_grad(hc: mx.array, w: mx.array, yc: mx.array, softcap: float, n: int):
        """One chunk's (summed loss, D, s, t). With s None, D is the gradient (softmax - onehot) / n (times the
        soft-cap's slope) in the compute dtype: the device kernel's, or MLX ops'. In float32, D is exp(logits -
        max) as exp made it (times the slope), s the per-row 1 / (sum * n) and t the slope at each row's target
        (None without a cap: 1): the gradient is D * s - onehot * t / n (see fused)."""
        if rowwise:
            loss, d = rowwise(hc @ w.T, yc, softcap, n)
            return loss.sum(), d, None, None
        loss, e, total, dcap, dcap_y = chunk_loss(hc, w, yc, softcap)
        if scales_in_gemms(hc.dtype):
            return loss, e if dcap is None else e * dcap, 1 / (total * n), dcap_y
        # softmax / n, then - 1 / n at each row's target: a scatter of one number a row rather than a
        # comparison with every vocabulary index
        d = (e * (1 / (total * n))).at[mx.arange(yc.shape[0]), yc].add(-1.0 / n)
        return loss, (d if dcap is None else d * dcap).astype(hc.dtype), None, None

    @lru_cache
    def fused(softcap: float):
        """The custom function (mean loss, d loss / d h, d loss / d w) of h (N, C), w (V, C), y (N,)."""

        @mx.custom_function
        def loss_and_grads(h: mx.array, w: mx.array, y: mx.array) -> tuple[mx.array, mx.array, mx.array]:
            n = h.shape[0]
            size = rows or n
            group = gemm_group(size)
            loss, dh, dw, done, scaled, slopes = 0.0, [], None, [], False, []
            for g in range(0, n, group):
                hg, yg, ds, ss = h[g : g + group], y[g : g + group], [], []
                for s in range(0, hg.shape[0], size):
                    # a chunk starts once the one before it is done with (mx.depends), so one chunk's float32
                    # N x V arrays and one group's gradient are alive at a time, not the run-ahead of all chunks
                    hc = mx.depends(hg[s : s + size], done) if done else hg[s : s + size]
                    part, d, scale, slope = chunk_loss_and_grad(hc, w, yg[s : s + size], softcap, n)
                    loss, done = loss + part, [part, d]
                    slopes.append(slope)
                    ds.append(d)
                    ss.append(scale)
                d = ds[0] if len(ds) == 1 else mx.concatenate(ds)  # (group, V)
                scaled = ss[0] is not None
                if scaled:  # the row scales go to the (group, C) sides of the GEMMs, not over the N x V array
                    scales = ss[0] if len(ss) == 1 else mx.concatenate(ss)
                    dh.append((d @ w) * scales)
                    hg = hg * scales
                else:
                    dh.append(d @ w)
                if dw is not None and dw.dtype == d.dtype:  # float32: the GEMM adds into the running sum (one pass
                    dw = mx.addmm(dw, d.T, hg)  # over the V x C numbers fewer, and no second buffer of them)
                else:
                    dw_g = d.T @ hg
                    if n > group:  # several groups sum their products in float32, as one GEMM over all rows would
                        dw_g = dw_g.astype(mx.float32)
                    dw = dw_g if dw is None else dw + dw_g
                done = [loss, dh[-1], dw]
            dh = dh[0] if len(dh) == 1 else mx.concatenate(dh)
            if scaled:  # - onehot * t / n: - w[y] t / n for each row's dh, - h t / n into dw's row of each target
                t = (1 / n) if softcap == 0 else mx.concatenate(slopes) * (1 / n)
                dh, dw = dh - w[y] * t, dw.at[y].add(h * -t)
            return loss / n, dh, dw

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
        size = rows or EVAL_ROWS
        total = None
        for s in range(0, h.shape[0], size):  # chunk after chunk, as in training
            hc = h[s : s + size] if total is None else mx.depends(h[s : s + size], total)
            part = chunk_loss(hc, w, y[s : s + size], float(softcap))[0]
            total = part if total is None else total + part
        return total / h.shape[0]

    return cross_entropy, eval_cross_entropy
