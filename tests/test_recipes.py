"""Recipes as data: presets and recipe switching, the speedrun's parameter groups and schedule, exact
resume, the compiled step's weight order and traces (any optimizer's order, any hash seed), and the CLI (train,
sample, eval, export refusal, bad input) with --recipe speedrun."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_main
from mlx.utils import tree_flatten, tree_unflatten
from test_train import VOCAB, cli_config, flat_weights, logged, tiny_config, token_stream, write_shards

from nanogpt_mlx import GPT, GPTConfig, UserError, recipes
from nanogpt_mlx.checkpoint import checkpoints
from nanogpt_mlx.config import ORIGINS, PRESETS, TrainConfig, get_lr
from nanogpt_mlx.optim import Muon
from nanogpt_mlx.recipes import BUILD_NANOGPT, RECIPES, SPEEDRUN
from nanogpt_mlx.train import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), [token_stream(3000, 1), token_stream(3000, 2)],
                        token_stream(2000, 3))


def speedrun_config(data: Path, out: Path, **kw) -> TrainConfig:
    return replace(tiny_config(data, out), recipe="speedrun", **{**SPEEDRUN.defaults, "momentum_warmup": 4, **kw})


# ------------------------------------------------------------------------------ presets
def test_switching_recipe_takes_its_defaults_and_flags_still_win():
    cfg = TrainConfig.preset("shakespeare", recipe="speedrun")
    assert cfg.recipe == "speedrun" and cfg.data == PRESETS["shakespeare"].data
    assert {k: getattr(cfg, k) for k in SPEEDRUN.defaults} == SPEEDRUN.defaults
    assert TrainConfig.preset("shakespeare", recipe="speedrun", max_lr=0.01).max_lr == 0.01
    # switched back, a speedrun preset is the one it was made from: its warmup was the speedrun's 0
    for name, origin in ORIGINS.items():
        assert PRESETS[name].recipe == "speedrun" and PRESETS[origin].recipe == "build-nanogpt"
        assert TrainConfig.preset(name, recipe="build-nanogpt", max_steps=7) == replace(PRESETS[origin], max_steps=7)
    assert PRESETS["shakespeare"].warmup_steps == 20
    assert TrainConfig.preset("shakespeare", recipe="build-nanogpt") == PRESETS["shakespeare"]  # no change
    assert PRESETS["speedrun-124m"].recipe == PRESETS["shakespeare-speedrun"].recipe == "speedrun"
    with pytest.raises(UserError, match="unknown recipe 'adam'; choose from build-nanogpt, speedrun"):
        TrainConfig(recipe="adam")


def test_a_config_switched_by_its_recipe_alone_is_noted(data_dir, tmp_path, capsys):
    """TrainConfig(recipe="speedrun") trained Muon at AdamW's LR 6e-4, clipped, with Adam's betas and eps from
    build-nanogpt, without a word (only TrainConfig.preset and --recipe bring a recipe's defaults); and the speedrun's
    momentum warmup of 300 steps outlasted a short run."""
    from nanogpt_mlx.config import foreign_defaults

    note = foreign_defaults(TrainConfig(recipe="speedrun"))
    assert note.startswith("the speedrun recipe runs with the build-nanogpt recipe's beta1 0.9, eps 1e-08, "
                           "grad_clip 1, max_lr 0.0006, weight_decay 0.1, not its own beta1 0.8, eps 1e-10, grad_clip "
                           "0, max_lr 0.025, weight_decay 0.025")
    assert "TrainConfig.preset(NAME, recipe='speedrun')" in note
    switched = foreign_defaults(replace(PRESETS["shakespeare-speedrun"], recipe="build-nanogpt"))
    assert switched.startswith("the build-nanogpt recipe runs with the speedrun recipe's beta1 0.8")
    assert not any(foreign_defaults(p) for p in PRESETS.values())
    for recipe in RECIPES:  # a choice of one's own (clipping the speedrun) is no such config
        assert foreign_defaults(TrainConfig.preset("shakespeare", recipe=recipe, grad_clip=0.5, eps=1e-9)) == ""
    assert foreign_defaults(TrainConfig.preset("shakespeare", recipe="speedrun", grad_clip=1.0)) == ""
    Trainer(replace(speedrun_config(data_dir, tmp_path / "run", max_steps=2), grad_clip=1.0, beta1=0.9, eps=1e-8,
                    weight_decay=0.1, momentum_warmup=300)).train()
    out = capsys.readouterr().out
    assert "note: the speedrun recipe runs with the build-nanogpt recipe's beta1 0.9" in out
    assert "note: momentum_warmup 300 is not below max_steps 2: Muon's momentum rises for the whole run" in out


def test_build_nanogpt_recipe_is_the_cosine_schedule():
    cfg = TrainConfig(max_lr=6e-4, warmup_steps=10, max_steps=50)
    assert [get_lr(s, cfg) for s in (0, 9, 50)] == pytest.approx([6e-5, 6e-4, 6e-5])
    assert recipes.get("build-nanogpt") is BUILD_NANOGPT and BUILD_NANOGPT.model == {}


def test_a_field_only_the_other_recipe_reads_is_noted_and_changes_nothing(data_dir, tmp_path, capsys):
    """--min-lr under the speedrun recipe, or --head-lr under build-nanogpt's, trained silently as if not given."""
    import mlx.core as mx

    from nanogpt_mlx.config import unread

    changed = {"min_lr_ratio": 0.5, "min_lr": 1e-5, "embed_lr": 0.1, "head_lr": 0.1, "scalar_lr": 0.1,
               "cooldown_frac": 0.5, "momentum_warmup": 7}
    assert set(changed) == {k for r in RECIPES.values() for k in r.own}
    for recipe in RECIPES.values():
        base = TrainConfig.preset("shakespeare", recipe=recipe.name, max_steps=20, warmup_steps=3)
        assert unread(base) == ""
        for other in (r for r in RECIPES.values() if r is not recipe):
            for k in other.own:
                cfg = replace(base, **{k: changed[k]})
                assert unread(cfg) == f"the {recipe.name} recipe does not read {k} {changed[k]!r} (the {other.name} " \
                                      "recipe's)"
                for step in range(20):  # (and it does not: every group's LR and momentum as without it)
                    a, b = (recipe.make_optimizer(c, mx.float32) for c in (base, cfg))
                    recipe.set_step(a, step, base)
                    recipe.set_step(b, step, cfg)
                    described = [[(float(o.learning_rate), float(getattr(o, "momentum", 0)))
                                  for o in getattr(opt, "optimizers", [opt])] for opt in (a, b)]
                    assert described[0] == described[1], (recipe.name, k, step)
    assert all(unread(p) == "" for p in PRESETS.values())
    Trainer(replace(speedrun_config(data_dir, tmp_path / "s"), max_steps=1, head_lr=0.1, min_lr=1e-5)).train()
    out = capsys.readouterr().out
    assert "note: the speedrun recipe does not read min_lr 1e-05 (the build-nanogpt recipe's)" in out


# ------------------------------------------------------------------------------ optimizer
def test_speedrun_parameter_groups(data_dir, tmp_path):
    """Muon gets the blocks' matrices (c_attn as q, k, v), AdamW the embedding, the head and the gains."""
    trainer = Trainer(speedrun_config(data_dir, tmp_path))
    subs = trainer.optimizer.optimizers
    names = [{k.rsplit(".", 1)[0] for k, _ in tree_flatten(o.state) if k.endswith((".m", ".v"))} for o in subs]
    L = trainer.model.config.n_layer
    assert names[0] == {f"h.{i}.attn.c_attn.weight" for i in range(L)}
    assert names[1] == {f"h.{i}.{m}.weight" for i in range(L) for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert names[2] == {"wte.weight"} and names[3] == {"lm_head.weight"}
    assert names[4] == {"ln_e.weight", "ln_f.weight"} | {f"h.{i}.ln_{j}.weight" for i in range(L) for j in (1, 2)}
    assert set().union(*names) == {k for k, _ in trainer.model.parameters_flat()}  # every parameter, once
    assert [type(o).__name__ for o in subs] == ["Muon", "Muon", "AdamW", "AdamW", "AdamW"]
    assert subs[0].splits == 3 and subs[1].splits == 1 and subs[0].weight_decay == 0.025
    assert all(o.weight_decay == 0 and o.betas == [0.8, 0.95] and o.eps == 1e-10 for o in subs[2:])


def test_speedrun_groups_of_value_embeddings_and_skip_weights(data_dir, tmp_path):
    """Value embeddings are embeddings (AdamW at embed_lr); their mixing weights and the U-net's are gains."""
    cfg = GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=4, n_head=2, n_embd=32, **SPEEDRUN.model,
                    value_embeds=1, unet=True)
    opt = SPEEDRUN.make_optimizer(speedrun_config(data_dir, tmp_path), mx.float32)
    opt.init(GPT(cfg, seed=0).trainable_parameters())
    names = [{k.rsplit(".", 1)[0] for k, _ in tree_flatten(o.state) if k.endswith((".m", ".v"))} for o in opt.optimizers]
    assert names[2] == {"wte.weight", "ve.0.weight"}
    assert {"skip_weights", "h.0.attn.ve_lambda", "h.3.attn.ve_lambda"} <= names[4]


def test_speedrun_schedule_sets_every_group(data_dir, tmp_path):
    cfg = speedrun_config(data_dir, tmp_path, max_steps=10, cooldown_frac=0.4, momentum_warmup=4, max_lr=0.02,
                          embed_lr=0.5, head_lr=0.004, scalar_lr=0.03)
    opt = SPEEDRUN.make_optimizer(cfg, mx.float32)
    for step, factor, momentum in [(0, 1.0, 0.85), (2, 1.0, 0.90), (6, 1.0, 0.95), (8, 0.5, 0.95)]:
        SPEEDRUN.set_step(opt, step, cfg)
        lrs = [o.learning_rate.item() for o in opt.optimizers]
        assert lrs == pytest.approx([factor * lr for lr in (0.02, 0.02, 0.5, 0.004, 0.03)])
        assert [o.momentum.item() for o in opt.optimizers if isinstance(o, Muon)] == pytest.approx([momentum] * 2)
        assert get_lr(step, cfg) == pytest.approx(0.02 * factor)


def test_speedrun_optimizer_steps_as_pytorchs_adamw_and_muon():
    """Three steps of the speedrun's optimizer (at steps 0, 150 and 2500 of speedrun-124m's 3375: momentum warming
    up, then the cooldown) equal PyTorch's AdamW over the embedding, head and gains and torch.optim.Muon over the
    blocks' matrices (q, k and v each its own), with modded-nanogpt's set_hparams schedule and momentum warm-up.
    torch.optim.Muon orthogonalises in bfloat16: its Newton-Schulz is run in float32 here, as the CPU profile's."""
    torch = pytest.importorskip("torch")
    muon_module = pytest.importorskip("torch.optim._muon")
    if not hasattr(muon_module, "_zeropower_via_newtonschulz"):
        pytest.skip("this PyTorch's Muon has no Newton-Schulz function to run in float32")
    cfg, C = TrainConfig.preset("speedrun-124m"), 64
    model = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=C, **SPEEDRUN.model), seed=0)
    start = {k: np.array(v) for k, v in model.parameters_flat()}
    rng = np.random.default_rng(0)
    steps = [0, 150, 2500]
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) * 1e-3 for k, v in start.items()} for _ in steps]

    opt, params = SPEEDRUN.make_optimizer(cfg, mx.float32), model.trainable_parameters()
    for step, g in zip(steps, grads):
        SPEEDRUN.set_step(opt, step, cfg)
        params = opt.apply_gradients(tree_unflatten([(k, mx.array(v)) for k, v in g.items()]), params)
    ours = {k: np.array(v) for k, v in tree_flatten(params)}

    def split(name: str) -> list[str]:  # c_attn's rows as q, k and v
        return [f"{name}.{part}" for part in "qkv"] if name.endswith("c_attn.weight") else [name]

    def rows(name: str, a: np.ndarray) -> list[np.ndarray]:
        return np.split(a, 3) if name.endswith("c_attn.weight") else [a]

    ref = {n: torch.nn.Parameter(torch.from_numpy(r.copy()))
           for k, a in start.items() for n, r in zip(split(k), rows(k, a))}
    matrices = [p for n, p in ref.items() if n.startswith("h.") and p.ndim == 2]
    adamw = torch.optim.AdamW([{"params": [ref["wte.weight"]], "lr": cfg.embed_lr},
                               {"params": [ref["lm_head.weight"]], "lr": cfg.head_lr},
                               {"params": [p for p in ref.values() if p.ndim < 2], "lr": cfg.scalar_lr}],
                              betas=(0.8, 0.95), eps=1e-10, weight_decay=0)
    muon = torch.optim.Muon(matrices, lr=cfg.max_lr, weight_decay=0.025, momentum=0.95, nesterov=True,
                            adjust_lr_fn="original")

    def newton_schulz(g, ns_coefficients, ns_steps, eps):  # modded-nanogpt's, in float32
        a, b, c = ns_coefficients
        x = g.float()
        x = x.T if g.size(0) > g.size(1) else x
        x = x / (x.norm() + eps)
        for _ in range(ns_steps):
            A = x @ x.T
            x = a * x + (b * A + c * A @ A) @ x
        return x.T if g.size(0) > g.size(1) else x

    base = [[group["lr"] for group in o.param_groups] for o in (adamw, muon)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(muon_module, "_zeropower_via_newtonschulz", newton_schulz)
        for step, g in zip(steps, grads):
            progress = step / cfg.max_steps  # train_gpt_simple.py's set_hparams; the main record's momentum
            eta = 1.0 if progress < 1 - cfg.cooldown_frac else (1 - progress) / cfg.cooldown_frac
            warm = min(step / cfg.momentum_warmup, 1)
            for o, lrs in zip((adamw, muon), base):
                for group, lr in zip(o.param_groups, lrs):
                    group["lr"] = lr * eta
            muon.param_groups[0]["momentum"] = (1 - warm) * 0.85 + warm * 0.95
            for k, a in g.items():
                for n, r in zip(split(k), rows(k, a)):
                    ref[n].grad = torch.from_numpy(r.copy())
            adamw.step()
            muon.step()
    for k, a in ours.items():
        theirs = np.concatenate([ref[n].detach().numpy() for n in split(k)])
        moved = np.abs(theirs - start[k]).max()
        assert moved > 0 and np.abs(a - theirs).max() <= 1e-4 * moved, k


# ------------------------------------------------------------------------------ training
def test_speedrun_learns_and_resumes_exactly(data_dir, tmp_path):
    cfg = speedrun_config(data_dir, tmp_path / "a", shuffle=True, val_every=4, val_steps=2)
    Trainer(cfg).train()
    split = replace(cfg, out=str(tmp_path / "b"))
    Trainer(split).train(until=6)
    Trainer(split, resume=True).train()
    a, b = logged(tmp_path / "a"), logged(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert a[-1]["loss"] < a[0]["loss"] - 0.1
    assert a[0]["loss"] == pytest.approx(np.log(VOCAB), abs=1e-3)  # zero-init head: uniform logits at step 0
    wa, wb = flat_weights(tmp_path / "a"), flat_weights(tmp_path / "b")
    assert "lm_head.weight" in wa and "wpe.weight" not in wa
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_weights_that_an_optimizer_returns_in_another_order_keep_their_places(data_dir, tmp_path, monkeypatch):
    """mx.compile keys the compiled step's traces on its captured state's shapes, not on their names: weights
    returned in another order with the same shapes (here wte's and lm_head's places exchanged, as MLX's
    MultiOptimizer did under some hash seeds) made a later step run a trace with wte updated from lm_head's weights
    (the loss at step 3: 14.9, not 6.9)."""
    cfg = speedrun_config(data_dir, tmp_path / "plain", max_steps=5)
    Trainer(cfg).train()
    trainer = Trainer(replace(cfg, out=str(tmp_path / "reordered")))
    apply = trainer.optimizer.apply_gradients
    swap = {"wte": "lm_head", "lm_head": "wte"}

    def reordered(gradients: dict, parameters: dict) -> dict:
        updated = apply(gradients, parameters)
        return {swap.get(k, k): updated[swap.get(k, k)] for k in parameters}

    monkeypatch.setattr(trainer.optimizer, "apply_gradients", reordered)
    trainer.train()
    assert [r["loss"] for r in logged(tmp_path / "reordered")] == [r["loss"] for r in logged(tmp_path / "plain")]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_the_compiled_steps_are_traced_in_the_first_step_only(recipe, threads, data_dir, tmp_path, monkeypatch):
    """Python runs the model's loss and the optimizer's update only while mx.compile traces a step (or the
    validation loss): after step 0 and the first validation, never again. The speedrun's step 1 was traced again in
    nearly every process (its updated weights came back in another order), build-nanogpt's in half of them."""
    calls = []
    for cls, name in ((GPT, "loss"), (optim.MultiOptimizer, "apply_gradients")):
        monkeypatch.setattr(cls, name, lambda *a, f=getattr(cls, name), **kw: calls.append(f) or f(*a, **kw))
    cfg = replace(tiny_config(data_dir, tmp_path), recipe=recipe, **RECIPES[recipe].defaults, total_batch_size=384,
                  max_steps=6, val_every=2, val_steps=1, threads=threads)
    trainer = Trainer(cfg)
    trainer.train(until=1)
    traced = len(calls)
    assert traced >= 3  # a micro-step's loss (one per thread), the update, the validation's loss
    trainer.train()
    assert len(calls) == traced


def test_a_compiled_speedrun_step_is_the_same_under_any_hash_seed(data_dir, tmp_path):
    """Under Python's hash seed 51 MLX's MultiOptimizer returned the speedrun's weights in an order that made the
    compiled step 1 update wte from lm_head's weights; the same run under any seed is the same, bit for bit."""
    weights = []
    for seed in ("0", "51"):
        out = tmp_path / seed
        run_cli(*cli_config(data_dir, out, "--recipe", "speedrun", "--n-layer", "2", "--max-steps", "3",
                            "--sample-every", "0"), check=True, env={"PYTHONHASHSEED": seed})
        weights.append(flat_weights(out))
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k], err_msg=k)


def test_cli_speedrun_trains_samples_evaluates_and_refuses_export(data_dir, tmp_path):
    from test_evaluate import make_hellaswag, write_jsonl

    out = tmp_path / "run"
    hella = write_jsonl(tmp_path / "hellaswag_val.jsonl", make_hellaswag(6, ctx_words=(3, 10), ending_words=(1, 8)))
    args = cli_config(data_dir, out, "--recipe", "speedrun", "--max-steps", "4", "--val-every", "2", "--val-steps",
                      "2", "--sample-every", "2", "--num-samples", "1", "--sample-tokens", "4", "--vocab-size",
                      "50304", "--block-size", "64", "--hellaswag-every", "4", "--hellaswag-data", str(hella))
    proc = run_cli(*args, check=True)
    assert "recipe speedrun" in proc.stdout and "hellaswag" in proc.stdout and "sample 0:" in proc.stdout
    run_cli("sample", "--model", str(out), "--max-new-tokens", "4", "--num-samples", "1", "--seed", "0", check=True)
    loss = run_cli("eval", "loss", "--model", str(out), "--data", str(data_dir), "--batches", "2", "--batch-size",
                   "2", "--seq-len", "32", check=True)
    assert "val loss" in loss.stdout
    run_cli("eval", "hellaswag", "--model", str(out), "--data", str(hella), check=True)

    export = run_cli("export", str(out), str(tmp_path / "hf"))
    assert_one_line_error(export, "cannot export as Hugging Face GPT-2", "rope=True", "tie_embeddings=False")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())

    wrong = run_cli("train", "--resume", str(out), "--recipe", "build-nanogpt", "--max-steps", "5")
    assert_one_line_error(wrong, "model switches", "not the build-nanogpt recipe's", "choose --recipe speedrun")
    assert [p.name for p in checkpoints(out)] == ["ckpt-000004"]  # the refused resume wrote nothing


def test_bad_recipe_input_is_one_line(data_dir, small_hf_dir, tmp_path, capsys):
    assert_one_line_error(run_main(capsys, *cli_config(data_dir, tmp_path / "x", "--recipe", "muon")),
                          "unknown recipe 'muon'")
    args = cli_config(data_dir, tmp_path / "y", "--recipe", "speedrun", "--init-from", str(small_hf_dir), "--max-steps",
                      "1")
    for flag in ("--n-layer", "--n-head", "--n-embd", "--block-size"):  # the source's shape is trained
        del args[args.index(flag):args.index(flag) + 2]
    gpt2 = run_main(capsys, *args)
    assert_one_line_error(gpt2, "none (GPT-2)", "not the speedrun recipe's")
    assert_one_line_error(run_main(capsys, *cli_config(data_dir, tmp_path / "z", "--cooldown-frac", "0")),
                          "cooldown_frac")


@pytest.fixture(scope="module")
def small_hf_dir(tmp_path_factory) -> Path:
    from conftest import save_hf_gpt2

    return save_hf_gpt2(tmp_path_factory.mktemp("hf"), n_layer=1, n_head=2, n_embd=32, n_positions=32,
                        vocab_size=VOCAB, seed=3)


def test_the_presets_hold_build_nanogpts_and_the_speedruns_values():
    """build-nanogpt's train_gpt2.py: 2**19 tokens a step, max_lr 6e-4 down to 10% of it, 715 warmup steps of 19073
    (10B tokens), AdamW (0.9, 0.95), eps 1e-8, decay 0.1, clip 1.0 (and the recipe's defaults are those); the
    speedrun's: Muon at 0.025 with decay 0.025, AdamW (0.8, 0.95), eps 1e-10, embeddings 0.3, head 1/320,
    scalars 0.01, no warmup or clipping, the last 70% a linear cooldown, Muon's momentum warm-up over 300 steps."""
    from nanogpt_mlx.config import TrainConfig

    fields = ("total_batch_size", "max_lr", "min_lr_ratio", "warmup_steps", "max_steps", "beta1", "beta2", "eps",
              "weight_decay", "grad_clip")
    gpt2 = TrainConfig.preset("gpt2-124m")
    assert [getattr(gpt2, f) for f in fields] == [2**19, 6e-4, 0.1, 715, 19073, 0.9, 0.95, 1e-8, 0.1, 1.0]
    assert gpt2.recipe == "build-nanogpt"
    assert all(getattr(gpt2, k) == v for k, v in recipes.BUILD_NANOGPT.defaults.items())
    speedrun = TrainConfig.preset("speedrun-124m")
    fields += ("embed_lr", "head_lr", "scalar_lr", "cooldown_frac", "momentum_warmup")
    assert [getattr(speedrun, f) for f in fields] == [2**19, 0.025, 0.1, 0, 3375, 0.8, 0.95, 1e-10, 0.025, 0.0, 0.3,
                                                       1 / 320, 0.01, 0.7, 300]
    assert (speedrun.n_embd // speedrun.n_head, TrainConfig.preset("speedrun-124m", recipe="build-nanogpt").n_head) == (
        128, 12)  # the speedrun's heads of 128 (its records since RoPE and QK-norm); GPT-2's 12 back
