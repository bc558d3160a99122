"""The speedrun's architecture switches (GPTConfig): logits equal a PyTorch reference written from
modded-nanogpt's and GPT-2's definitions, for each switch alone and all together; RoPE with the KV
cache; the speedrun init; config validation and round trips; the soft-capped fused loss on every profile."""

from __future__ import annotations

import json
import zlib
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanogpt_mlx import GPT, GPTConfig, UserError, device, kernels, memory
from nanogpt_mlx.loss import MAX_BOUND_CAP
from nanogpt_mlx.recipes import SPEEDRUN

SIZES = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
T = 16


# --------------------------------------------------------------------------- a PyTorch reference
def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """The speedrun's Rotary on (B, T, nh, hs): the two halves of each head rotated by pos * inv_freq."""
    hs = x.size(-1)
    inv_freq = 1.0 / base ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    theta = torch.outer(torch.arange(x.size(1), dtype=torch.float64), inv_freq)[None, :, None, :]
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


def reference_logits(params: dict[str, np.ndarray], cfg: GPTConfig, idx: np.ndarray) -> np.ndarray:
    """Logits (B, T, V) of GPT-2 / the speedrun's GPT with `params` (MLX names and layouts), in float64
    so that the difference measured is MLX's float32 error alone."""
    tensors = {k: torch.from_numpy(v).double() for k, v in params.items()}
    used: set[str] = set()

    def param(name: str) -> torch.Tensor:
        used.add(name)
        return tensors[name]

    C, nh = cfg.n_embd, cfg.n_head
    hs = C // nh

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if cfg.norm == "rmsnorm":
            return F.rms_norm(x, (C,), weight=param(f"{name}.weight"), eps=1e-6)
        return F.layer_norm(x, (C,), param(f"{name}.weight"), param(f"{name}.bias"), eps=1e-5)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:  # MLX's (out, in) is torch's layout
        return F.linear(x, param(f"{name}.weight"), param(f"{name}.bias") if cfg.bias else None)

    idx_t = torch.from_numpy(idx).long()
    B, Tq = idx_t.shape
    x = param("wte.weight")[idx_t]
    if not cfg.rope:
        x = x + param("wpe.weight")[:Tq]
    if cfg.embed_norm:
        x = norm(x, "ln_e")
    L, k_ve = cfg.n_layer, cfg.value_embeds
    # the speedrun's layer -> value embedding list: [ve0 .. ve(k-1)] + [None] * (L - 2k) + [ve0 .. ve(k-1)]
    ves = [param(f"ve.{j}.weight")[idx_t] for j in range(k_ve)]
    layer_ve = ves + [None] * (L - 2 * k_ve) + ves
    skips, n_skip = [], L // 2 if cfg.unet else 0
    for i in range(L):
        if i >= L - n_skip:
            x = x + param("skip_weights")[i - (L - n_skip)] * skips.pop()
        q, k, v = linear(norm(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, dim=-1)
        if layer_ve[i] is not None:
            lam = param(f"h.{i}.attn.ve_lambda")
            v = lam[0] * v + lam[1] * layer_ve[i]
        q, k, v = (a.view(B, Tq, nh, hs) for a in (q, k, v))
        if cfg.qk_norm:
            q, k = F.rms_norm(q, (hs,), eps=1e-6), F.rms_norm(k, (hs,), eps=1e-6)
        if cfg.rope:
            q, k = rotary(q, cfg.rope_base), rotary(k, cfg.rope_base)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + linear(y.transpose(1, 2).reshape(B, Tq, C), f"h.{i}.attn.c_proj")
        h = linear(norm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
        h = h.relu().square() if cfg.mlp == "relu2" else F.gelu(h, approximate="tanh")
        x = x + linear(h, f"h.{i}.mlp.c_proj")
        if i < n_skip:
            skips.append(x)
    head = param("wte.weight") if cfg.tie_embeddings else param("lm_head.weight")
    logits = norm(x, "ln_f") @ head.T
    assert used == set(params), f"parameters the reference has no use for: {set(params) - used}"
    c = cfg.logit_softcap
    return (c * torch.tanh(logits / c) if c else logits).numpy()


# --------------------------------------------------------------------------- helpers
def randomise(model: GPT) -> dict[str, np.ndarray]:
    """Random values for every parameter, zero-initialised ones, gains and biases included (a zero
    projection would hide errors). Seeded by name, so two configs share the values of shared names."""
    params = {}
    for name, w in model.parameters_flat():
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        z = rng.standard_normal(w.shape)
        if name.endswith("bias"):
            v = 0.3 * z
        elif ".ln_" in name or name.startswith("ln_"):
            v = 1 + 0.3 * z  # norm gains
        elif name in ("wte.weight", "wpe.weight") or name.startswith("ve."):
            v = z
        elif name.endswith(("ve_lambda", "skip_weights")):
            v = 0.5 + 0.3 * z  # mixing weights
        elif name == "lm_head.weight":
            v = 6 * z / np.sqrt(w.shape[1])  # logits of ~20 as a tied head gives: a cap of 15 bites
        else:
            v = z / np.sqrt(w.shape[1])  # keeps activations O(1) through the blocks
        params[name] = v.astype(np.float32)
    model.load_flat({k: mx.array(v) for k, v in params.items()})
    return params


def tokens(B: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], size=(B, T))


def random_model(**switches) -> tuple[GPT, dict[str, np.ndarray]]:
    model = GPT(GPTConfig(**{**SIZES, **switches}), seed=0)
    return model, randomise(model)


# --------------------------------------------------------------------------- logits vs the reference
CASES = {
    "rope": dict(rope=True),
    "rope_base": dict(rope=True, rope_base=100.0),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "rmsnorm": dict(norm="rmsnorm"),
    "embed_norm": dict(embed_norm=True),
    "no_bias": dict(bias=False),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=5.0),
    "value_embeds": dict(n_layer=4, value_embeds=1),
    "value_embeds_all_layers": dict(n_layer=4, value_embeds=2),
    "unet": dict(n_layer=4, unet=True),
    "unet_odd": dict(n_layer=5, unet=True),
    "speedrun": SPEEDRUN.model,
    "speedrun_skips": dict(SPEEDRUN.model, n_layer=4, value_embeds=2, unet=True),
}


@pytest.mark.parametrize("switches", CASES.values(), ids=CASES.keys())
def test_logits_equal_torch_reference(switches: dict):
    model, params = random_model(**switches)
    idx = tokens()
    ours = np.array(model(mx.array(idx)))
    ref = reference_logits(params, model.config, idx)
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    print(f"{switches}: max |mlx - torch| {diff:.1e}, logit scale {scale:.1f}")
    assert ours.shape == ref.shape == (2, T, SIZES["vocab_size"])
    assert scale > 1.0 and np.abs(ref).std() > 0.3  # a real comparison, not of near-zero logits
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * scale)
    # GPT-2 (all switches off), sharing every parameter it has, gives other logits: the switches
    # act, so a model that ignored one would fail above. (init alone only differs at init: untied here.)
    plain, _ = random_model(n_layer=model.config.n_layer)
    off = np.array(plain(mx.array(idx)))
    assert np.abs(off - ours).max() > 100 * 1e-4 * scale
    if switches.get("logit_softcap"):
        assert np.abs(ours).max() < switches["logit_softcap"] < np.abs(reference_logits(
            params, replace(model.config, logit_softcap=0.0), idx)).max()  # the cap bites


@pytest.mark.parametrize("chunks", [[6] + [1] * 10, [5, 7, 4]], ids=["prompt_then_tokens", "offset_chunks"])
@pytest.mark.parametrize("skips", [False, True], ids=["speedrun", "value_embeds_unet"])
def test_rope_kv_cache_equals_full_forward(chunks: list[int], skips: bool):
    """Cached decoding rotates q and k at their absolute positions, also for a chunk starting past 0."""
    model, _ = random_model(**SPEEDRUN.model, **(dict(n_layer=4, value_embeds=1, unet=True) if skips else {}))
    idx = mx.array(tokens(seed=3))
    full = np.array(model(idx))
    cache, parts, start = model.make_cache(), [], 0
    for n in chunks:
        parts.append(model(idx[:, start : start + n], cache))
        start += n
    cached = np.array(mx.concatenate(parts, axis=1))
    diff = np.abs(cached - full).max()
    print(f"chunks {chunks}: max |cached - full| {diff:.1e}, logit scale {np.abs(full).max():.1f}")
    assert cache[0].offset == T
    np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5 * np.abs(full).max())


# --------------------------------------------------------------------------- init and validation
def test_speedrun_init():
    cfg = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64, **SPEEDRUN.model)
    params = {k: np.array(v) for k, v in GPT(cfg, seed=0).parameters_flat()}
    assert "lm_head.weight" in params and "wpe.weight" not in params and not any(k.endswith("bias") for k in params)
    for name, p in params.items():
        if name.endswith(("c_proj.weight", "lm_head.weight")):
            assert np.all(p == 0), name
        elif ".ln_" in name or name.startswith("ln_"):
            assert np.all(p == 1), name  # RMSNorm gains
        else:
            std = 1.0 if name == "wte.weight" else np.sqrt(0.33 / p.shape[1])
            assert abs(p.std() - std) < 0.05 * std and abs(p.mean()) < 0.05 * std, name


def test_speedrun_init_with_tied_embeddings_is_a_one_line_user_error():
    with pytest.raises(UserError) as e:
        GPTConfig(init="speedrun")
    assert "tie_embeddings" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [dict(mlp="swish"), dict(norm="batch"), dict(logit_softcap=-1.0),
                                 dict(logit_softcap=float("nan")), dict(rope_base=0.0),
                                 dict(rope=True, n_embd=30, n_head=2), dict(value_embeds=2), dict(value_embeds=-1)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_bad_switch_values_are_user_errors(bad: dict):
    with pytest.raises(UserError, match=next(iter(bad)) if "rope" not in bad else "even head size"):
        GPTConfig(**{**SIZES, **bad})


def test_switches_and_dict_round_trip():
    assert GPTConfig().switches() == {} and GPTConfig(**SIZES).switches() == {}
    assert GPTConfig(**SIZES, rope=True, logit_softcap=15.0).switches() == {"rope": True, "logit_softcap": 15.0}
    speedrun = GPTConfig(**SIZES, **SPEEDRUN.model)
    assert speedrun.switches() == SPEEDRUN.model
    assert GPTConfig.from_dict(speedrun.to_dict()) == speedrun
    assert GPTConfig.from_dict(json.loads(json.dumps(speedrun.to_dict()))) == speedrun  # as a checkpoint holds it
    old = GPTConfig.from_dict(dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64))
    assert old == GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)
    assert old.switches() == {} and old.tie_embeddings and old.norm == "layernorm"
    for bad in ("1", True):  # a float field took "1" and true as 1.0
        with pytest.raises(UserError, match="logit_softcap must be a number"):
            GPTConfig.from_dict({**old.to_dict(), "logit_softcap": bad})


# --------------------------------------------------------------------------- the soft-capped fused loss
CAP = 5.0
PROFILES = list(device.PROFILES.values())


def capped_loss(h: mx.array, w: mx.array, y: mx.array, cap: float = CAP) -> mx.array:
    return nn.losses.cross_entropy(cap * mx.tanh((h @ w.T) / cap), y).mean()


def random_head(n: int, vocab: int = 1000, dtype: mx.Dtype = mx.float32, seed: int = 0):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    h = (mx.random.normal((n, 48), key=k1) * 2).astype(dtype)
    w = mx.random.normal((vocab, 48), key=k2).astype(dtype)  # logits spread ~15: the cap of 5 bites
    return h, w, mx.random.randint(0, vocab, (n,), key=k3).astype(mx.int32)


LOSS_CASES = [(None, None)] + [(p, rows) for p in PROFILES for rows in (None, 7)]


@pytest.mark.parametrize("profile, rows", LOSS_CASES,
                         ids=[f"{p.name if p else 'bound'}-rows{rows or 'default'}" for p, rows in LOSS_CASES])
def test_softcapped_fused_loss_equals_plain(profile: device.Profile | None, rows: int | None):
    """Loss and both gradients for N = 300 rows (not a multiple of any chunk size), float32; profile None:
    the module-level kernels the trainer calls."""
    k = kernels.for_profile(replace(profile, loss_rows=rows) if rows else profile) if profile else kernels
    h, w, y = random_head(300)
    ref, (ref_dh, ref_dw) = mx.value_and_grad(capped_loss, argnums=(0, 1))(h, w, y)
    assert abs(ref.item() - nn.losses.cross_entropy(h @ w.T, y).mean().item()) > 0.1  # the cap matters
    np.testing.assert_allclose(k.eval_cross_entropy(h, w, y, CAP).item(), ref.item(), rtol=1e-5)
    train = lambda h, w, y: k.cross_entropy(h, w, y, CAP)  # noqa: E731
    for fn in (train, mx.compile(train)):
        loss, (dh, dw) = mx.value_and_grad(fn, argnums=(0, 1))(h, w, y)
        np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-5)
        np.testing.assert_allclose(np.array(dh), np.array(ref_dh), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(dw), np.array(ref_dw), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(mx.grad(train)(h, w, y)), np.array(ref_dh), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("profile", PROFILES, ids=[p.name for p in PROFILES])
def test_softcapped_bfloat16_loss_is_close(profile: device.Profile):
    """bf16 matmuls, float32 cap and reductions: near the float32 graph of the same bf16 values."""
    k = kernels.for_profile(replace(profile, loss_rows=100))
    h, w, y = random_head(300, dtype=mx.bfloat16, seed=5)
    value, (dh, dw) = mx.value_and_grad(lambda h, w, y: k.cross_entropy(h, w, y, CAP), argnums=(0, 1))(h, w, y)
    ref, (ref_dh, ref_dw) = mx.value_and_grad(capped_loss, argnums=(0, 1))(h.astype(mx.float32),
                                                                           w.astype(mx.float32), y)
    assert value.dtype == mx.float32 and dh.dtype == mx.bfloat16 and dw.dtype == mx.bfloat16
    np.testing.assert_allclose(value.item(), ref.item(), rtol=2e-2)
    np.testing.assert_allclose(k.eval_cross_entropy(h, w, y, CAP).item(), ref.item(), rtol=2e-2)
    for got, want in ((dh, ref_dh), (dw, ref_dw)):
        got, want = np.array(got.astype(mx.float32)), np.array(want)
        assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


def test_model_loss_uses_the_cap():
    """The trainer's loss (fused, on hidden states and head_weight) equals the loss of the model's capped logits."""
    model, _ = random_model(**SPEEDRUN.model)
    idx, y = mx.array(tokens(seed=1)), mx.array(tokens(seed=2))
    ref = nn.losses.cross_entropy(model(idx), y).mean().item()
    fused = kernels.cross_entropy(model.hidden(idx), model.head_weight, y, model.config.logit_softcap).item()
    np.testing.assert_allclose(fused, ref, rtol=1e-5)


@pytest.mark.parametrize("cap, scale", [(15.0, 1.0), (15.0, 100.0), (60.0, 100.0)],
                         ids=["cap15", "cap15-huge-logits", "cap60-row-max"])
def test_softcapped_loss_bound_and_row_max(cap: float, scale: float):
    """Caps up to MAX_BOUND_CAP use c as the row bound, larger ones the row max: both equal the plain capped
    loss, also where every raw logit is far below -c or above c (the cap saturates)."""
    assert (cap <= MAX_BOUND_CAP) == (cap == 15.0)
    h, w, y = random_head(200, seed=3)
    negative = (-mx.ones_like(h) * scale / 10, mx.abs(w))  # every logit ~ -4 * scale
    for h, w in ((h * scale, w), negative):
        ref, (ref_dh, ref_dw) = mx.value_and_grad(lambda *a: capped_loss(*a, cap), argnums=(0, 1))(h, w, y)
        loss, (dh, dw) = mx.value_and_grad(lambda *a: kernels.cross_entropy(*a, cap), argnums=(0, 1))(h, w, y)
        assert np.isfinite(loss.item())
        np.testing.assert_allclose(loss.item(), ref.item(), rtol=1e-5)
        np.testing.assert_allclose(kernels.eval_cross_entropy(h, w, y, cap).item(), ref.item(), rtol=1e-5)
        np.testing.assert_allclose(np.array(dh), np.array(ref_dh), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(dw), np.array(ref_dw), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("init, std", [("gpt2", 0.02), ("speedrun", 1.0)])
def test_value_embeds_and_unet_init(init: str, std: float):
    """Value tables start like wte; each mixing weight at the speedrun's start: ve_lambda (0.5, 0.5), skips 1."""
    cfg = GPTConfig(block_size=64, vocab_size=300, n_layer=4, n_head=4, n_embd=64, value_embeds=1, unet=True,
                    init=init, tie_embeddings=init == "gpt2")
    params = {k: np.array(v) for k, v in GPT(cfg, seed=0).parameters_flat()}
    assert abs(params["ve.0.weight"].std() - std) < 0.05 * std
    assert sorted(k for k in params if "ve_lambda" in k) == ["h.0.attn.ve_lambda", "h.3.attn.ve_lambda"]
    assert all(np.all(params[k] == 0.5) for k in params if "ve_lambda" in k)
    np.testing.assert_array_equal(params["skip_weights"], np.ones(2))


@pytest.mark.parametrize("switches", [{}, SPEEDRUN.model, dict(SPEEDRUN.model, value_embeds=2, unet=True),
                                      dict(bias=False, norm="rmsnorm", embed_norm=True)],
                         ids=["gpt2", "speedrun", "speedrun_skips", "mixed"])
def test_memory_estimate_counts_every_parameter(switches: dict):
    cfg = GPTConfig(**{**SIZES, "n_layer": 4, **switches})
    assert memory.estimate(cfg, 2, 16, "float32").params == GPT(cfg).num_params()
