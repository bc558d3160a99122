"""Token efficiency: build-nanogpt's recipe vs the speedrun's, side by side in one run.

Both recipes train the `shakespeare` preset's model (4 layers, 256 wide, vocab 50304) on Tiny
Shakespeare's GPT-2 tokens with the same tokens per step (16 x 128) and the same step budget
(200 steps; the preset's). Each recipe's LR is tuned by a small sweep (build-nanogpt: max_lr;
speedrun: one multiplier on all its LRs: Muon's, embedding, head, gains); the best by final val loss is
kept. Reported:
  (a) val loss after the budget, (b) steps each needs to reach build-nanogpt's final val loss,
  (c) seconds per step (the speedrun's overhead: Muon, soft-cap, untied head), (d) the speedrun given build-nanogpt's wall-clock: a run
  whose step budget is what fits in the time build-nanogpt's 200 steps took.
--ablate runs the speedrun at its best LRs with model switches changed (e.g. value_embeds=1, unet=true)
and reports each against the speedrun. --reuse keeps finished runs of the same config (rerun the report).

    nanogpt-mlx prepare shakespeare --out data/shakespeare
    python benchmarks/bench_recipes.py --data data/shakespeare --out out/bench-recipes
    nanogpt-mlx plot out/bench-recipes/build-nanogpt out/bench-recipes/speedrun --out recipes.png
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import asdict, fields, replace
from pathlib import Path
from statistics import median


from nanogpt_mlx import UserError, checkpoint, recipes
from nanogpt_mlx.model import GPTConfig
from nanogpt_mlx.config import TrainConfig
from nanogpt_mlx.train import Trainer
from nanogpt_mlx.arguments import positive_float, positive_int

# each sweep brackets its recipe's best point (a 2-core CPU runs a 200-step run in ~10 min)
NANOGPT_LRS = [5e-4, 1e-3, 2e-3]  # the preset's max_lr is 1e-3
SPEEDRUN_SCALES = [2.0, 4.0, 8.0]  # times the speedrun's LRs (Muon 0.025, embed 0.3, head 1/320, gains 0.01)


def config(recipe: str, data: str, out: Path, steps: int, val_every: int, **changes) -> TrainConfig:
    base = TrainConfig.preset("shakespeare", recipe=recipe)
    # 300 of the speedrun's 3375 steps would be most of this run (only the speedrun reads it: the other was told so)
    warmup = {"momentum_warmup": max(1, steps // 4)} if "momentum_warmup" in recipes.get(recipe).own else {}
    return replace(base, data=data, out=str(out), max_steps=steps, val_every=val_every, sample_every=0,
                   checkpoint_every=0, **warmup, **changes)


def speedrun_lrs(scale: float) -> dict[str, float]:
    """The speedrun's four LRs (Muon's, embedding, head, gains) times `scale`."""
    base = TrainConfig.preset("shakespeare", recipe="speedrun")
    return {k: getattr(base, k) * scale for k in ("max_lr", "embed_lr", "head_lr", "scalar_lr")}


def variant(changes: str) -> str:
    """Register the speedrun recipe with `changes` (`value_embeds=1,unet=true`) to its model; its name."""
    types = {f.name: f.type for f in fields(GPTConfig)}
    model = dict(recipes.SPEEDRUN.model)
    for item in changes.split(","):
        key, _, value = item.partition("=")
        if key not in types or key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            raise SystemExit(f"--ablate {changes}: {key!r} is not a model switch")
        try:
            model[key] = value.lower() in ("1", "true") if types[key] == "bool" else \
                {"int": int, "float": float, "str": str}[types[key]](value)
        except ValueError as e:
            raise SystemExit(f"--ablate {changes}: {key}: {e}") from None
    preset = TrainConfig.preset("shakespeare")
    try:  # the benchmark's model with these switches: refused now, not after the sweep
        GPTConfig(n_layer=preset.n_layer, n_head=preset.n_head, n_embd=preset.n_embd, **model)
    except UserError as e:
        raise SystemExit(f"--ablate {changes}: {e}") from None
    name = f"speedrun+{changes}"
    recipes.RECIPES[name] = replace(recipes.SPEEDRUN, name=name, model=model)  # for this process only
    return name


def finished(cfg: TrainConfig) -> bool:
    """cfg.out holds the final checkpoint of a run of exactly this config."""
    found = checkpoint.checkpoints(cfg.out)
    if not found:
        return False
    state = checkpoint.read_state(found[-1])
    return state["step"] == cfg.max_steps and state["config"] == json.loads(json.dumps(asdict(cfg)))


def run(cfg: TrainConfig, reuse: bool = False) -> dict:
    """Train cfg from scratch (or reuse its finished run); its val curve {step: loss} and median seconds per step."""
    if not (reuse and finished(cfg)):
        shutil.rmtree(cfg.out, ignore_errors=True)
        Trainer(cfg).train()
    records = [json.loads(line) for line in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in records if r["kind"] == "val"}
    dts = [r["dt"] for r in records if r["kind"] == "train"]
    # without the compiling first steps, where there are others (a run of 3 steps or fewer had no median)
    return {"val": val, "final": val[max(val)], "s_per_step": median(dts[3:] or dts)}


def steps_to(val: dict[int, float], target: float) -> int | None:
    reached = [s for s, loss in sorted(val.items()) if loss <= target]
    return reached[0] if reached else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/shakespeare", help="shards of `nanogpt-mlx prepare shakespeare`")
    ap.add_argument("--out", default="out/bench-recipes", help="run directories (their log.txt plot with `plot`)")
    ap.add_argument("--steps", type=positive_int, default=200, help="step budget of both recipes (the preset's: 200)")
    ap.add_argument("--val-every", type=positive_int, default=20,
                    help="steps between val losses (8 batches each, the preset's)")
    ap.add_argument("--nanogpt-lrs", type=positive_float, nargs="+", default=NANOGPT_LRS,
                    help="build-nanogpt max_lr sweep")
    ap.add_argument("--speedrun-scales", type=positive_float, nargs="+", default=SPEEDRUN_SCALES,
                    help="speedrun sweep: multipliers of all its LRs")
    ap.add_argument("--ablate", nargs="*", default=[], metavar="SWITCHES",
                    help="speedrun runs at the best LRs with changed model switches, e.g. value_embeds=1 unet=true")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs of the same config instead of rerunning")
    args = ap.parse_args()
    ablations = [variant(changes) for changes in args.ablate]
    if not any(Path(args.data).glob("*_val_*.npy")):
        raise SystemExit(f"{args.data}: no shards; run `nanogpt-mlx prepare shakespeare --out {args.data}` first")
    out = Path(args.out)

    sweep: dict[str, dict[float, dict]] = {"build-nanogpt": {}, "speedrun": {}}
    for lr in args.nanogpt_lrs:
        cfg = config("build-nanogpt", args.data, out / f"build-nanogpt-lr{lr:g}", args.steps, args.val_every, max_lr=lr)
        sweep["build-nanogpt"][lr] = run(cfg, args.reuse)
    for scale in args.speedrun_scales:
        cfg = config("speedrun", args.data, out / f"speedrun-x{scale:g}", args.steps, args.val_every,
                     **speedrun_lrs(scale))
        sweep["speedrun"][scale] = run(cfg, args.reuse)

    print(f"\nLR sweep: final val loss after {args.steps} steps x 2,048 tokens")
    print("| recipe | setting | final val loss | s/step |\n|---|---|---:|---:|")
    for lr, r in sweep["build-nanogpt"].items():
        print(f"| build-nanogpt | max_lr {lr:g} | {r['final']:.4f} | {r['s_per_step']:.3f} |")
    for scale, r in sweep["speedrun"].items():
        print(f"| speedrun | LRs x{scale:g} | {r['final']:.4f} | {r['s_per_step']:.3f} |")

    best_lr = min(sweep["build-nanogpt"], key=lambda k: sweep["build-nanogpt"][k]["final"])
    best_scale = min(sweep["speedrun"], key=lambda k: sweep["speedrun"][k]["final"])
    nano, speed = sweep["build-nanogpt"][best_lr], sweep["speedrun"][best_scale]
    for name, key in (("build-nanogpt", f"build-nanogpt-lr{best_lr:g}"), ("speedrun", f"speedrun-x{best_scale:g}")):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(key)  # stable names for `nanogpt-mlx plot`

    # (d) equal wall-clock: the speedrun with the step budget that fits in build-nanogpt's time
    fit = math.floor(args.steps * nano["s_per_step"] / speed["s_per_step"])
    timed = speed if fit >= args.steps else run(
        config("speedrun", args.data, out / "speedrun-equal-time", fit, args.val_every, **speedrun_lrs(best_scale)),
        args.reuse)

    target = nano["final"]
    to_target = steps_to(speed["val"], target)
    print(f"\nbest: build-nanogpt max_lr {best_lr:g}; speedrun LRs x{best_scale:g}")
    print("| | build-nanogpt | speedrun | ratio |\n|---|---:|---:|---:|")
    print(f"| (a) val loss after {args.steps} steps | {nano['final']:.4f} | {speed['final']:.4f} | "
          f"{speed['final'] - nano['final']:+.4f} nats |")
    nano_steps = steps_to(nano["val"], target)
    print(f"| (b) steps to val loss {target:.4f} | {nano_steps} | {to_target if to_target is not None else '>' + str(args.steps)} | "
          + (f"{to_target / nano_steps:.2f}x |" if to_target is not None else "- |"))
    print(f"| (c) seconds per step | {nano['s_per_step']:.3f} | {speed['s_per_step']:.3f} | "
          f"{speed['s_per_step'] / nano['s_per_step']:.2f}x |")
    print(f"| (d) val loss at build-nanogpt's wall-clock ({min(fit, args.steps)} speedrun steps) | {nano['final']:.4f} | "
          f"{timed['final']:.4f} | {timed['final'] - nano['final']:+.4f} nats |")

    if ablations:
        print(f"\nablations: the speedrun at LRs x{best_scale:g} with model switches changed, {args.steps} steps")
        print("| model | final val loss | vs speedrun | s/step |\n|---|---:|---:|---:|")
        print(f"| speedrun | {speed['final']:.4f} | | {speed['s_per_step']:.3f} |")
        for name in ablations:
            r = run(config(name, args.data, out / name.replace("=", "").replace(",", "-"), args.steps,
                           args.val_every, **speedrun_lrs(best_scale)), args.reuse)
            print(f"| {name} | {r['final']:.4f} | {r['final'] - speed['final']:+.4f} nats | {r['s_per_step']:.3f} |")


if __name__ == "__main__":
    main()
