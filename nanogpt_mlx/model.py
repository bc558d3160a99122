"""The GPT-2 model, as build-nanogpt defines it, in MLX.

Parameter names follow Hugging Face's GPT-2 (`h.0.attn.c_attn.weight`, ...) without the
`transformer.` prefix, so converting weights is a key map plus transposes (see weights.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import kernels
from .errors import UserError

GPT2_VOCAB_SIZE = 50257  # real tokens; 50304 is the padded size (a multiple of 128)


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise UserError(f"model config: {f.name} must be positive, got {getattr(self, f.name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"model config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Keys and values of one attention layer, grown in chunks to avoid a copy per token."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, nh, T, hs = k.shape
        if self.keys is None or self.offset + T > self.keys.shape[2]:
            n_new = ((T + self.step - 1) // self.step) * self.step
            grow_k = mx.zeros((B, nh, n_new, hs), dtype=k.dtype)
            grow_v = mx.zeros((B, nh, n_new, hs), dtype=v.dtype)
            if self.keys is None:
                self.keys, self.values = grow_k, grow_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], grow_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], grow_v], axis=2)
        self.keys[..., self.offset : self.offset + T, :] = k
        self.values[..., self.offset : self.offset + T, :] = v
        self.offset += T
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        q = q.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k = k.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        v = v.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, nh, T_past + T, hs)
        y = kernels.attention(q, k, v, scale=1.0 / math.sqrt(hs), causal=T > 1)  # fused where the device has it
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(kernels.gelu(self.c_fc(x)))  # GELU, tanh approximation


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int | None = None):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = [Block(config) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        # training only: recompute each block's activations in the backward pass instead of keeping them
        self.checkpoint_blocks = False
        self.init_weights(seed)

    def init_weights(self, seed: int | None = None) -> None:
        """build-nanogpt's init: N(0, 0.02), zero biases, residual projections scaled by (2L)^-0.5."""
        key = mx.random.key(seed) if seed is not None else None
        params = {}
        for name, p in self.parameters_flat():
            if name.startswith("ln") or ".ln_" in name:
                continue  # LayerNorm keeps weight 1, bias 0
            if name.endswith("bias"):
                params[name] = mx.zeros_like(p)
                continue
            std = 0.02
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
                std *= (2 * self.config.n_layer) ** -0.5
            if key is not None:
                key, sub = mx.random.split(key)
                params[name] = std * mx.random.normal(p.shape, key=sub)
            else:
                params[name] = std * mx.random.normal(p.shape)
        self.load_flat(params)

    def parameters_flat(self) -> list[tuple[str, mx.array]]:
        return tree_flatten(self.parameters())

    def load_flat(self, params: dict[str, mx.array]) -> None:
        self.update(tree_unflatten(list(params.items())))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.size for _, p in self.parameters_flat())
        return n - self.wpe.weight.size if non_embedding else n

    def __call__(self, idx: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """idx (B, T) token ids -> logits (B, T, vocab_size)."""
        return self.head(self.hidden(idx, cache))

    def head(self, h: mx.array) -> mx.array:
        """Final hidden states (..., n_embd) -> logits (..., vocab_size)."""
        return h @ self.head_weight.T

    @property
    def head_weight(self) -> mx.array:
        """The lm_head's weight (vocab_size, n_embd): tied to wte."""
        return self.wte.weight

    def hidden(self, idx: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """idx (B, T) token ids -> final hidden states (B, T, n_embd), the input of the lm_head."""
        B, T = idx.shape
        offset = cache[0].offset if cache else 0
        if offset + T > self.config.block_size:
            raise UserError(f"sequence of length {offset + T} exceeds the context of {self.config.block_size}")
        pos = mx.arange(offset, offset + T)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, n_embd)
        for i, block in enumerate(self.h):
            if self.checkpoint_blocks and cache is None:
                x = nn.utils.checkpoint(block)(x)
            else:
                x = block(x, cache[i] if cache else None)
        return self.ln_f(x)

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]
