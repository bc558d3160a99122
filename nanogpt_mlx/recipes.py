"""Training recipes as data: which model, optimizer and schedule a run uses.

A recipe is the model switches (GPTConfig), the optimizer over the model's parameters, how the
learning rates (and Muon's momentum) move with the step, and the TrainConfig values it needs
unless the user sets them. The trainer asks its recipe for these and does not know either one.

- `build-nanogpt`: GPT-2 as build-nanogpt trains it: AdamW (decay on >= 2-D tensors), linear
  warmup then cosine to min_lr, gradients clipped at 1.0. The default. Each group's tensors are packed
  into a few flat buckets (optim.Packing), so clipping and AdamW run over 14 arrays, not 148 tensors (GPT-2).
- `speedrun`: the modded-nanogpt speedrun's changes: RoPE, QK RMS-norm, ReLU², RMSNorm, no linear
  biases, an untied zero-initialised head, zero-init output projections, a logit soft-cap; Muon for the
  blocks' matrices (q, k and v each their own), AdamW with their own LRs for the embeddings, the head
  and the gains; warmup-stable-decay; no clipping. The optimizer settings, the LRs, the step count and the init
  are those of records/track_3_optimization/train_gpt_simple.py at commit 2ec1cfc4 (2026-05-03; later commits
  tuned them again): Muon 0.025 with decay 0.025; AdamW 0.3 / 1/320 / 0.01, betas (0.8, 0.95), eps 1e-10, no
  decay; cooldown over the last 70%. Two parts come from the main records (train_gpt.py) instead, where that file
  keeps Muon's momentum at 0.95 and iterates Newton–Schulz 12 times with (2, -1.5, 0.5): the momentum warm-up from
  0.85 and Keller Jordan's quintic Newton–Schulz, 5 steps of (3.4445, -4.7750, 2.0315) (optim.NS_COEFFICIENTS),
  which leaves singular values in ~[0.7, 1.2] rather than at 1. The architecture is not one record's either: it
  takes forms of the main records where that file differs: c * tanh(logits / c) with c = 15 (not its algebraic
  cap; the records that have it halve RoPE at base 1024), no biases (it keeps zero-init ones), RoPE over the whole
  head at base 10000 (the records before the soft-cap's; not half-truncated at base 1024) and attention scaled by
  1/sqrt(head size) (not 0.12). The speedrun's value embeddings and U-net skips are model switches
  (GPTConfig.value_embeds, unet) left off: at the Shakespeare scale they did not measurably help
  (benchmarks/bench_recipes.py --ablate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.optimizers as optim

from .errors import UserError
from .memory import OptimizerMemory
from .model import GPTConfig
from .optim import AdamW, Muon, build_nanogpt_adamw, cosine_lr, decay_group, muon_momentum, wsd_lr

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    model: dict[str, Any]  # GPTConfig switches of the models it trains
    defaults: dict[str, Any]  # TrainConfig values it sets when a run switches to it (flags still override)
    own: tuple[str, ...]  # the TrainConfig fields that this recipe reads and the other ones do not
    make_optimizer: Callable[[TrainConfig, mx.Dtype], optim.Optimizer]  # (config, compute dtype)
    pack: Callable[[str, mx.array], str] | None  # the optimizer's packing groups (optim.Packing), None: per tensor
    lr: Callable[[int, TrainConfig], float]  # the main group's LR at a step (logged)
    set_step: Callable[[optim.Optimizer, int, TrainConfig], None]  # every group's LR (and momentum) at a step
    memory: Callable[[GPTConfig], OptimizerMemory]  # what its optimizer holds, for memory.estimate

    def check_model(self, config: GPTConfig, source: str) -> None:
        """Refuse to continue or fine-tune a model whose switches are not this recipe's."""
        ours = GPTConfig(**self.model)
        if config.switches() != ours.switches():
            match = next((r.name for r in RECIPES.values() if GPTConfig(**r.model).switches() == config.switches()), "")
            fix = f"choose --recipe {match}" if match else "no recipe trains such a model (sample and eval read it)"
            raise UserError(f"{source}: its model switches ({config.describe_switches()}) are not the {self.name} "
                            f"recipe's ({ours.describe_switches()}); {fix}")


# ------------------------------------------------------------------------------- build-nanogpt
def _nanogpt_optimizer(cfg: TrainConfig, dtype: mx.Dtype) -> optim.Optimizer:
    return build_nanogpt_adamw(cfg.max_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)


def _nanogpt_lr(step: int, cfg: TrainConfig) -> float:
    return cosine_lr(step, cfg.max_lr, cfg.final_lr, cfg.warmup_steps, cfg.max_steps)


def _nanogpt_set_step(optimizer: optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    optimizer.learning_rate = _nanogpt_lr(step, cfg)


BUILD_NANOGPT = Recipe(
    name="build-nanogpt",
    summary="GPT-2 with AdamW, warmup + cosine, clipping at 1.0 (build-nanogpt's train_gpt2.py)",
    model={},
    defaults=dict(max_lr=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0),
    own=("min_lr_ratio", "min_lr"),
    make_optimizer=_nanogpt_optimizer, pack=decay_group, lr=_nanogpt_lr, set_step=_nanogpt_set_step,
    memory=lambda config: OptimizerMemory())


# ------------------------------------------------------------------------------------ speedrun
# parameter groups, in MultiOptimizer's order (the first matching filter wins; the last takes the rest)
_SPEEDRUN_GROUPS: list[tuple[str, Callable[[str, mx.array], bool]]] = [
    ("qkv", lambda path, p: path.endswith("attn.c_attn.weight")),  # Muon, q, k and v separately
    ("hidden", lambda path, p: path.startswith("h.") and p.ndim == 2),  # Muon
    ("embed", lambda path, p: path in ("wte.weight", "wpe.weight") or path.startswith("ve.")),  # AdamW at embed_lr
    ("head", lambda path, p: path == "lm_head.weight"),  # AdamW at head_lr
]  # the rest (norm gains, any biases): AdamW at scalar_lr


def _speedrun_base_lrs(cfg: TrainConfig) -> list[float]:
    return [cfg.max_lr, cfg.max_lr, cfg.embed_lr, cfg.head_lr, cfg.scalar_lr]


def _speedrun_optimizer(cfg: TrainConfig, dtype: mx.Dtype) -> optim.Optimizer:
    # Newton–Schulz runs in the compute dtype: bfloat16 on GPUs, float32 on CPUs (their fast paths)
    muon = partial(Muon, momentum=muon_momentum(0, cfg.momentum_warmup), weight_decay=cfg.weight_decay, ns_dtype=dtype)
    adamw = partial(AdamW, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps, weight_decay=0.0)
    lrs = _speedrun_base_lrs(cfg)
    optimizers = [muon(lrs[0], splits=3), muon(lrs[1])] + [adamw(learning_rate=lr) for lr in lrs[2:]]
    return optim.MultiOptimizer(optimizers, [f for _, f in _SPEEDRUN_GROUPS])


def _speedrun_factor(step: int, cfg: TrainConfig) -> float:
    return wsd_lr(step, 1.0, cfg.warmup_steps, cfg.max_steps, cfg.cooldown_frac)


def _speedrun_lr(step: int, cfg: TrainConfig) -> float:
    return cfg.max_lr * _speedrun_factor(step, cfg)


def _speedrun_set_step(optimizer: optim.Optimizer, step: int, cfg: TrainConfig) -> None:
    factor = _speedrun_factor(step, cfg)
    for opt, base in zip(optimizer.optimizers, _speedrun_base_lrs(cfg)):
        opt.learning_rate = base * factor
        if isinstance(opt, Muon):
            opt.momentum = muon_momentum(step, cfg.momentum_warmup)


SPEEDRUN = Recipe(
    name="speedrun",
    summary="modded-nanogpt's: RoPE, QK-norm, ReLU², RMSNorm, untied zero-init head, soft-cap; Muon + AdamW, "
            "warmup-stable-decay",
    model=dict(rope=True, qk_norm=True, mlp="relu2", norm="rmsnorm", embed_norm=True, bias=False,
               tie_embeddings=False, init="speedrun", logit_softcap=15.0),
    # Muon at max_lr with decoupled weight decay; the AdamW groups use betas (0.8, 0.95), eps 1e-10, no decay
    defaults=dict(max_lr=0.025, weight_decay=0.025, beta1=0.8, beta2=0.95, eps=1e-10, grad_clip=0.0, warmup_steps=0),
    own=("embed_lr", "head_lr", "scalar_lr", "cooldown_frac", "momentum_warmup"),
    make_optimizer=_speedrun_optimizer, pack=None, lr=_speedrun_lr, set_step=_speedrun_set_step,
    # Muon's one moment for the blocks' matrices (no biases); its update holds Newton-Schulz's iterates too
    memory=lambda config: OptimizerMemory(one_moment=12 * config.n_layer * config.n_embd ** 2, update_bytes=13))


RECIPES = {r.name: r for r in (BUILD_NANOGPT, SPEEDRUN)}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]
