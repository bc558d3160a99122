"""exp, sqrt, softmax, GELU and attention that stay fast on MLX's x86 CPU backend.

MLX's x86 CPU build evaluates exp, tanh and sqrt in scalar software (7-12 ns an element), so the
softmaxes of attention and of the loss, the tanh of GELU and AdamW's sqrt cost more than the
matmuls of a small GPT. Here they are rebuilt from multiply-adds that `mx.compile` fuses into
one kernel: exp(x) = 2**k * exp(r) with k = round(x / ln 2), |r| <= ln(2) / 2, a degree-7
polynomial for exp(r) and 2**k made from its float32 bits; sqrt by Newton's method from a
bit-level first guess. Both are accurate to ~1e-7 relative, like a library's.
Everywhere else (Apple silicon, GPUs) these functions are MLX's own: mx.exp, mx.sqrt,
nn.gelu_approx and the fused mx.fast.scaled_dot_product_attention.
"""

from __future__ import annotations

import math
import platform

import mlx.core as mx
import mlx.nn as nn

_EXP_POLY = [1 / math.factorial(k) for k in range(7, -1, -1)]  # exp(r)'s Taylor coefficients, degree 7 first
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 in two parts: k * _LN2_HI is exact
_GELU_C = math.sqrt(2 / math.pi)


def software_math() -> bool:
    """True where MLX's exp and sqrt are the slow scalar ones: its CPU backend on x86-64."""
    return mx.default_device() == mx.cpu and platform.machine().lower() in ("x86_64", "amd64")


def exp_nonpositive(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0; x < -87 gives ~1e-38 (not 0), which no sum or softmax can tell from 0."""
    return mx.exp(x) if not software_math() else _exp_poly(x)


@mx.custom_function
def _exp_poly(x: mx.array) -> mx.array:
    return _exp(x)


@_exp_poly.vjp
def _exp_vjp(x, cotangent, output):
    return cotangent * output


# The element-wise bodies are compiled (once per shape) so that eager calls, as in token-by-token
# sampling, are one fused kernel each rather than a dozen small ops.
@mx.compile
def _exp(x: mx.array) -> mx.array:
    x = mx.maximum(x, -87.0)
    k = mx.floor(x * (1 / math.log(2)) + 0.5)
    r = x - k * _LN2_HI - k * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    two_k = mx.view(mx.left_shift(k.astype(mx.int32) + 127, 23), mx.float32)  # the bits of 2.0**k
    return p * two_k


def sqrt(x: mx.array) -> mx.array:
    """Square root of float32 x >= 0 (sqrt(0) gives ~1e-20)."""
    return mx.sqrt(x) if not software_math() else _sqrt(x)


@mx.compile
def _sqrt(x: mx.array) -> mx.array:
    y = mx.view(mx.right_shift(mx.view(x, mx.int32), 1) + 0x1FBD1DF5, mx.float32)  # within 4%
    for _ in range(3):  # each Newton step squares the relative error: 4e-2, 8e-4, 3e-7, float rounding
        y = 0.5 * (y + x / y)
    return y


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis."""
    if not software_math():
        return mx.softmax(x, axis=-1)
    return _softmax(x.astype(mx.float32)).astype(x.dtype)


@mx.custom_function
def _softmax(x: mx.array) -> mx.array:
    e = _exp_poly(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, y):
    return y * (cotangent - (cotangent * y).sum(axis=-1, keepdims=True))


def gelu(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (GPT-2's "gelu_new")."""
    if not software_math():
        return nn.gelu_approx(x)
    return _gelu(x.astype(mx.float32)).astype(x.dtype)


def _tanh_gelu_parts(x: mx.array) -> tuple[mx.array, mx.array]:
    """(z, tanh z) for z = sqrt(2/pi) (x + 0.044715 x^3); tanh from exp(-2|z|), which cannot overflow."""
    z = _GELU_C * (x + 0.044715 * x * x * x)
    e = _exp(-2 * mx.abs(z))
    t = (1 - e) / (1 + e)
    return z, mx.where(z < 0, -t, t)


@mx.custom_function
def _gelu(x: mx.array) -> mx.array:
    return _gelu_forward(x)


@_gelu.vjp
def _gelu_vjp(x, cotangent, output):  # a one-argument function gets its primal as is
    return _gelu_backward(x, cotangent)


@mx.compile
def _gelu_forward(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + _tanh_gelu_parts(x)[1])


@mx.compile
def _gelu_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    _, t = _tanh_gelu_parts(x)
    xc = mx.clip(x, -100, 100)  # beyond, 1 - t^2 is exactly 0: no 0 * inf
    dz = _GELU_C * (1 + 3 * 0.044715 * xc * xc)
    return cotangent * (0.5 * (1 + t) + 0.5 * xc * (1 - t * t) * dz)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """softmax(q k^T * scale) v for q (B, nh, T, hs), k and v (B, nh, S, hs); a causal mask is
    aligned to the last query, so it also holds with S - T cached keys before the queries."""
    if not software_math() or q.shape[2] == 1:  # one query (cached decoding): little exp work, no cache copy
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    s = (q * scale) @ k.swapaxes(-1, -2)  # (B, nh, T, S)
    if causal:
        T, S = s.shape[-2:]
        s = mx.where(mx.arange(S) <= mx.arange(S - T, S)[:, None], s, -mx.inf)
    return softmax(s) @ v
