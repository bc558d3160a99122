"""Optimizers, parameter groups, learning-rate schedules and gradient clipping, for the recipes (recipes.py).

build-nanogpt's `configure_optimizers` and `get_lr`: AdamW with betas (0.9, 0.95), eps 1e-8, bias
correction as in PyTorch, weight decay only on tensors with >= 2 dims; linear warmup, then cosine
down to min_lr. Clipping is PyTorch's clip_grad_norm_. The speedrun's: Muon (Newton-Schulz
orthogonalised momentum) for the blocks' matrices with its momentum warmup, and warmup-stable-decay.

`Packing` lays the tensors of each parameter group end to end in a few flat buffers, as PyTorch's fused
AdamW and foreach clipping treat a group: the optimizer, the clipping and the all-reduce then see 14
arrays instead of 148 tensors in GPT-2 (on a GPU, a few kernels each instead of a few per tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import kernels
from .errors import UserError, check_bool


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """build-nanogpt's schedule: linear warmup to max_lr, then cosine down to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (max_lr - min_lr)


def wsd_lr(step: int, max_lr: float, warmup_steps: int, max_steps: int, cooldown_frac: float) -> float:
    """Warmup-stable-decay (the speedrun's schedule): linear warmup, max_lr, then linearly to 0 over the last
    cooldown_frac of max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    x = min(step / max_steps, 1.0)
    return max_lr if x < 1 - cooldown_frac else max_lr * (1 - x) / cooldown_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """The speedrun's Muon momentum warm-up: linear from `start` to `end` over the first warmup_steps."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps else 1.0
    return (1 - frac) * start + frac * end


def clip_scale(grads, max_norm: float) -> tuple[mx.array | None, mx.array]:
    """PyTorch's clip_grad_norm_'s factor, min(1, max_norm / (norm + 1e-6)) (None where max_norm <= 0: no
    clipping), and the gradients' pre-clip global norm."""
    norm = mx.sqrt(sum(kernels.square_sum(g) for _, g in tree_flatten(grads)))
    return (mx.minimum(max_norm / (norm + 1e-6), 1.0) if max_norm > 0 else None), norm


def clip_grad_norm(grads, max_norm: float):
    """PyTorch's clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)); return (grads, pre-clip norm).
    max_norm <= 0 clips nothing, as a config's grad_clip 0 (PyTorch's would scale the gradients by 0 or less)."""
    scale, norm = clip_scale(grads, max_norm)
    return (grads if scale is None else tree_map(lambda g: g * scale, grads)), norm


def apply_scaled(optimizer: optim.Optimizer, gradients: dict, parameters: dict, scale: mx.array | None) -> dict:
    """optimizer.apply_gradients of the gradients times `scale` (clip_scale's; None: 1), the factor folded into
    each update's own coefficients of the gradient (AdamW's, Muon's: grad_scale), which each moment's kernel
    applies as it reads them: a scaled copy of the gradients was 4 bytes a parameter more at the step's peak, and
    a pass over them."""
    optimizers = getattr(optimizer, "optimizers", [optimizer])  # (MLX's MultiOptimizer's groups)
    for opt in optimizers:
        opt.grad_scale = scale
    try:
        return optimizer.apply_gradients(gradients, parameters)
    finally:
        for opt in optimizers:
            opt.grad_scale = None


def unfused(a: mx.array) -> mx.array:
    """`a` from a kernel of its own: mx.compile does not fuse across Contiguous (a no-op on a contiguous array).
    - A step's scalar: fused into the kernel of the tensor it scales, its ops (a pow, an rsqrt) ran for every
      element, and a group of one large tensor (the speedrun's embedding, its head) paid several times over.
    - A new moment: fused into the update, it was one of the kernel's several outputs, and MLX gives an input's
      buffer to an output only in a kernel of one output, so the old and new moments of every tensor were alive at
      the step's peak (8 bytes a parameter for AdamW). Alone, the new moment takes over the old one's buffer."""
    return mx.contiguous(a)


def _scaled(coefficient: float | mx.array, scale: mx.array | None) -> float | mx.array:
    """A gradient's coefficient in an update, times the gradients' scale (apply_scaled), computed once."""
    return coefficient if scale is None else unfused(coefficient * scale)


class AdamW(optim.AdamW):
    """PyTorch's AdamW (bias-corrected, decoupled decay): MLX's update with the step's scalars computed once."""

    grad_scale: mx.array | None = None  # what the gradients are multiplied by (apply_scaled)

    def __init__(self, learning_rate: float | Callable[[mx.array], mx.array], betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, bias_correction: bool = True):
        # MLX's AdamW defaults to no bias correction: taken for a drop-in, it was accepted and ignored
        check_bool("bias_correction", bias_correction)
        if not bias_correction:
            raise UserError(f"bias_correction={bias_correction!r}: this AdamW is PyTorch's, always bias-corrected "
                            "(mlx.optimizers.AdamW is the one without)")
        super().__init__(learning_rate, list(betas), eps, weight_decay, bias_correction=True)

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        self._scalars: dict = {}  # this step's per-dtype scalars, computed by its first tensor
        return super().apply_gradients(gradients, parameters)

    def step_scalars(self, dtype: mx.Dtype) -> tuple:
        """(lr / (1 - b1^t), 1 / sqrt(1 - b2^t), 1 - lr * weight decay, the gradient's coefficients in m and v:
        (1 - b1) s and (1 - b2) s^2 of the gradients' scale s) in `dtype`, once per step for all tensors: per
        tensor they would be extra kernels each on a GPU."""
        cache = self.__dict__.setdefault("_scalars", {})
        if dtype not in cache:
            lr = self.learning_rate.astype(dtype)
            b1, b2 = self.betas
            s = None if self.grad_scale is None else self.grad_scale.astype(dtype)
            cache[dtype] = (unfused((lr / (1 - b1**self.step)).astype(dtype)),
                            unfused(mx.rsqrt(1 - b2**self.step).astype(dtype)),  # a scalar: MLX's own rsqrt is fine
                            unfused(1 - lr * self.weight_decay),
                            _scaled(1 - b1, s), _scaled(1 - b2, None if s is None else mx.square(s)))
        return cache[dtype]

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        b1, b2 = self.betas
        c1, c2, decay, g1, g2 = self.step_scalars(gradient.dtype)
        # each new moment in a kernel of its own, which reuses the old one's buffer
        m = state["m"] = unfused(b1 * state["m"] + g1 * gradient)
        v = state["v"] = unfused(b2 * state["v"] + g2 * mx.square(gradient))
        return parameter * decay - c1 * m / (mx.sqrt(v) * c2 + self.eps)


DECAY, NO_DECAY = "decay", "no_decay"


def decay_group(path: str, p: mx.array) -> str:
    """build-nanogpt's groups: decay on >= 2-D tensors (matmul weights, embeddings), none on biases and norms."""
    return DECAY if p.ndim >= 2 else NO_DECAY


def build_nanogpt_adamw(lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> optim.MultiOptimizer:
    """AdamW with decay on >= 2-D tensors, none on the others; over the tensors themselves or over their
    Packing by decay_group (whose flat buffers are named by group and bucket)."""
    adamw = partial(AdamW, learning_rate=lr, betas=list(betas), eps=eps)
    return optim.MultiOptimizer([adamw(weight_decay=weight_decay), adamw(weight_decay=0.0)],
                                [lambda path, p: Packing.group_of(path) == DECAY or p.ndim >= 2])


class Packing:
    """Where each parameter lives in a few flat buffers per group, so that an elementwise optimizer (AdamW),
    clipping and the all-reduce see a few arrays instead of one per tensor: pack() concatenates a tree of
    tensors (gradients, weights) into {bucket: buffer}, unpack() gives the tensors back as views of the buffers
    (no copy). Buckets are named `{group}:{i}`; each tensor starts at a multiple of ALIGN elements, for the
    GPU's vectorised loads. `group=None` packs nothing: pack and unpack return the tree (Muon needs each
    matrix whole)."""

    ALIGN = 64
    # elements of a bucket, unless one tensor alone is larger: an update allocates a buffer's new moments and
    # weights before its old ones are freed, so one buffer per group would add ~3 float32 copies of the model
    # to the step's peak; buckets of this size keep that near what a per-tensor update adds
    BUCKET = 1 << 23

    def __init__(self, params: dict, group: Callable[[str, mx.array], str] | None):
        self.slots: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}  # bucket -> [(path, shape, offset)]
        self.sizes: dict[str, int] = {}
        if group is None:
            return
        last: dict[str, str] = {}  # group -> its bucket being filled
        for path, p in tree_flatten(params):
            g = group(path, p)
            size = -(-p.size // self.ALIGN) * self.ALIGN
            bucket = last.get(g)
            if bucket is None or self.sizes[bucket] + size > self.BUCKET:
                bucket = last[g] = f"{g}:{sum(b.startswith(g + ':') for b in self.slots)}"
                self.slots[bucket], self.sizes[bucket] = [], 0
            self.slots[bucket].append((path, p.shape, self.sizes[bucket]))
            self.sizes[bucket] += size

    @staticmethod
    def group_of(path: str) -> str:
        """The group of a bucket's name (`decay:0` -> `decay`)."""
        return path.partition(":")[0]

    def pack(self, tree: dict) -> dict:
        """{bucket: its tensors of `tree`, flattened end to end, zeros in the alignment gaps}."""
        if not self.slots:
            return tree
        flat = dict(tree_flatten(tree))
        return {b: self._pack_bucket(b, flat) for b in self.slots}

    def _pack_bucket(self, bucket: str, flat: dict[str, mx.array]) -> mx.array:
        parts = []
        for path, _, _ in self.slots[bucket]:
            a = flat[path].reshape(-1)
            gap = -a.size % self.ALIGN
            parts += [a, mx.zeros((gap,), a.dtype)] if gap else [a]
        return mx.concatenate(parts)

    def unpack(self, packed: dict, dtype: mx.Dtype | None = None) -> dict:
        """The tensors as views of the packed buffers (cast to `dtype` first, one cast per bucket)."""
        cast = (lambda a: a) if dtype is None else (lambda a: a.astype(dtype))
        if not self.slots:
            return tree_map(cast, packed)
        views = []
        for bucket, slots in self.slots.items():
            buf = cast(packed[bucket])
            views += [(path, buf[offset : offset + math.prod(shape)].reshape(shape)) for path, shape, offset in slots]
        return tree_unflatten(views)

    def unpack_state(self, state: dict) -> dict:
        """An optimizer state over packed buffers as the per-tensor state it equals (`{bucket}.m` -> `{path}.m`
        for each tensor of the bucket): what checkpoints store, whatever the packing."""
        if not self.slots:
            return state
        items = []
        for key, a in tree_flatten(state):
            parts = key.split(".")
            i = self._bucket_at(parts, a)
            if i is None:
                items.append((key, a))
                continue
            items += [(_replace_part(parts, i, path), a[offset : offset + math.prod(shape)].reshape(shape))
                      for path, shape, offset in self.slots[parts[i]]]
        return tree_unflatten(items)

    def pack_state(self, state: dict, like: dict) -> dict:
        """unpack_state's inverse: a per-tensor optimizer state (a checkpoint's) in the layout of `like`, the packed
        optimizer's own state. A KeyError names an entry of `like` that `state` lacks."""
        if not self.slots:
            return state
        flat = dict(tree_flatten(state))
        items = []
        for key, a in tree_flatten(like):
            parts = key.split(".")
            i = self._bucket_at(parts, a)
            if i is None:
                items.append((key, flat[key]))
                continue
            tensors = {path: flat[_replace_part(parts, i, path)] for path, _, _ in self.slots[parts[i]]}
            items.append((key, self._pack_bucket(parts[i], tensors)))
        return tree_unflatten(items)

    def _bucket_at(self, parts: list[str], a: mx.array) -> int | None:
        """The position of the bucket in a state key's parts whose buffer `a` is, if it is one."""
        return next((i for i, part in enumerate(parts) if part in self.slots and a.size == self.sizes[part]), None)


def _replace_part(parts: list[str], i: int, name: str) -> str:
    return ".".join(parts[:i] + [name] + parts[i + 1 :])


# Newton–Schulz quintic coefficients of Keller Jordan's Muon: they push every singular value of a
# Frobenius-normalised matrix into roughly [0.7, 1.2] in 5 steps, faster than converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: mx.array, steps: int = 5, dtype: mx.Dtype = mx.float32) -> mx.array:
    """An approximately orthogonal matrix with g's singular vectors (U V^T of g = U S V^T), computed in `dtype`;
    a stack (..., m, n) is a batch of matrices."""
    a, b, c = NS_COEFFICIENTS
    x = g.astype(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        x = x.swapaxes(-1, -2)
    norm = mx.sqrt(mx.sum(mx.square(x.astype(mx.float32)), axis=(-2, -1), keepdims=True))  # per matrix
    x = x / (norm + 1e-7).astype(dtype)
    for _ in range(steps):
        A = x @ x.swapaxes(-1, -2)
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x.swapaxes(-1, -2) if tall else x


class Muon(optim.Optimizer):
    """Muon (KellerJordan/Muon) for 2-D hidden matrices: Nesterov momentum, the update orthogonalised by
    Newton–Schulz (in `ns_dtype`: bf16 on GPUs, float32 on CPUs), scaled by sqrt(max(1, rows / cols)), and
    weight decay decoupled from it (p <- p (1 - lr wd) - lr update), unlike MLX's optim.Muon.
    `splits` > 1 treats each matrix as that many row blocks orthogonalised separately: GPT-2's c_attn
    is q, k and v stacked, which the speedrun keeps as three matrices."""

    grad_scale: mx.array | None = None  # what the gradients are multiplied by (apply_scaled)

    def __init__(self, learning_rate: float, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5,
                 ns_dtype: mx.Dtype = mx.float32, splits: int = 1):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self._maybe_schedule("momentum", momentum)  # in the state, so a warm-up needs no recompile
        self.weight_decay, self.ns_steps, self.ns_dtype, self.splits = weight_decay, ns_steps, ns_dtype, splits

    @property
    def momentum(self) -> mx.array:
        return self.state["momentum"]

    @momentum.setter
    def momentum(self, value: float) -> None:
        self.state["momentum"] = mx.array(value)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        # (a vector or split rows failed at the first update, as a tuple's unpacking or a reshape inside MLX)
        if parameter.ndim < 2 or parameter.shape[-2] % self.splits:
            raise UserError(f"Muon updates matrices whose rows divide into its {self.splits} split(s), got a parameter "
                            f"of shape {tuple(parameter.shape)}: give vectors (gains, biases) to AdamW")
        state["m"] = mx.zeros_like(parameter)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        beta = self.momentum.astype(gradient.dtype)
        g1 = _scaled(1 - beta, None if self.grad_scale is None else self.grad_scale.astype(gradient.dtype))
        m = state["m"] = unfused(beta * state["m"] + g1 * gradient)  # (its buffer reused)
        nesterov = g1 * gradient + beta * m
        rows, cols = parameter.shape[-2:]
        rows //= self.splits
        blocks = nesterov.reshape(*parameter.shape[:-2], self.splits, rows, cols)
        update = newton_schulz(blocks, self.ns_steps, self.ns_dtype).astype(parameter.dtype).reshape(parameter.shape)
        update = update * max(1.0, rows / cols) ** 0.5
        lr = self.learning_rate.astype(parameter.dtype)
        return parameter * (1 - lr * self.weight_decay) - lr * update
