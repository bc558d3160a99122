"""The CPU profiles' exp, GELU, row reductions and sum of squares, from MLX ops that its CPU backend runs fast.

kernels.py binds them on x86-64, where MLX's CPU build evaluates exp and tanh in scalar software: the softmaxes of
attention and of the loss and GELU's tanh would cost more than the matmuls of a small GPT. exp is rebuilt from
multiply-adds that `mx.compile` fuses: exp(x) = 2**k * exp(r) with k = round(x / ln 2), |r| <= ln(2) / 2, a degree-7
polynomial for exp(r) and 2**k from per-lane shifts (AVX2; else from its float32 bits, whose bit cast splits the
kernel), accurate to ~2e-7 relative, like a library's. It is written to stay one fused kernel: mx.compile fuses at
most 11 operations deep, and a min, max or select in a kernel keeps it from being vectorized. (A Newton square root
for AdamW lost to mx.sqrt once the update is one fused kernel: its bit casts split the kernel.) The same build
reduces a contiguous row one number at a time: row_max and row_sum (softmaxes, the loss) reduce across the rows of a
(n / lanes, lanes) view instead, lanes at a time, and square_sum (clipping's norm; on ARM too, as MLX's CPU sum adds
one number after another) is one BLAS dot product.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from . import cpu_jit

# exp is 0 at and below this: exp(-64) ~ 1.6e-28 is nothing next to the 1 that every caller adds it to (a row sum
# with exp(max - max), GELU's and the soft-cap's 1 +- e), and it keeps products of exp's small results normal
# floats (see _exp_kernel)
_EXP_MIN = -64.0
_EXP_COEFFS = [1 / math.factorial(n) for n in range(8)]  # exp(r)'s Taylor coefficients, r**0 first
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 in two parts: k * _LN2_HI is exact
_ROUND = 1.5 * 2**23
_GELU_C = math.sqrt(2 / math.pi)


def exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0, -inf included; 0 at and below _EXP_MIN (-64). Under mx.compile the clamp joins
    the kernel that made x, and the rest is a kernel of its own: a max keeps a kernel from being vectorized (its
    NaN branch), and x's kernel is often a row-wise subtraction, which runs one number at a time anyway."""
    return _exp_clamped(mx.maximum(x, _EXP_MIN))


@mx.custom_function  # a primitive of its own, which mx.compile cannot merge with the clamp
def _exp_clamped(x: mx.array) -> mx.array:
    return _exp_kernel(x)


@_exp_clamped.vjp
def _exp_vjp(x, cotangent, output):
    return cotangent * output


@_exp_clamped.jvp
def _exp_jvp(x, tangent):  # forward mode (mx.jvp) too: through the kernel's bit casts it was NaN
    return tangent * _exp_kernel(x)


# The element-wise bodies are compiled (once per shape) so that eager calls, as in token-by-token
# sampling, are one fused kernel each rather than a dozen small ops.
@mx.compile
def _exp_kernel(x: mx.array) -> mx.array:
    """exp(x) for _EXP_MIN < x <= 0 (0 at _EXP_MIN) as one fused kernel: 2**k * exp(r) with k = round(x / ln 2) and
    |r| <= ln(2) / 2. mx.compile fuses at most 11 operations deep, hence Estrin's scheme for the polynomial
    rather than Horner's."""
    t = x * (1 / math.log(2)) + _ROUND  # k = t - _ROUND: adding 1.5 * 2**23 leaves no fraction bits in float32
    k = t - _ROUND
    r = (x - k * _LN2_HI) - k * _LN2_LO
    r2, c = r * r, _EXP_COEFFS
    p = ((c[0] + c[1] * r) + r2 * (c[2] + c[3] * r)) + (r2 * r2) * ((c[4] + c[5] * r) + r2 * (c[6] + c[7] * r))
    # / 2**-k, or / inf where x was clamped: exactly 0 there. (Some x86 CPUs take a microcode assist for every
    # denormal operand or result: a causal attention backward ran several times slower while its masked scores'
    # exp was ~1e-38 rather than 0, and products of exp(-80)-sized probabilities with gradients are denormal too.
    # A compare or select would keep the kernel scalar; x > _EXP_MIN is at least 3.8e-6 above it, so
    # 1e-30 / (x - _EXP_MIN) is below 2**-k's rounding.)
    return p / (_two_to_the((_ROUND - t).astype(mx.int32)) + 1e-30 / (x - _EXP_MIN))


def _two_to_the(j: mx.array) -> mx.array:
    """2.0**j for int32 j in [0, 126], exactly."""
    if cpu_jit.jit_avx2:  # per-lane shifts: (2**(j >> 2))**4 * 2**(j & 3); 1 << 31 is -2**31, whose 4th power is 2**124
        q = mx.left_shift(1, mx.right_shift(j, 2)).astype(mx.float32)
        q = q * q
        return (q * q) * mx.left_shift(1, mx.bitwise_and(j, 3)).astype(mx.float32)
    return mx.view(mx.left_shift(j + 127, 23), mx.float32)  # its float32 bits (a view ends the fused kernel)


def square_sum(x: mx.array) -> mx.array:
    """mx.sum(mx.square(x)), as one dot product for float32 (the BLAS's: no squares written, all cores)."""
    if x.dtype != mx.float32:
        return mx.sum(mx.square(x))
    flat = x.reshape(-1)
    return (flat[None] @ flat[:, None]).reshape(())


def _lanes(n: int) -> int:
    """How many lanes a row of n numbers is reduced in (0: as one row). MLX's x86 build reduces a contiguous row
    one number at a time, but a reduction across the rows of an (n / lanes, lanes) view runs lanes at a time."""
    for lanes in ((128,) if n >= 4096 else ()) + (32, 16, 8):
        if n % lanes == 0 and n >= 2 * lanes:
            return lanes
    return 0


def _reduce_rows(x: mx.array, reduce: Callable[..., mx.array]) -> mx.array:
    lanes = _lanes(x.shape[-1])
    if lanes:
        x = reduce(x.reshape(*x.shape[:-1], -1, lanes), axis=-2)
    return reduce(x, axis=-1, keepdims=True)


def row_max(x: mx.array) -> mx.array:
    """x.max(axis=-1, keepdims=True), lanes at a time."""
    return _reduce_rows(x, mx.max)


def row_sum(x: mx.array) -> mx.array:
    """x.sum(axis=-1, keepdims=True), lanes at a time."""
    return _reduce_rows(x, mx.sum)


def gelu(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (GPT-2's "gelu_new"), computed in float32."""
    return _gelu(x.astype(mx.float32)).astype(x.dtype)


def _signed_tanh_gelu(x: mx.array) -> mx.array:
    """tanh z for z = sqrt(2/pi) (x + 0.044715 x^3), from exp(-2|z|), which cannot overflow."""
    e = exp((-2 * _GELU_C) * mx.abs(x + 0.044715 * x * x * x))
    # z has x's sign, taken as x / |x| (a select would keep the kernel from being vectorized); below 1e-22,
    # where the factor is not +-1, |tanh z| is 0 anyway
    return (1 - e) / (1 + e) * (x / (mx.abs(x) + 1e-30))


@mx.custom_function
def _gelu(x: mx.array) -> mx.array:
    return _gelu_forward(x)


@_gelu.vjp
def _gelu_vjp(x, cotangent, output):  # a one-argument function gets its primal as is
    return _gelu_backward(x, cotangent)


@_gelu.jvp
def _gelu_jvp(x, tangent):  # element-wise: the tangent times the slope, as the cotangent is
    return _gelu_backward(x, tangent)


@mx.compile
def _gelu_forward(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + _signed_tanh_gelu(x))


@mx.compile
def _gelu_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    t = _signed_tanh_gelu(x)
    # d/dx 0.5 x (1 + t) = 0.5 (1 + t) + 0.5 x (1 - t^2) dz/dx, with s = x (1 - t^2) multiplied in first: far out,
    # 1 - t^2 is exactly 0, so every product is 0 (x * x * x first would overflow to inf, and inf * 0 is nan)
    s = (1 - t * t) * x
    return cotangent * (0.5 * (1 + t) + (0.5 * _GELU_C) * (s + (3 * 0.044715) * (s * x) * x))
