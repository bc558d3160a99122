"""The GPT-2 model, as build-nanogpt defines it, in MLX, with the modded-nanogpt speedrun's
architecture changes as switches in GPTConfig (all off by default: plain GPT-2).

Parameter names follow Hugging Face's GPT-2 (`h.0.attn.c_attn.weight`, ...) without the
`transformer.` prefix, so converting weights is a key map plus transposes (see weights.py).
The switches keep those names: RMSNorm gains are `ln_1.weight`, an untied head is `lm_head.weight`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import device, kernels
from .errors import Overflow, UserError, check_bool, check_seed, check_types

GPT2_VOCAB_SIZE = 50257  # real tokens
PADDED_VOCAB_SIZE = 50304  # build-nanogpt's: GPT-2's padded to a multiple of 128, for faster matmuls
# the dtypes a GPT computes in (float16, whose largest value is 65504, would need loss scaling to train)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


def dtype_named(name: str | mx.Dtype) -> mx.Dtype:
    """DTYPES[name] (or the dtype itself, one of them), refused (UserError) otherwise."""
    if isinstance(name, mx.Dtype) and name in DTYPES.values():
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


_CHOICES = {"mlp": ("gelu", "relu2"), "norm": ("layernorm", "rmsnorm"), "init": ("gpt2", "speedrun")}


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # architecture switches; the defaults are GPT-2 (the speedrun recipe in recipes.py turns them on)
    rope: bool = False  # rotary position embeddings on q and k instead of the learned wpe
    rope_base: float = 10000.0  # RoPE's base period
    qk_norm: bool = False  # RMS-normalise q and k of each head (no gain) before attention
    mlp: str = "gelu"  # "gelu": GPT-2's tanh GELU; "relu2": ReLU squared
    norm: str = "layernorm"  # "layernorm" (gain and bias) or "rmsnorm" (gain only)
    embed_norm: bool = False  # normalise the token embeddings before the first block
    bias: bool = True  # biases in the linear layers
    tie_embeddings: bool = True  # the lm_head is wte; False: a separate lm_head matrix
    init: str = "gpt2"  # "gpt2": build-nanogpt's; "speedrun": zero output projections and lm_head
    logit_softcap: float = 0.0  # c > 0: logits -> c * tanh(logits / c)
    value_embeds: int = 0  # k > 0: k more token embeddings, mixed into the attention values of the first k
    # layers and again of the last k (v <- a v + b ve, a and b learned)
    unet: bool = False  # U-net skips: block L-1-j's input gets block j's output, times a learned weight

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A config from to_dict's output (e.g. JSON); fields it lacks keep GPT-2's values. A field this version
        does not know is refused (ValueError): its model would be another one; a value of another type than its
        field's too (FieldTypeError, by check_types)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"switches this version of nanogpt-mlx does not know: {', '.join(unknown)} (a newer "
                             "version wrote it?)")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def switches(self) -> dict:
        """The architecture switches that differ from GPT-2's, by name."""
        gpt2 = GPTConfig()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in SIZES and getattr(self, f.name) != getattr(gpt2, f.name)}

    def describe_switches(self) -> str:
        """`rope=True, bias=False, ...`, or `none (GPT-2)`, for messages."""
        return ", ".join(f"{k}={v}" for k, v in self.switches().items()) or "none (GPT-2)"

    def __post_init__(self):
        check_types(self)  # rope="no" was a RoPE model, n_layer=True one layer, n_embd=32.0 a TypeError deep inside
        for name in SIZES:
            check_size(name, getattr(self, name), "model config: ")
        if self.n_embd % self.n_head:
            raise UserError(f"model config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise UserError(f"model config: {name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not (math.isfinite(self.logit_softcap) and self.logit_softcap >= 0):
            raise UserError(f"model config: logit_softcap must be >= 0 (0: off), got {self.logit_softcap}")
        if not (math.isfinite(self.rope_base) and self.rope_base > 0):
            raise UserError(f"model config: rope_base must be > 0, got {self.rope_base}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise UserError(f"model config: rope needs an even head size, got {self.n_embd // self.n_head}")
        if not 0 <= self.value_embeds <= self.n_layer // 2:
            raise UserError(f"model config: value_embeds must be between 0 and n_layer // 2 = {self.n_layer // 2} "
                            f"(each feeds a first and a last layer), got {self.value_embeds}")
        if self.init == "speedrun" and self.tie_embeddings:
            raise UserError("model config: init 'speedrun' zero-initialises the lm_head, which with "
                            "tie_embeddings would zero the token embeddings too; set tie_embeddings to false")


SIZES = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # GPTConfig's sizes; the rest are switches


def check_size(name: str, value: int, where: str = "") -> None:
    """Refuse a size that MLX's 32-bit shapes cannot hold (UserError, the message starting with `where`)."""
    if not 0 < value < 2**31:
        raise UserError(f"{where}{name} must be in 1..2^31-1, got {value}")


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


class Linear(nn.Linear):
    """nn.Linear through kernels.linear: its weight gradient in the weight's layout, not a transposed view."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.linear(x, self.weight, self.get("bias"))


def checkpoint(module: nn.Module) -> Callable[..., mx.array]:
    """module(*args) with its activations recomputed in the backward pass instead of kept (activation
    checkpointing), as nn.utils.checkpoint, but in the backward's order: the recomputation waits for the output's
    gradient, and the input's gradient for the weights'. MLX orders neither: a step's graph could recompute
    every block early, or keep each one's activations for weight gradients it computes last (the optimizer's
    packed buffers ask for them in their own order), holding all blocks' activations at once as without it."""

    def call(*args: mx.array) -> mx.array:
        leaves = tree_flatten((module.trainable_parameters(), args))
        keys, n_weights = [k for k, _ in leaves], len(leaves) - len(args)

        def run(*arrays: mx.array) -> mx.array:
            params, inputs = tree_unflatten(list(zip(keys, arrays)))
            module.update(params)
            return module(*inputs)

        @mx.custom_function
        def forward(*arrays: mx.array) -> mx.array:
            return run(*arrays)

        @forward.vjp
        def backward(primals, cotangent: mx.array, _output: mx.array):
            one = isinstance(primals, mx.array)  # MLX passes a lone input bare (a module without weights)
            _, grads = mx.vjp(run, mx.depends([primals] if one else list(primals), [cotangent]), [cotangent])
            weights = grads[:n_weights]
            grads = (*weights, *mx.depends(grads[n_weights:], weights))
            return grads[0] if one else grads

        return forward(*(a for _, a in leaves))

    return call


def make_norm(config: GPTConfig) -> nn.Module:
    return nn.RMSNorm(config.n_embd, eps=1e-6) if config.norm == "rmsnorm" else nn.LayerNorm(config.n_embd, eps=1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, value_embed: bool = False):
        super().__init__()
        self.n_head = config.n_head
        self.rope, self.rope_base, self.qk_norm = config.rope, config.rope_base, config.qk_norm
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        if value_embed:
            self.ve_lambda = mx.array([0.5, 0.5])  # v <- ve_lambda[0] v + ve_lambda[1] ve (the speedrun's start)

    def __call__(self, x: mx.array, ve: mx.array | None = None, cache: KVCache | None = None) -> mx.array:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        q = q.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k = k.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        v = v.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        if ve is not None:
            v = self.ve_lambda[0] * v + self.ve_lambda[1] * ve.reshape(B, T, self.n_head, hs).transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = mx.fast.rms_norm(q, None, 1e-6), mx.fast.rms_norm(k, None, 1e-6)
        if self.rope:
            # the speedrun's rotation, y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin over the two halves, is
            # the usual one by -angle: a scale of -1 on the positions (offset included) gives it
            offset = cache.offset if cache is not None else 0
            q, k = (mx.fast.rope(a, hs, traditional=False, base=self.rope_base, scale=-1.0, offset=offset)
                    for a in (q, k))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, nh, T_past + T, hs)
        y = kernels.attention(q, k, v, scale=1.0 / math.sqrt(hs), causal=T > 1)  # fused where the device has it
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.activation = config.mlp

    def __call__(self, x: mx.array) -> mx.array:
        # the activation (GELU: the tanh approximation) and c_proj's matmul are one function: on every profile but
        # cpu-x86 (whose software GELU costs more to recompute) its backward recomputes the activation rather than
        # keeping a second 4x-wide array per layer (kernels.for_profile)
        return kernels.activation_matmul(self.activation, self.c_fc(x), self.c_proj.weight, self.c_proj.get("bias"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, value_embed: bool = False):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, value_embed)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, ve: mx.array | None = None, cache: KVCache | None = None) -> mx.array:
        x = x + self.attn(self.ln_1(x), ve, cache)
        return x + self.mlp(self.ln_2(x))


def _numpy_ids(ids, what: str) -> np.ndarray:
    """A list of token ids, nested lists or a NumPy array as a NumPy array (no copy of one)."""
    try:
        return np.asarray(ids)
    except ValueError:  # nested lists of different lengths
        raise UserError(f"{what} must be token ids of shape (B, T): its rows differ in length") from None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int | None = None):
        if not isinstance(config, GPTConfig):  # a dict was an AttributeError ('dict' has no 'vocab_size')
            raise UserError(f"config must be a GPTConfig (GPTConfig(**d) for a dict d), got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if not config.rope:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        if config.embed_norm:
            self.ln_e = make_norm(config)
        if config.value_embeds:
            self.ve = [nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.value_embeds)]
        self.h = [Block(config, self.value_embed_of(i) is not None) for i in range(config.n_layer)]
        if config.unet:
            self.skip_weights = mx.ones((config.n_layer // 2,))
        self.ln_f = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # training only: recompute each block's activations in the backward pass instead of keeping them
        self.checkpoint_blocks = False
        self.init_weights(seed)

    def init_weights(self, seed: int | None = None) -> None:
        """build-nanogpt's init: N(0, 0.02), zero biases, residual projections scaled by (2L)^-0.5.
        The speedrun's (init="speedrun"): embeddings N(0, 1), output projections and lm_head zero, other
        matrices N(0, sqrt(0.33 / fan_in)). Norm gains start at 1 and biases at 0 in both."""
        if seed is not None:
            check_seed("seed", seed)
        key = mx.random.key(seed) if seed is not None else None
        speedrun = self.config.init == "speedrun"
        params = {}
        for name, p in self.parameters_flat():
            if name.startswith("ln") or ".ln_" in name or name.endswith(("skip_weights", "ve_lambda")):
                continue  # norms keep weight 1, bias 0; the mixing weights their constructor's values
            if name.endswith("bias") or speedrun and name.endswith(("c_proj.weight", "lm_head.weight")):
                params[name] = mx.zeros_like(p)
                continue
            if speedrun:
                table = name in ("wte.weight", "wpe.weight") or name.startswith("ve.")
                std = 1.0 if table else (0.33 / p.shape[-1]) ** 0.5
            else:
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
        """All parameters; non_embedding: without the lookup tables (wpe, value embeddings, and wte when the
        head is untied)."""
        n = sum(p.size for _, p in self.parameters_flat())
        if not non_embedding:
            return n
        lookups = [self.wpe.weight] if "wpe" in self else []
        lookups += [table.weight for table in self.get("ve", [])]
        lookups += [] if self.config.tie_embeddings else [self.wte.weight]
        return n - sum(w.size for w in lookups)

    def grow_vocab(self, vocab_size: int) -> GPT:
        """This model with vocab_size rows in every table indexed by token (the embedding, an untied head, the
        value embeddings), new rows = each table's mean row: the new tokens' logits start at the average logit
        instead of dominating the softmax (nanoGPT's crop_block_size is the like surgery on the context)."""
        n = self.config.vocab_size
        if vocab_size < n:
            raise UserError(f"vocab_size {vocab_size} is smaller than the source model's {n}")
        if vocab_size == n:
            return self
        grown = GPT(replace(self.config, vocab_size=vocab_size), seed=0)
        params = dict(self.parameters_flat())
        tables = ["wte.weight", "lm_head.weight"] + [f"ve.{j}.weight" for j in range(self.config.value_embeds)]
        for name in (t for t in tables if t in params):  # (lm_head only where untied)
            old = params[name]
            params[name] = mx.concatenate([old, mx.broadcast_to(old.mean(0), (vocab_size - n, old.shape[1]))])
        grown.load_flat(params)
        return grown

    def __call__(self, idx: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """idx (B, T) token ids (an MLX or NumPy array, or lists) -> logits (B, T, vocab_size); ids outside the vocab
        are refused (check_token_ids). `cache`: make_cache()'s, which the forward fills."""
        if cache is not None and not isinstance(cache, (list, tuple, KVCache)):
            raise UserError("a GPT's second argument is a KV cache (make_cache()): for build-nanogpt's `logits, loss = "
                            "model(x, y)` take model(x) and model.loss(x, y)")
        idx = self.token_array(idx, "the input")
        if cache is not None:
            self._check_cache(cache, idx.shape[0])
        return self.head(self.hidden(idx, cache))

    def _check_cache(self, cache: list[KVCache], rows: int) -> None:
        """Refuse a cache that is not make_cache()'s for this model and batch: MLX's broadcast error, or an
        IndexError, deep inside."""
        if not (isinstance(cache, (list, tuple)) and all(isinstance(c, KVCache) for c in cache)):
            raise UserError("the cache must be make_cache()'s list, a KVCache for each layer")
        c = self.config
        if len(cache) != c.n_layer:
            raise UserError(f"the cache holds {len(cache)} layers' KVCaches, this model has {c.n_layer} layers: "
                            "take its make_cache()")
        held = cache[0].keys
        if held is not None and held.shape[1::2] != (c.n_head, c.n_embd // c.n_head):
            raise UserError(f"the cache holds keys of {held.shape[1]} heads of {held.shape[3]}, this model's are "
                            f"{c.n_head} of {c.n_embd // c.n_head}: take its make_cache()")
        if held is not None and held.shape[0] != rows:
            raise UserError(f"the cache holds {held.shape[0]} rows, the input {rows}: a cache serves the batch it "
                            "began with (make_cache() for another)")

    def token_array(self, ids, what: str) -> mx.array:
        """`ids` as an MLX array of shape (B, T), checked (check_token_ids)."""
        ids = ids if isinstance(ids, mx.array) else _numpy_ids(ids, what)
        self.check_token_ids(ids, what)
        if ids.ndim != 2 or ids.size == 0:  # (one row failed as a tuple's unpacking deep inside, none in a max)
            raise UserError(f"{what} must be token ids of shape (B, T), B and T >= 1, got shape {tuple(ids.shape)}")
        return ids if isinstance(ids, mx.array) else mx.array(ids)

    def head(self, h: mx.array) -> mx.array:
        """Final hidden states (..., n_embd) -> logits (..., vocab_size), soft-capped if the config says so."""
        logits = h @ self.head_weight.T
        cap = self.config.logit_softcap
        return cap * mx.tanh(logits / cap) if cap else logits

    def check_token_ids(self, ids: list[int] | mx.array, what: str) -> None:
        """Refuse token ids the embedding has no row for: MLX's gather reads out of bounds without checking (a crash,
        or numbers from other memory). An MLX array's range is read back, a sync, except where it has no values yet:
        inside mx.compile or vmap (the Trainer's compiled step, whose DataLoader checked its shards) it is unchecked."""
        if isinstance(ids, mx.array):
            if not mx.issubdtype(ids.dtype, mx.integer):  # (known without values: inside mx.compile too)
                raise UserError(f"{what} must hold integer token ids, got {device.dtype_name(ids.dtype)}")
            if ids.size == 0:
                return
            try:
                ids = mx.stack([ids.min(), ids.max()]).tolist()
            except ValueError:  # traced: MLX refuses to evaluate inside a function transformation
                return
        else:  # a list (a prompt's), nested lists, a NumPy array
            ids = _numpy_ids(ids, what)
            if ids.size and ids.dtype.kind not in "iu":
                raise UserError(f"{what} must hold integer token ids, got {ids.dtype}")
            ids = [int(ids.min()), int(ids.max())] if ids.size else []
        bad = next((i for i in (max(ids, default=0), min(ids, default=0)) if not 0 <= i < self.config.vocab_size), None)
        if bad is not None:
            raise UserError(f"{what}: token id {bad} is outside the model's vocab_size of {self.config.vocab_size} "
                            f"(GPT-2's tokenizer needs {GPT2_VOCAB_SIZE})")

    @property
    def head_weight(self) -> mx.array:
        """The lm_head's weight (vocab_size, n_embd): wte's when tied."""
        return self.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    def hidden(self, idx: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """idx (B, T) token ids -> final hidden states (B, T, n_embd), the input of the lm_head. The ids are not
        checked (the decode loop's sampled tokens are the vocab's): an id outside it reads out of bounds."""
        B, T = idx.shape
        offset = cache[0].offset if cache else 0
        if offset + T > self.config.block_size:
            raise UserError(f"sequence of length {offset + T} exceeds the context of {self.config.block_size}")
        x = self.wte(idx)  # (B, T, n_embd)
        if not self.config.rope:
            x = x + self.wpe(mx.arange(offset, offset + T))
        if self.config.embed_norm:
            x = self.ln_e(x)
        ves = [table(idx) for table in self.get("ve", [])]
        L, skips = self.config.n_layer, []
        first_skipped = L - L // 2 if self.config.unet else L  # the U-net's second half
        for i, block in enumerate(self.h):
            if i >= first_skipped:
                x = x + self.skip_weights[i - first_skipped] * skips.pop()  # block L-1-j gets block j's output
            j = self.value_embed_of(i)
            args = (x,) if j is None else (x, ves[j])
            if self.checkpoint_blocks and cache is None:
                x = checkpoint(block)(*args)
            else:
                x = block(*args, cache=cache[i] if cache else None)
            if i < L - first_skipped:
                skips.append(x)
        return self.ln_f(x)

    def loss(self, idx: mx.array, targets: mx.array, grad: bool = True) -> mx.array:
        """Mean next-token cross-entropy in float32 through the device's fused head + loss (kernels.py), without
        (B, T, V) logits; grad=False: the evaluation kernel, which keeps nothing for a backward. Every target is
        scored (no ignore_index, as PyTorch's -100): ids and targets outside the vocab are refused (check_token_ids).
        First-order only: its gradient is computed with its value, so a second derivative (a Hessian-vector product)
        through it is wrong; nn.losses.cross_entropy(self(idx).astype(mx.float32), targets).mean() is the same loss
        for those."""
        check_bool("grad", grad)  # "no" was the training kernel
        idx, targets = self.token_array(idx, "the input"), self.token_array(targets, "the targets")
        if targets.shape != idx.shape:
            raise UserError(f"the targets' shape {tuple(targets.shape)} is not the input's {tuple(idx.shape)}")
        loss = kernels.cross_entropy if grad else kernels.eval_cross_entropy
        return loss(self.hidden(idx), self.head_weight, targets, self.config.logit_softcap)

    def value_embed_of(self, layer: int) -> int | None:
        """The value embedding that feeds `layer`, or None: table j feeds layers j and L - k + j."""
        k, L = self.config.value_embeds, self.config.n_layer
        return layer if layer < k else layer - (L - k) if layer >= L - k else None

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.h]

    def overflowed(self, where: str) -> Overflow:
        """The error of logits that came out NaN or inf `where`: weights whose activations overflow (a diverged
        run's, or a damaged file's), which would give sampled garbage and NaN scores."""
        return Overflow(f"the model's logits are NaN/inf {where}: its activations overflow (a diverged or damaged "
                        "model)")


def check_gpt(model) -> None:
    """Refuse (UserError) anything but a GPT where one is needed: a path given for it was an AttributeError deep
    inside."""
    if not isinstance(model, GPT):
        raise UserError(f"a GPT model is needed (load one with weights.load_model), got {model!r}")
