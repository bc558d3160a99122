"""Optimizers, parameter groups, learning-rate schedules and gradient clipping.

build-nanogpt's `configure_optimizers` and `get_lr`: AdamW with betas (0.9, 0.95), eps 1e-8, bias
correction as in PyTorch, weight decay only on tensors with >= 2 dims; linear warmup, then cosine
down to min_lr. Clipping is PyTorch's clip_grad_norm_.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from . import kernels


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """build-nanogpt's schedule: linear warmup to max_lr, then cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


def clip_grad_norm(grads, max_norm: float):
    """PyTorch's clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)); return (grads, pre-clip norm)."""
    norm = mx.sqrt(sum(mx.sum(mx.square(g)) for _, g in tree_flatten(grads)))
    if max_norm <= 0:
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: g * scale, grads), norm


class AdamW(optim.AdamW):
    """PyTorch's AdamW (bias-corrected, decoupled decay): MLX's update with the device's sqrt kernel."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        lr = self.learning_rate.astype(gradient.dtype)
        b1, b2 = self.betas
        m = state["m"] = b1 * state["m"] + (1 - b1) * gradient
        v = state["v"] = b2 * state["v"] + (1 - b2) * mx.square(gradient)
        c1 = (lr / (1 - b1**self.step)).astype(gradient.dtype)
        c2 = mx.rsqrt(1 - b2**self.step).astype(gradient.dtype)  # a scalar: MLX's own rsqrt is fine
        return parameter * (1 - lr * self.weight_decay) - c1 * m / (kernels.sqrt(v) * c2 + self.eps)


def build_nanogpt_adamw(lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> optim.MultiOptimizer:
    """AdamW with decay on >= 2-D tensors (matmul weights, embeddings), none on biases and LayerNorms."""
    adamw = partial(AdamW, learning_rate=lr, betas=list(betas), eps=eps)
    return optim.MultiOptimizer([adamw(weight_decay=weight_decay), adamw(weight_decay=0.0)],
                                [lambda path, p: p.ndim >= 2])

