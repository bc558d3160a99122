"""The NVIDIA GPU's own kernel: softmax cross-entropy and its gradient in one pass over bf16 logits.

MLX's ops can compute the loss from bfloat16 logits only through float32 copies of them (a cast, a
max, an exp, a sum, each a full pass over N x 50304 numbers). This kernel (`mx.fast.cuda_kernel`,
compiled by MLX at first use) gives each row of logits one thread block: it reads the row once for
an online max and sum of exp in float32, then again (mostly from L2) to write
(softmax - onehot) / N in the logits' dtype, and the row's loss. No float32 N x V array exists.
A logit soft-cap c tanh(z / c) is applied on the fly and its derivative folded into the gradient.

kernels.py binds it for the CUDA profile when MLX's default device is an NVIDIA GPU; on other
devices (tests force the CUDA profile on the CPU) loss.py's MLX-op version runs instead.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

THREADS = 1024  # threads per row (one block); a 50304-wide row is ~6 packs of 8 per thread

_HEADER = """
#define NEG_INF __int_as_float(0xff800000)
namespace nanogpt {  // MLX's kernel is in namespace mlx::core::cu, where a name of MLX's own would hide ours
template <typename T, int P> struct alignas(sizeof(T) * P) Pack { T v[P]; };

// (max, sum of exp(z - max)) of two partial rows, merged
__device__ inline void merge(float& m, float& s, float m2, float s2) {
  float mm = fmaxf(m, m2);
  if (mm == NEG_INF) return;  // both empty
  s = (m == NEG_INF ? 0.f : s * expf(m - mm)) + (m2 == NEG_INF ? 0.f : s2 * expf(m2 - mm));
  m = mm;
}
}  // namespace nanogpt
"""

_SOURCE = """
  const int row = blockIdx.x, tid = threadIdx.x;
  const float inv_n = params[0], cap = params[1];
  using Vec = nanogpt::Pack<T, PACK>;
  const Vec* x = reinterpret_cast<const Vec*>(logits + (size_t)row * V);
  Vec* d = reinterpret_cast<Vec*>(dlogits + (size_t)row * V);

  // pass 1: this thread's running max and sum of exp over its packs
  float m = NEG_INF, s = 0.f;
  for (int i = tid; i < V / PACK; i += THREADS) {
    Vec a = x[i];
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      float z = static_cast<float>(a.v[k]);
      if (CAP) z = cap * tanhf(z / cap);
      if (z > m) { s = s * expf(m - z) + 1.f; m = z; } else if (m != NEG_INF) { s += expf(z - m); }  // (-inf adds 0)
    }
  }
  // merge across the warp, then across the warps through shared memory
  for (int off = 16; off > 0; off >>= 1)
    nanogpt::merge(m, s, __shfl_xor_sync(0xffffffff, m, off), __shfl_xor_sync(0xffffffff, s, off));
  __shared__ float wm[32], ws[32], lse_shared;
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) { wm[warp] = m; ws[warp] = s; }
  __syncthreads();
  if (warp == 0) {
    m = lane < THREADS / 32 ? wm[lane] : NEG_INF;
    s = lane < THREADS / 32 ? ws[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1)
      nanogpt::merge(m, s, __shfl_xor_sync(0xffffffff, m, off), __shfl_xor_sync(0xffffffff, s, off));
    if (lane == 0) {
      lse_shared = m + logf(s);
      const int t = targets[row];
      float zt = static_cast<float>(logits[(size_t)row * V + t]);
      if (CAP) zt = cap * tanhf(zt / cap);
      loss[row] = lse_shared - zt;
    }
  }
  __syncthreads();
  const float lse = lse_shared;
  const int t = targets[row];

  // pass 2: (softmax - onehot) / N, times d capped / d z under a soft-cap
  for (int i = tid; i < V / PACK; i += THREADS) {
    Vec a = x[i], out;
#pragma unroll
    for (int k = 0; k < PACK; ++k) {
      float z = static_cast<float>(a.v[k]);
      if (CAP) z = cap * tanhf(z / cap);
      float g = expf(z - lse) * inv_n;
      if (i * PACK + k == t) g -= inv_n;
      if (CAP) g *= 1.f - (z / cap) * (z / cap);
      out.v[k] = static_cast<T>(g);
    }
    d[i] = out;
  }
"""


@lru_cache(maxsize=None)
def _kernel():
    return mx.fast.cuda_kernel(name="nanogpt_cross_entropy", input_names=["logits", "targets", "params"],
                               output_names=["loss", "dlogits"], source=_SOURCE, header=_HEADER)


def available() -> bool:
    """True when MLX runs on an NVIDIA GPU (the kernel's only device)."""
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def cross_entropy_rows(logits: mx.array, targets: mx.array, softcap: float, n: int) -> tuple[mx.array, mx.array]:
    """(per-row loss in float32, (softmax - onehot) / n in the logits' dtype) of logits (rows, V) and
    targets (rows,), under a soft-cap (0: none)."""
    rows, vocab = logits.shape
    pack = 8 if vocab % 8 == 0 and logits.dtype in (mx.bfloat16, mx.float16) else 4 if vocab % 4 == 0 else 1
    loss, dlogits = _kernel()(
        inputs=[logits, targets.astype(mx.int32), mx.array([1.0 / n, softcap or 1.0], dtype=mx.float32)],
        template=[("T", logits.dtype), ("V", vocab), ("PACK", pack), ("THREADS", THREADS), ("CAP", bool(softcap))],
        grid=(rows * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows,), (rows, vocab)], output_dtypes=[mx.float32, logits.dtype])
    return loss, dlogits
