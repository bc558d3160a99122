"""The few primitives that differ per device, bound once from the chosen profile (device.py).

The model, the loss and the optimizer call `kernels.attention`, `kernels.gelu`, `kernels.sqrt`,
`kernels.cross_entropy`... and never ask which device they run on. On MLX's x86 CPU backend
these are cpu.py's multiply-add versions; everywhere else they are MLX's own (the fused
`mx.fast.scaled_dot_product_attention`, `mx.exp`, `mx.sqrt`) and a float32 tanh GELU with its own VJP.
The fused head + loss of loss.py is sized for the device: its rows per chunk come from the profile, and on
an NVIDIA GPU its float32 arithmetic is cuda.py's kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from . import device
from .loss import Loss, make_losses

Unary = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class Kernels:
    attention: Callable[..., mx.array]  # (q, k, v, scale, causal): softmax(q k^T scale) v, causal from the last query
    gelu: Unary  # GPT-2's tanh GELU
    exp: Unary  # for x <= 0
    sqrt: Unary
    cross_entropy: Loss  # fused head + loss for training: (h, head weight, targets, softcap) -> mean loss
    eval_cross_entropy: Loss  # the same without the gradient


_GELU_C = math.sqrt(2 / math.pi)


@mx.custom_function
def mlx_gelu(x: mx.array) -> mx.array:
    """GPT-2's tanh GELU, computed in float32 (as PyTorch's bf16 autocast does) and rounded to x's dtype."""
    xf = x.astype(mx.float32)
    return (0.5 * xf * (1 + mx.tanh(_GELU_C * (xf + 0.044715 * xf * xf * xf)))).astype(x.dtype)


@mlx_gelu.vjp
def _mlx_gelu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    """d gelu / dx from x alone, with (1 + tanh z) / 2 as sigmoid(2z): an expression apart from the forward's,
    since mx.compile merges identical ones and a shared tanh would keep the forward's 4x-wide intermediates
    alive until the backward (with autodiff, ~8 more n_embd-units per layer and token)."""
    # float32 x by another op than the forward's cast (see above), clipped where the slope is exactly 0 or 1
    xf = mx.clip(x * mx.array(1.0, mx.float32), -100, 100)
    s = mx.sigmoid((2 * _GELU_C) * xf * (1 + 0.044715 * xf * xf))
    return (cotangent.astype(mx.float32) * (s + 2 * xf * s * (1 - s) * _GELU_C * (1 + 3 * 0.044715 * xf * xf))
            ).astype(x.dtype)


def mlx_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """MLX's fused attention; its causal mask is aligned to the last query (cached keys come first)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)


def for_profile(profile: device.Profile) -> Kernels:
    """The kernels of a profile (any profile runs on any backend: tests force GPU profiles on the CPU)."""
    if profile.software_math:
        from . import cpu

        return Kernels(cpu.attention, cpu.gelu, cpu.exp, cpu.sqrt,
                       *make_losses(profile.loss_rows, cpu.exp))
    rowwise = None
    if profile.cuda_kernels:
        from . import cuda

        rowwise = cuda.cross_entropy_rows if cuda.available() else None  # forced on a CPU: MLX's ops
    return Kernels(mlx_attention, mlx_gelu, mx.exp, mx.sqrt,
                   *make_losses(profile.loss_rows, mx.exp, rowwise))


BOUND = for_profile(device.PROFILE)
attention = BOUND.attention
gelu = BOUND.gelu
sqrt = BOUND.sqrt
cross_entropy = BOUND.cross_entropy
eval_cross_entropy = BOUND.eval_cross_entropy
