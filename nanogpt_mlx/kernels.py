"""The few primitives that differ per device, bound once from the chosen profile (device.py).

The model, the loss and the optimizer call `kernels.attention`, `kernels.gelu`, `kernels.sqrt`,
`kernels.cross_entropy`... and never ask which device they run on. On MLX's x86 CPU backend
these are cpu.py's multiply-add versions; everywhere else they are MLX's own (the fused
`mx.fast.scaled_dot_product_attention`, `nn.gelu_approx`, `mx.exp`, `mx.sqrt`). The fused head +
loss of loss.py is sized for the device: its rows per chunk come from the profile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

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
    return Kernels(mlx_attention, nn.gelu_approx, mx.exp, mx.sqrt,
                   *make_losses(profile.loss_rows, mx.exp, rowwise))


BOUND = for_profile(device.PROFILE)
attention = BOUND.attention
gelu = BOUND.gelu
sqrt = BOUND.sqrt
cross_entropy = BOUND.cross_entropy
eval_cross_entropy = BOUND.eval_cross_entropy
