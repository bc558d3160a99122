"""What defines a training run: TrainConfig (every field with its help text, shown by `nanogpt-mlx train --help`),
the named presets, the main LR at a step (get_lr), and the config a run resumes with (resume_config) and what it
changed (resumed)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from . import checkpoint, recipes
from .errors import FieldTypeError, UserError, check_fields, check_seed, check_types
from .files import named_dir, user_path
from .model import DTYPES, PADDED_VOCAB_SIZE, SIZES, GPTConfig, check_size


def _field(default, help: str):
    """A TrainConfig field with its help text (`nanogpt-mlx train --help` shows it)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; the defaults are build-nanogpt's GPT-2 124M run. For another
    recipe start from a preset, e.g. TrainConfig.preset("gpt2-124m", recipe="speedrun"): switching
    recipe there also takes the recipe's optimizer defaults (max_lr, betas, ...)."""

    recipe: str = _field("build-nanogpt", "model + optimizer + schedule (recipes.py): " + "; ".join(
        f"{r.name}, {r.summary}" for r in recipes.RECIPES.values()) + ". --recipe brings the recipe's optimizer "
        "defaults, as TrainConfig.preset(NAME, recipe=...) does; TrainConfig(recipe=...) or replace() keep those held")
    data: str = _field("data/edu_fineweb10B", "directory of token shards (`nanogpt-mlx prepare`)")
    out: str = _field("out/gpt2-124m", "directory of the checkpoints, log.txt and log.jsonl (metrics, samples)")
    init_from: str = _field("", "'': random init; else a hub id (gpt2), Hugging Face directory or checkpoint "
                                "directory to fine-tune from")
    # model (random init only; with init_from the source's shape is kept: train warns of one set by hand)
    n_layer: int = _field(12, "transformer blocks")
    n_head: int = _field(12, "attention heads per block")
    n_embd: int = _field(768, "width of the residual stream")
    block_size: int = _field(1024, "context length of the model (the position table's size)")
    vocab_size: int = _field(0, "0: 50304 (GPT-2's 50257 padded to a multiple of 128), or the source's vocab")
    # batch
    batch_size: int = _field(16, "micro-batch B per rank")
    seq_len: int = _field(1024, "tokens per row, T (at most block_size)")
    total_batch_size: int = _field(524288, "tokens per optimizer step (2**19), reached by gradient accumulation")
    shuffle: bool = _field(False, "permute the batch order within each shard (seeded)")
    # optimizer and schedule
    max_lr: float = _field(6e-4, "peak LR: AdamW's (build-nanogpt), Muon's for the blocks' matrices (speedrun)")
    min_lr_ratio: float = _field(0.1, "build-nanogpt: the cosine ends at max_lr * min_lr_ratio ...")
    min_lr: float | None = _field(None, "build-nanogpt: ... or at this absolute LR (its min_lr, 6e-5), if given")
    warmup_steps: int = _field(715, "steps of linear LR warmup from 0")
    max_steps: int = _field(19073, "optimizer steps of the run (the schedule's length)")
    weight_decay: float = _field(0.1, "decoupled weight decay of the matrices (AdamW's, or Muon's)")
    beta1: float = _field(0.9, "Adam's first-moment decay")
    beta2: float = _field(0.95, "Adam's second-moment decay")
    eps: float = _field(1e-8, "Adam's epsilon (> 0: a weight whose gradient is exactly 0 would get 0 / 0)")
    grad_clip: float = _field(1.0, "clip the gradients' global norm to this; 0 disables (the norm is still logged)")
    # the speedrun recipe only: its AdamW groups' LRs and warmup-stable-decay schedule
    embed_lr: float = _field(0.3, "speedrun: LR of the token (and value) embeddings")
    head_lr: float = _field(1 / 320, "speedrun: LR of the untied lm_head")
    scalar_lr: float = _field(0.01, "speedrun: LR of norm gains and other non-matrix parameters")
    cooldown_frac: float = _field(0.7, "speedrun: the LRs fall linearly to 0 over this last fraction of max_steps")
    momentum_warmup: int = _field(300, "speedrun: Muon's momentum rises from 0.85 to 0.95 over these steps")
    seed: int = _field(1337, "seed of the init, the shuffle and the samples")
    dtype: str = _field("", "compute dtype, float32 or bfloat16 (float32 master weights and optimizer state); "
                            "'': the device's (bfloat16 on GPUs, float32 on CPUs)")
    compile: bool = _field(True, "compile the training step and the validation loss (mx.compile)")
    threads: int = _field(0, "threads that split each micro-batch's rows, each computing its share's forward and "
                             "backward on an MLX stream of its own (batch_size must divide by it); 0: the device's "
                             "choice, on a CPU for n_embd <= 512 the greatest common divisor of its BLAS threads "
                             "and batch_size, and else 1; 1 on a GPU")
    activation_checkpointing: bool = _field(False, "recompute each block in the backward pass: less memory, "
                                                   "~1/3 more compute")
    max_memory: float = _field(0.0, "GB the run (each rank) may use: refuse to start if the estimated peak exceeds "
                                    "it, and cap MLX's allocations there (MLX waits for queued work to free memory "
                                    "first); 0: the device's memory (with --ranks N, a 1/N share)")
    cap_memory: bool = _field(False, "run the first step op by op to measure what a step needs, then cap MLX's "
                                     "memory 25% above that: a lower peak where MLX holds buffers of work queued "
                                     "ahead, for a slower first step")
    # evaluation, samples, checkpoints (0 disables; each also runs at the last step)
    val_every: int = _field(250, "steps between validation losses (0: never)")
    val_steps: int = _field(20, "micro-batches per validation loss and rank, as build-nanogpt counts them (at "
                                "most one pass over the val split)")
    sample_every: int = _field(250, "steps between printed samples (0: never)")
    num_samples: int = _field(4, "samples each time")
    sample_tokens: int = _field(32, "new tokens per sample")
    prompt: str = _field("Hello, I'm a language model,",
                         "prompt of the samples (its end, if it and the new tokens exceed the context)")
    hellaswag_every: int = _field(250, "steps between HellaSwag acc_norm scores, logged as `{step} hella {acc}` "
                                       "(0: never)")
    hellaswag_data: str = _field("", "local hellaswag_val.jsonl; '': download once into the cache")
    hellaswag_limit: int = _field(0, "score only the first N examples (0: all 10,042)")
    checkpoint_every: int = _field(5000, f"steps between checkpoints (0: only at the end and on Ctrl-C); the latest "
                                         f"{checkpoint.KEEP} are kept, OUT/model.safetensors is the last")

    def __post_init__(self):
        for name in PATH_FIELDS:  # a Path too, kept as a str: asdict and JSON take it
            given = getattr(self, name)
            if not isinstance(value := os.fspath(given) if isinstance(given, os.PathLike) else given, str):
                raise FieldTypeError(f"{name} must be a str or path, got {given!r}")
            object.__setattr__(self, name, value)
        check_types(self)
        check_seed("seed", self.seed)  # before the loop, whose ">= 0" would say half of the range
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type.startswith("float") and v is not None and not math.isfinite(v):
                raise UserError(f"{f.name} must be a finite number, got {v}")
            if f.name in SHAPE_FIELDS:  # GPTConfig's range, said alike for 0 and -1 (">= 0" for -1, then 0 refused)
                check_size(f.name, v)
                continue
            positive = f.name in _POSITIVE
            if f.name != "cooldown_frac" and f.type.startswith(("int", "float")) and v is not None and \
                    (v <= 0 if positive else v < 0):  # (cooldown_frac's range is said below)
                raise UserError(f"{f.name} must be {'>' if positive else '>='} 0, got {v}")
        if self.sample_every and self.num_samples and not self.sample_tokens:  # (SampleConfig's max_new_tokens)
            raise UserError("sample_tokens must be > 0 where samples are taken, got 0 (sample_every 0 or num_samples 0 "
                            "turns them off)")
        if not self.out or not self.data:  # "" would be the current directory
            raise UserError(f"{'out' if not self.out else 'data'} must name a directory, got ''")
        if self.max_memory and self.max_memory >= 1e6:  # MLX's limit is a size_t of bytes
            raise UserError(f"max_memory is in GB: {self.max_memory:g} GB is beyond any machine")
        if self.dtype and self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)} (or empty for the device's), got {self.dtype!r}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise UserError(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        # the cosine "decays" to its end: one above max_lr would raise the LR instead
        if self.min_lr_ratio > 1:
            raise UserError(f"min_lr_ratio must be at most 1 (the cosine ends at max_lr * min_lr_ratio), got "
                            f"{self.min_lr_ratio}")
        if self.min_lr is not None and self.min_lr > self.max_lr:
            raise UserError(f"min_lr {self.min_lr:g} exceeds max_lr {self.max_lr:g}: the cosine decays from max_lr to "
                            "min_lr")
        if not 0 < self.cooldown_frac <= 1:
            raise UserError(f"cooldown_frac must be in (0, 1], got {self.cooldown_frac}")
        recipes.get(self.recipe)  # an unknown recipe is refused here

    @classmethod
    def preset(cls, name: str, **overrides) -> "TrainConfig":
        """A named preset with `overrides`; a different `recipe` among them brings that recipe's defaults."""
        if name not in PRESETS:
            raise UserError(f"unknown training preset {name!r}; choose from {', '.join(PRESETS)}")
        check_fields(TrainConfig, overrides)
        base = PRESETS[name]
        recipe = overrides.get("recipe", base.recipe)
        recipes.get(recipe)  # an unknown one is said so first
        # a fine-tuning preset's LR and schedule are for its recipe's optimizer alone
        if recipe != base.recipe and base.init_from and overrides.get("init_from", base.init_from):
            raise UserError(f"preset {name!r} fine-tunes with the {base.recipe} recipe; the {recipe} recipe has no "
                            f"fine-tuning preset: choose its settings (--recipe {recipe} --init-from DIR, a {recipe} "
                            "model's checkpoint, --max-lr ... --max-steps ...)")
        if recipe != base.recipe:
            origin = PRESETS.get(ORIGINS.get(name, ""))
            # back to the preset it was made from: its own values (a warmup, say) are no recipe's defaults
            base = origin if origin and origin.recipe == recipe else _with_recipe(base, recipes.get(recipe))
        return replace(base, **overrides)

    @property
    def final_lr(self) -> float:
        """Where the cosine ends: min_lr if given, else max_lr * min_lr_ratio."""
        return self.min_lr if self.min_lr is not None else self.max_lr * self.min_lr_ratio


PATH_FIELDS = ("data", "out", "init_from", "hellaswag_data")  # a str or os.PathLike, stored as a str
SHAPE_FIELDS = tuple(s for s in SIZES if s != "vocab_size")  # a random init's; init_from trains its source's
_POSITIVE = ("batch_size", "seq_len", "total_batch_size", "max_steps", "max_lr", "val_steps", "eps")  # 0 is no value


def _with_recipe(preset: TrainConfig, recipe: recipes.Recipe, **changes) -> TrainConfig:
    return replace(preset, recipe=recipe.name, **{**recipe.defaults, **changes})


PRESETS = {
    "gpt2-124m": TrainConfig(),
    # minutes on a CPU (the README has measured times): a small GPT over Tiny Shakespeare's GPT-2 tokens
    "shakespeare": TrainConfig(
        data="data/shakespeare", out="out/shakespeare", n_layer=4, n_head=4, n_embd=256, block_size=256,
        batch_size=16, seq_len=128, total_batch_size=2048, max_lr=1e-3, warmup_steps=20, max_steps=200,
        val_every=50, val_steps=8, sample_every=100, num_samples=2, sample_tokens=48, prompt="ROMEO:",
        hellaswag_every=0, checkpoint_every=100),
    # nanoGPT's config/finetune_shakespeare.py (from gpt2-xl there): 20 steps of 32 rows of 1024 tokens at a constant
    # 3e-5, evaluated every 5, saved at the end; --init-from and --data fine-tune another model on other text
    "finetune-shakespeare": TrainConfig(
        data="data/shakespeare", out="out/finetune-shakespeare", init_from="gpt2", batch_size=4,
        total_batch_size=32 * 1024, max_lr=3e-5, min_lr_ratio=1.0, warmup_steps=0, max_steps=20, val_every=5,
        val_steps=8, sample_every=20, num_samples=2, sample_tokens=64, prompt="ROMEO:", hellaswag_every=0,
        checkpoint_every=0),
}
ORIGINS: dict[str, str] = {}  # preset -> the preset it was made from by switching recipe


def _derive(name: str, origin: str, recipe: recipes.Recipe, **changes) -> None:
    """PRESETS[name]: preset `origin` switched to `recipe`, with `changes`; switched back, it is `origin` again."""
    PRESETS[name] = _with_recipe(PRESETS[origin], recipe, **changes)
    ORIGINS[name] = origin


# the speedrun recipe: train_gpt_simple.py's 3375 steps of 2**19 tokens, with its 6 heads of 128 (on FineWeb-Edu here,
# plain FineWeb there), and the Shakespeare run with the LRs benchmarks/bench_recipes.py's sweep found best
_derive("speedrun-124m", "gpt2-124m", recipes.SPEEDRUN, out="out/speedrun-124m", n_head=6, max_steps=3375,
        val_every=125)
_derive("shakespeare-speedrun", "shakespeare", recipes.SPEEDRUN, out="out/shakespeare-speedrun", momentum_warmup=50,
        max_lr=0.05, embed_lr=0.6, head_lr=0.00625, scalar_lr=0.02)  # 2x the speedrun's LRs


def unread(cfg: TrainConfig) -> str:
    """A note of the fields of `cfg` that only another recipe reads, where they are not TrainConfig's defaults:
    set for a run they do not change (--min-lr under the speedrun recipe, --head-lr under build-nanogpt's); ''
    where there are none."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    said = []
    for other in (r for r in recipes.RECIPES.values() if r.name != cfg.recipe):
        if given := [f"{k} {getattr(cfg, k)!r}" for k in other.own if getattr(cfg, k) != defaults[k]]:
            said.append(f"{', '.join(given)} (the {other.name} recipe's)")
    return f"the {cfg.recipe} recipe does not read {'; '.join(said)}" if said else ""


def foreign_defaults(cfg: TrainConfig) -> str:
    """A note where `cfg` holds another recipe's optimizer defaults in most of the fields where the two recipes'
    defaults differ: a config made for that recipe and switched by `recipe=` alone
    (TrainConfig(recipe="speedrun"), dataclasses.replace), which trains Muon at AdamW's LR, clipped; '' otherwise."""
    ours = recipes.get(cfg.recipe).defaults
    for other in (r for r in recipes.RECIPES.values() if r.name != cfg.recipe):
        differ = [k for k in ours.keys() & other.defaults.keys() if ours[k] != other.defaults[k]]
        theirs = [k for k in sorted(differ) if getattr(cfg, k) == other.defaults[k]]
        if 2 * len(theirs) > len(differ):
            return (f"the {cfg.recipe} recipe runs with the {other.name} recipe's "
                    f"{', '.join(f'{k} {getattr(cfg, k):g}' for k in theirs)}, not its own "
                    f"{', '.join(f'{k} {ours[k]:g}' for k in theirs)}: a config switched by its recipe alone keeps "
                    f"them (TrainConfig.preset(NAME, recipe={cfg.recipe!r}) takes the recipe's, as --recipe does)")
    return ""


def check_total_batch(cfg: TrainConfig, world: int, resuming: bool = False) -> None:
    """Refuse a total_batch_size that micro-batches on `world` ranks do not make up (advising, when resuming, only
    what a resumed run may change)."""
    per_micro = cfg.batch_size * cfg.seq_len * world
    if cfg.total_batch_size % per_micro:
        fits = None if resuming else next((b for b in range(cfg.batch_size, 0, -1)
                                           if cfg.total_batch_size % (b * cfg.seq_len * world) == 0), None)
        instead = (f"--batch-size {fits} or " if fits else "") + \
            f"--total-batch-size {-(-cfg.total_batch_size // per_micro) * per_micro}"
        raise UserError(f"total_batch_size {cfg.total_batch_size} is not divisible by batch_size * seq_len"
                        f" * ranks = {cfg.batch_size} * {cfg.seq_len} * {world} = {per_micro}; use {instead}")


def get_lr(step: int, cfg: TrainConfig) -> float:
    """The LR of the recipe's main group at `step` (build-nanogpt: warmup, then cosine to min_lr)."""
    return recipes.get(cfg.recipe).lr(step, cfg)


MODEL_FIELDS = ("init_from", *SIZES)  # the checkpoint's on resume


def model_config(cfg: TrainConfig) -> GPTConfig:
    """The GPTConfig of the model that a run of `cfg` initializes at random (its shape, vocab and recipe's switches);
    a run with init_from or resumed trains its source's or checkpoint's model instead."""
    return GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size or PADDED_VOCAB_SIZE, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, **recipes.get(cfg.recipe).model)


def ignored_shape(cfg: TrainConfig, source: object) -> list[str]:
    """The shape fields of an init_from run's `cfg` that differ from those of its `source` model's config, where
    they differ from the preset nearest cfg's shape: set by hand, which the source's shape overrides. A preset's shape
    (TrainConfig()'s too) comes with every config made from it, asked for or not: it is no sign of a size meant for
    this run (TrainConfig(init_from=X, n_layer=3) sets n_layer alone)."""
    shape = {k: getattr(cfg, k) for k in SHAPE_FIELDS}
    nearest = max(PRESETS.values(), key=lambda p: sum(getattr(p, k) == v for k, v in shape.items()))
    return [f"{k} {v} (the source's {getattr(source, k)})" for k, v in shape.items()
            if v != getattr(nearest, k) and v != getattr(source, k)]


def refuse_model_changes(where: object, kept: object, asked: dict, fix: str) -> None:
    """A resumed run keeps its model: refuse the model fields of `asked` (name -> value) that differ from those
    of `kept` (a config), saying `fix`."""
    changed = [f"{k} {getattr(kept, k)!r} (not {v!r})" for k, v in asked.items()
               if k in MODEL_FIELDS and v != getattr(kept, k)]
    if changed:
        raise UserError(f"a resumed run keeps its model: {where} has {', '.join(changed)}; {fix}")


def resume_config(out: str | os.PathLike, **overrides) -> TrainConfig:
    """The config saved with a run's latest checkpoint in `out` (a leading `~` expanded, and so its `out`), with
    `overrides` applied; the model's fields are the checkpoint's (changing them is refused; 0 or '', their defaults,
    keep the checkpoint's). Overriding one of min_lr / min_lr_ratio drops the saved other, which would otherwise
    decide or be ignored."""
    check_fields(TrainConfig, overrides)
    out = user_path(named_dir(out, "run directory"))
    overrides = {k: v for k, v in overrides.items() if v or k not in MODEL_FIELDS}
    ckpt = checkpoint.latest_checkpoint(out)
    config = checkpoint.read_state(ckpt)["config"]
    unknown = sorted(set(config) - {f.name for f in fields(TrainConfig)})
    if unknown:  # every checkpoint of the run has them: not a damaged one
        raise UserError(f"{ckpt}/{checkpoint.STATE_FILE}: config fields this version of nanogpt-mlx does not know: "
                        f"{', '.join(unknown)} (a newer version wrote it?)")
    try:
        saved = TrainConfig(**config)
    except (TypeError, FieldTypeError) as e:
        raise checkpoint.damaged(ckpt, f"{checkpoint.STATE_FILE}: config not understood ({e})") from None
    except UserError as e:  # a value this version refuses (a recipe it lacks) in every checkpoint of the run
        raise UserError(f"{ckpt}/{checkpoint.STATE_FILE}: {e} (a newer version wrote it?)") from None
    refuse_model_changes(out, saved, overrides, "drop those options")
    if "min_lr_ratio" in overrides:
        saved = replace(saved, min_lr=None)
    return replace(saved, out=str(out), **overrides)


def resumed(ckpt: Path, state: dict, cfg: TrainConfig) -> dict:
    """What a run resumed from checkpoint `ckpt` (its trainer `state`) with config `cfg` continues from: the
    checkpoint, the config fields changed since it was saved ([saved, now]) and, with a changed schedule (a longer
    max_steps), the LR at its step by the new one and by the checkpoint's (at its last step, where it had ended)."""
    saved, now, step = state["config"], asdict(cfg), state["step"]
    changed = {k: [saved.get(k), v] for k, v in now.items() if k != "out" and not _same(k, saved.get(k, v), v)}
    result = {"checkpoint": str(ckpt), "changed": changed}
    if not changed or step >= cfg.max_steps:  # the same schedule, or no step to train
        return result
    try:
        before = replace(cfg, **{k: old for k, (old, _) in changed.items()})
    except (TypeError, UserError):  # a field of the saved config that this version would refuse
        return result
    at = max(0, min(step, before.max_steps - 1))
    lrs = {"now": get_lr(step, cfg), "before": get_lr(at, before), "before_at": at}
    return {**result, "lr": lrs} if lrs["now"] != lrs["before"] else result


def _same(name: str, a: object, b: object) -> bool:
    """Whether two values of a config field are the same: paths as written apart (data/ is data)."""
    if name in PATH_FIELDS and isinstance(a, str) and isinstance(b, str) and a and b:
        return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))
    return a == b


def resume_line(step: int, resumed: dict) -> str:
    """The note that says `resumed` (a dict of resumed()) at the run's first step."""
    line = f"resuming from {resumed['checkpoint']} (step {step})"
    if resumed["changed"]:
        changes = resumed["changed"].items()
        line += "; changed since: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes)
    if lr := resumed.get("lr"):
        at = "" if lr["before_at"] == step else f" at its last step, {lr['before_at']}"
        line += f"; the LR at step {step} is {lr['now']:.4e} by the new schedule ({lr['before']:.4e} by the " \
            f"checkpoint's{at})"
    return line
