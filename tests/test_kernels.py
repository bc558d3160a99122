"""Every device profile's kernels against plain MLX references (profiles forced on the CPU): cpu_math.py's
multiply-add exp/softmax/GELU, attention (in blocks of queries, recomputing, the profile's choice), the
fused head + loss at CPU and GPU chunk sizes and dtypes, activation checkpointing, and an import under a GPU
profile that loads no CPU machinery."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nanogpt_mlx import GPT, GPTConfig, cpu, cpu_math, device, kernels, memory
from nanogpt_mlx.loss import make_losses

PROFILES = list(device.PROFILES.values())
ids = [p.name for p in PROFILES]


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def maybe_compile(request):
    return mx.compile if request.param else (lambda f: f)


# ---------------------------------------------------------------------- cpu_math.py's math
def test_exp_is_accurate_to_float32_rounding(maybe_compile):
    z = mx.concatenate([mx.linspace(-63.99, 0, 200001), mx.array([-1e-30, 0.0])])
    got = np.array(maybe_compile(cpu_math.exp)(z), dtype=np.float64)
    rel = np.abs(got / np.exp(np.array(z, dtype=np.float64)) - 1)
    assert rel.max() < 2e-7  # ~1.7 ulp; without the polynomial's last term 3.3
    assert got[-1] == 1.0
    # 0 from -64 down (below 1.6e-28, nothing next to the 1 each caller adds): products of the ~1e-38 that the clamp
    # alone gave, or of exp(-80)-sized results, are denormal, and some x86 CPUs take a microcode assist for each
    far = maybe_compile(cpu_math.exp)(mx.array([-mx.inf, -1e30, -87.3, -64.0, -63.99]))
    assert far.tolist()[:4] == [0.0, 0.0, 0.0, 0.0] and far[4].item() == pytest.approx(math.exp(-63.99), rel=3e-7)
    np.testing.assert_allclose(np.array(mx.grad(lambda x: cpu_math.exp(x).sum())(z[:100])),
                               np.exp(np.array(z[:100])), rtol=3e-7)


@pytest.mark.parametrize("profile", PROFILES, ids=ids)
def test_gelu_survives_extreme_inputs(profile):
    """The MLP's GELU gradient is 0 and 1 far out (nn.gelu_approx's is nan at +-1e20)."""
    k = kernels.for_profile(profile)
    x = mx.array([-1e20, 1e20, 0.0])
    grad = mx.grad(lambda x: k.activation_matmul("gelu", x, mx.eye(3)).sum())(x)
    np.testing.assert_allclose(grad.tolist(), [0.0, 1.0, 0.5], atol=1e-30)
    np.testing.assert_allclose(mx.grad(lambda x: cpu_math.gelu(x).sum())(x).tolist(), [0.0, 1.0, 0.5], atol=1e-30)


def test_forward_mode_derivatives_of_the_cpu_math_are_right():
    """mx.jvp went through exp's bit casts (NaN at -inf) and GELU's polynomial (wrong slopes): each has its own
    forward rule now, and a model's jvp equals its gradient's product with the direction."""
    x = mx.array([-mx.inf, -70.0, -1.0, -0.1, 0.0])
    np.testing.assert_allclose(mx.jvp(cpu_math.exp, [x], [mx.ones_like(x)])[1][0].tolist(),
                               [0.0, 0.0, math.exp(-1), math.exp(-0.1), 1.0], rtol=3e-7)
    g, t = mx.array([-3.0, -1.0, -0.1, 0.5, 3.0]), mx.array([1.0, 2.0, 1.0, -1.0, 1.0])
    np.testing.assert_allclose(mx.jvp(cpu_math.gelu, [g], [t])[1][0].tolist(),
                               mx.vjp(kernels.mlx_gelu, [g], [t])[1][0].tolist(), rtol=1e-5, atol=1e-7)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64), seed=0)
    x, w = mx.array([[1, 2, 3, 4, 5, 6]]), model.wte.weight
    d = mx.random.normal(w.shape, key=mx.random.key(1))

    def logits_sum(weight: mx.array) -> mx.array:
        model.wte.weight = weight
        return model(x).sum()

    directional = mx.jvp(logits_sum, [w], [d])[1][0].item()
    assert math.isfinite(directional)
    assert directional == pytest.approx((mx.grad(logits_sum)(w) * d).sum().item(), rel=1e-4)


# --------------------------------------------------------------------------- every profile
def reference_attention(q, k, v, scale, causal):
    s = (q * scale) @ k.swapaxes(-1, -2)
    if causal:
        T, S = s.shape[-2:]
        s = mx.where(mx.arange(S) <= mx.arange(S - T, S)[:, None], s, -mx.inf)
    return mx.softmax(s, axis=-1) @ v


@pytest.mark.parametrize("profile", PROFILES, ids=ids)
@pytest.mark.parametrize("T, S", [(7, 7), (1, 9), (3, 9)])  # full causal, one cached query, a cached prefix
def test_attention_equals_reference(profile, T, S):
    k1, k2, k3, k4 = mx.random.split(mx.random.key(T * S), 4)
    q = mx.random.normal((2, 3, T, 8), key=k1)
    k, v = mx.random.normal((2, 3, S, 8), key=k2), mx.random.normal((2, 3, S, 8), key=k3)
    cot = mx.random.normal((2, 3, T, 8), key=k4)
    attention = kernels.for_profile(profile).attention

    def run(fn):
        return mx.vjp(lambda q, k, v: fn(q, k, v, scale=0.35, causal=T > 1), [q, k, v], [cot])

    (ref,), ref_grads = run(reference_attention)
    (got,), grads = run(attention)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("profile", PROFILES, ids=ids)
def test_gelu_exp_square_sum_equal_reference(profile, maybe_compile):
    k = kernels.for_profile(profile)
    x = mx.linspace(-12, 12, 10001)
    np.testing.assert_allclose(np.array(maybe_compile(k.gelu)(x)), np.array(nn.gelu_approx(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(mx.grad(lambda x: k.gelu(x).sum())(x)),
                               np.array(mx.grad(lambda x: nn.gelu_approx(x).sum())(x)), rtol=1e-5, atol=3e-6)
    z = mx.linspace(-80, 0, 1001)
    z64 = np.array(z, dtype=np.float64)
    # MLX's own: ~4e-6; cpu_math.py's is 0 from -64 down (2e-28 next to the 1 each caller adds)
    np.testing.assert_allclose(np.array(maybe_compile(k.exp)(z)), np.exp(z64), rtol=5e-6, atol=2e-28)
    g = mx.random.normal((3, 7, 256), key=mx.random.key(5))
    np.testing.assert_allclose(maybe_compile(k.square_sum)(g).item(), np.square(np.array(g, np.float64)).sum(), rtol=1e-5)
    half = g.astype(mx.bfloat16)  # (not a BLAS dot product on a CPU profile: in MLX ops)
    got = maybe_compile(k.square_sum)(half)
    assert got.dtype == mx.bfloat16
    np.testing.assert_allclose(got.item(), np.square(np.array(half.astype(mx.float32), np.float64)).sum(), rtol=1e-2)


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.cpu_backend], ids=lambda p: p.name)
def test_square_sum_of_a_bucket_is_accurate_on_cpus(profile):
    """Clipping's norm over an 8M-number bucket (optim.Packing): MLX's CPU sum, one number after another, is 0.6%
    low there; the CPU profiles take a BLAS dot product."""
    if cpu.blas == "bundled":  # (a GPU profile's process, where cpu.py came after mlx.core: the reference BLAS)
        pytest.skip("MLX's bundled reference BLAS adds one number after another too")
    g = mx.random.normal((2**23,), key=mx.random.key(7)) * 3e-4
    ref = np.square(np.array(g, np.float64)).sum()
    np.testing.assert_allclose(kernels.for_profile(profile).square_sum(g).item(), ref, rtol=1e-4)


ATTENTION_KINDS = {"plain, MLX ops": lambda block: kernels.plain_attention(block=block),
                   "plain, cpu_math.py ops": lambda block: kernels.plain_attention(cpu_math.exp, cpu_math.row_max,
                                                                                   cpu_math.row_sum, block),
                   "recomputing": lambda block: partial(kernels.recomputing_attention, block=block)}


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_attention_backwards_compiled_equal_reference(kind, dtype):
    """The written-out backwards, compiled, in both dtypes (float32 softmax inside), over 4 blocks of queries."""
    k1, k2, k3, k4 = mx.random.split(mx.random.key(3), 4)
    q, k, v, cot = (mx.random.normal((2, 4, 64, 16), key=key) for key in (k1, k2, k3, k4))

    def loss(fn, q, k, v):
        return (fn(q, k, v, scale=0.25, causal=True).astype(mx.float32) * cot).sum()

    ref = mx.grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
    got = mx.compile(mx.grad(lambda *a: loss(ATTENTION_KINDS[kind](16), *a), argnums=(0, 1, 2)))(
        *(a.astype(dtype) for a in (q, k, v)))
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        scale = np.abs(np.array(r)).max()
        np.testing.assert_allclose(np.array(g.astype(mx.float32)) / scale, np.array(r) / scale, atol=tol)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_attention_masked_keys_get_exactly_zero(kind):
    """The first query sees only the first key: the other keys' and values' gradients are exactly 0, not the
    denormal-breeding ~1e-38 of a clamped exp (compiled, within one block of queries and across blocks)."""
    q, k, v = (mx.random.normal((1, 2, 32, 16), key=mx.random.key(i)) for i in range(3))
    dk, dv = mx.compile(mx.grad(lambda q, k, v: ATTENTION_KINDS[kind](16)(q, k, v, 0.25, True)[:, :, 0].sum(),
                                argnums=(1, 2)))(q, k, v)
    assert np.all(np.array(dk) == 0) and np.all(np.array(dv)[:, :, 1:] == 0)  # (one key: its softmax is 1)
    assert np.all(np.array(dv)[:, :, 0] == 1)


@pytest.mark.parametrize("T", [100, 128, 200])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_padded_attention_equals_reference(T, dtype):
    """Causal self-attention padded to whole tiles of 128 queries for cuDNN's backward: the same values and
    gradients as without padding (compiled; on the CPU MLX's unfused graph stands in for cuDNN)."""
    k1, k2, k3, k4 = mx.random.split(mx.random.key(T), 4)
    q, k, v, cot = (mx.random.normal((2, 3, T, 16), key=key) for key in (k1, k2, k3, k4))

    def run(fn, *qkv):
        return mx.vjp(lambda q, k, v: [fn(q, k, v, scale=0.25, causal=True)], list(qkv), [cot.astype(qkv[0].dtype)])

    (ref,), ref_grads = run(reference_attention, q, k, v)
    (got,), grads = mx.compile(lambda *a: run(kernels.padded_attention, *a))(*(a.astype(dtype) for a in (q, k, v)))
    assert got.shape == (2, 3, T, 16)
    tol = 1e-5 if dtype == mx.float32 else 3e-2
    for g, r in zip([got, *grads], [ref, *ref_grads]):
        scale = np.abs(np.array(r)).max()
        np.testing.assert_allclose(np.array(g.astype(mx.float32)) / scale, np.array(r) / scale, atol=tol)


@pytest.mark.parametrize("T, padded", [(1, 128), (130, 256), (256, 256)])
def test_padded_attention_hands_mlx_whole_tiles(monkeypatch, T, padded):
    """What MLX's kernel gets is T rounded up to whole tiles (cuDNN's backward takes nothing else)."""
    seen = []
    mlx_attention = kernels.mlx_attention
    monkeypatch.setattr(kernels, "mlx_attention", lambda q, *a: seen.append(q.shape[2]) or mlx_attention(q, *a))
    q = mx.zeros((1, 2, T, 16))
    assert kernels.padded_attention(q, q, q, 0.25, True).shape == q.shape and seen == [padded]


def test_a_sum_of_bfloat16_prefixes_adds_in_float32():
    """The recomputing backward's dK / dV blocks summed in float32: 256 + 1 + 1 is 258 in bf16, where bf16
    additions one at a time round each 257 back to 256."""
    parts = [mx.full((1, 1, n, 1), value, dtype=mx.bfloat16) for n, value in ((3, 256.0), (2, 1.0), (1, 1.0))]
    total = kernels._sum_prefixes(parts)
    assert total.dtype == mx.bfloat16 and total[0, 0, :, 0].tolist() == [258.0, 256.0, 256.0]


def test_a_sum_of_prefixes_equals_the_padded_sum():
    """Parts of any lengths in any order (the longest covering all): each position sums the parts that reach it."""
    lengths = (5, 2, 7, 2, 4)
    parts = [mx.random.normal((2, 3, n, 4), key=mx.random.key(n + 10 * i)) for i, n in enumerate(lengths)]
    padded = [np.pad(np.array(p), [(0, 0), (0, 0), (0, 7 - p.shape[2]), (0, 0)]) for p in parts]
    np.testing.assert_allclose(np.array(kernels._sum_prefixes(parts)), sum(padded), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
@pytest.mark.parametrize("T, S, causal", [(10, 10, True), (7, 7, True), (6, 11, True), (4, 4, True), (7, 9, False)])
def test_attention_in_blocks_of_queries_equals_reference(kind, T, S, causal, maybe_compile):
    """Blocks of 4 queries: several blocks, a short last one, cached keys before the queries, one block, no mask."""
    k1, k2, k3, k4 = mx.random.split(mx.random.key(T * S), 4)
    q, cot = mx.random.normal((2, 3, T, 8), key=k1), mx.random.normal((2, 3, T, 8), key=k4)
    k, v = mx.random.normal((2, 3, S, 8), key=k2), mx.random.normal((2, 3, S, 8), key=k3)
    attention = ATTENTION_KINDS[kind](4)

    def run(fn, q, k, v, cot):
        return mx.vjp(lambda q, k, v: fn(q, k, v, scale=0.35, causal=causal), [q, k, v], [cot])

    (ref,), ref_grads = run(reference_attention, q, k, v, cot)
    (got,), grads = maybe_compile(partial(run, attention))(q, k, v, cot)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("has_kernel", [True, False, "old mlx"])
def test_recomputing_attention_forces_the_fused_forward_where_there_is_one(monkeypatch, has_kernel):
    """Inside a gradient trace MLX's Metal backend would pick its unfused graph; the recomputing attention asks for
    the fused kernel, and takes MLX's own choice where there is none (MLX raises ValueError as it builds) or where
    MLX predates force_fused (TypeError)."""
    real, calls = mx.fast.scaled_dot_product_attention, []

    def sdpa(*args, force_fused: bool = False, **kwargs):
        calls.append(force_fused)
        if force_fused and has_kernel == "old mlx":
            raise TypeError("scaled_dot_product_attention(): incompatible function arguments")
        if force_fused and not has_kernel:
            raise ValueError("[scaled_dot_product_attention] force_fused=True but no fused kernel is available")
        return real(*args, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", sdpa)
    q, k, v, cot = (mx.random.normal((1, 2, 6, 8), key=mx.random.key(i)) for i in range(4))
    run = lambda fn: mx.vjp(lambda q, k, v: fn(q, k, v, scale=0.35, causal=True), [q, k, v], [cot])  # noqa: E731
    (got,), grads = run(kernels.recomputing_attention)
    assert calls == ([True] if has_kernel is True else [True, False])
    (ref,), ref_grads = run(reference_attention)
    for g, r in zip([got, *grads], [ref, *ref_grads]):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4, atol=1e-6)
    calls.clear()
    kernels.mlx_attention(q, k, v, 0.35, True)  # evaluation and decoding: MLX's choice
    assert calls == [False]


def test_query_blocks_cover_the_queries_and_skip_masked_keys():
    blocks = kernels.query_blocks(1000, 1000, causal=True, block=128)
    assert [b[0] for b in blocks] == list(range(0, 1000, 128)) and blocks[-1] == (896, 1000, 1000)
    assert all(end == j for _, j, end in blocks)  # a block sees the keys up to its last query
    area = sum((j - i) * end for i, j, end in blocks)
    assert area / 1000**2 == pytest.approx(0.56, abs=0.01)  # (n + 1) / 2n of the T x T work for n = 8 blocks
    assert kernels.query_blocks(3, 9, causal=True, block=2) == [(0, 2, 8), (2, 3, 9)]  # 6 cached keys first
    assert kernels.query_blocks(300, 400, causal=False) == [(0, 300, 400)]


@pytest.mark.parametrize("profile, dtype, head_dim, T, expected", [
    ("cuda", mx.bfloat16, 64, 256, "mlx"), ("cuda", mx.float16, 128, 128, "mlx"),
    ("cuda", mx.bfloat16, 64, 200, "padded"),  # cuDNN's backward needs whole tiles of 128 queries
    ("cuda", mx.float32, 64, 256, "plain"), ("cuda", mx.bfloat16, 12, 256, "plain"), ("cuda", mx.float32, 64, 1, "mlx"),
    ("metal", mx.float32, 64, 256, "recomputing"), ("metal", mx.bfloat16, 64, 1, "mlx"),
    ("cpu-x86", mx.float32, 64, 256, "plain"), ("cpu-x86", mx.float32, 64, 1, "mlx"),
    ("cpu-arm", mx.float32, 64, 256, "plain"), ("cpu-arm", mx.bfloat16, 64, 1, "mlx")])
def test_profile_attention_takes_the_kernel_the_profile_decides(monkeypatch, profile, dtype, head_dim, T, expected):
    calls = []
    monkeypatch.setattr(kernels, "mlx_attention", lambda *a: calls.append("mlx"))
    monkeypatch.setattr(kernels, "recomputing_attention", lambda *a: calls.append("recomputing"))
    monkeypatch.setattr(kernels, "padded_attention", lambda *a: calls.append("padded"))
    attention = kernels.profile_attention(device.PROFILES[profile], lambda *a: calls.append("plain"))
    q = mx.zeros((1, 2, T, head_dim), dtype)
    attention(q, q, q, 0.1, True)
    assert calls == [expected]
    if expected == "padded":  # after cached keys padding would move the causal mask: cuDNN's forward only
        attention(q, mx.zeros((1, 2, T + 50, head_dim), dtype), mx.zeros((1, 2, T + 50, head_dim), dtype), 0.1, True)
        assert calls == [expected, "recomputing"]
    if T > 1:  # the training log's note says when attention is not fused both ways (on a CPU plain is the best)
        note = device.PROFILES[profile].attention_note(str(dtype).rpartition(".")[2], head_dim, T)
        assert (note is None) == (expected == "mlx" or profile.startswith("cpu"))


def test_the_training_logs_notes_say_what_attention_and_dtype_cost():
    """Padding T = 1000 to 1024 costs (1024 / 1000)^2 - 1 = 4.9% more attention work; bfloat16 is slow only on a
    CPU backend."""
    note = device.PROFILES["cuda"].attention_note("bfloat16", 64, 1000)
    assert "pads seq_len 1000 to 1024" in note and "5% more attention work" in note
    for name, profile in device.PROFILES.items():
        assert (profile.dtype_note("bfloat16") is None) == (not name.startswith("cpu")), name
        assert profile.dtype_note("float32") is None


def body_step_peak(config: GPTConfig, dtype: mx.Dtype = mx.float32, seq: int = 128, batch: int = 4) -> int:
    """Peak memory above what was live of a compiled forward + backward of the model's blocks (no head), run op by
    op (memory.start_measuring) so that the peak is what the step keeps, not how far the host queued ahead."""
    model = GPT(config, seed=0)
    model.set_dtype(dtype)
    x = mx.random.randint(0, config.vocab_size, (batch, seq), key=mx.random.key(0))
    body = nn.value_and_grad(model, lambda m: m.hidden(x).astype(mx.float32).square().mean())
    step = mx.compile(lambda: body(model), inputs=[model.state], outputs=[model.state])
    mx.eval(step())
    before = mx.get_memory_limit()
    try:
        base = mx.get_active_memory()
        memory.start_measuring()
        mx.eval(step())
        return mx.get_peak_memory() - base
    finally:
        mx.set_memory_limit(before)


def test_recomputing_attention_keeps_no_scores(monkeypatch):
    """Where MLX has no fused attention backward (Metal), a compiled step keeps no layer's T x T arrays."""
    def peak(attention) -> int:
        monkeypatch.setattr(kernels, "attention", attention)
        return body_step_peak(GPTConfig(n_layer=6, n_head=4, n_embd=128, vocab_size=256, block_size=256), seq=256)

    new, old = peak(kernels.recomputing_attention), peak(kernels.mlx_attention)
    scores = 6 * 4 * 4 * 256 * 256 * 4  # one float32 T x T array per layer
    print(f"peak {new / 1e6:.1f} MB against {old / 1e6:.1f} MB with autodiff")
    assert old - new > 0.8 * scores


def test_plain_attention_in_blocks_keeps_less(monkeypatch):
    """Plain attention (the x86 CPU, float32 on CUDA) in blocks of 128 queries: a compiled step of 6 layers at
    T = 512 keeps 5/8 of each layer's probabilities instead of all of them."""
    def peak(block: int) -> int:
        monkeypatch.setattr(kernels, "attention", kernels.plain_attention(block=block))
        return body_step_peak(GPTConfig(n_layer=6, n_head=4, n_embd=128, vocab_size=256, block_size=512), seq=512)

    blocked, whole = peak(128), peak(512)
    saved = 6 * 4 * 4 * 512 * 512 * 4 * (1 - 5 / 8)  # 4 heads x batch 4 float32 T x T per layer, 3/8 of it
    print(f"peak {blocked / 1e6:.1f} MB in blocks of 128 against {whole / 1e6:.1f} MB in one")
    assert whole - blocked > 0.7 * saved


def plain_loss(h, w, y, softcap: float = 0.0):
    logits = h @ w.T
    return nn.losses.cross_entropy(softcap * mx.tanh(logits / softcap) if softcap else logits, y, reduction="mean")


def random_head(n: int, vocab: int, dtype=mx.float32, seed: int = 0):
    k1, k2, k3 = mx.random.split(mx.random.key(seed + n), 3)
    h = (mx.random.normal((n, 48), key=k1) * 2).astype(dtype)
    w = mx.random.normal((vocab, 48), key=k2).astype(dtype)  # logits with a spread of ~15: exp far from 0
    y = mx.random.randint(0, vocab, (n,), key=k3).astype(mx.int32)
    return h, w, y


@pytest.mark.parametrize("profile", PROFILES, ids=ids)
@pytest.mark.parametrize("n, rows", [(1, None), (300, None), (300, 128), (256, 128), (300, 7), (1100, 100)])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["scaled-gradient", "softcap"])
def test_fused_head_loss_equals_plain_cross_entropy(profile, n, rows, softcap):
    """Float32: loss and both gradients, at the profile's chunk size and at sizes that do not divide n or V, in one
    group of gradient GEMMs and in several (n > loss.GEMM_ROWS); the GEMMs scale the gradient, with a soft-cap
    its slope times the exp."""
    k = kernels.for_profile(replace(profile, loss_rows=rows) if rows else profile)
    h, w, y = random_head(n, 1000)
    capped = lambda h, w, y: plain_loss(h, w, y, softcap)  # noqa: E731
    ref_loss, (ref_dh, ref_dw) = mx.value_and_grad(capped, argnums=(0, 1))(h, w, y)
    np.testing.assert_allclose(k.eval_cross_entropy(h, w, y, softcap).item(), ref_loss.item(), rtol=1e-5)
    for fn in (k.cross_entropy, mx.compile(k.cross_entropy)):
        got_loss, (dh, dw) = mx.value_and_grad(lambda h, w: fn(h, w, y, softcap), argnums=(0, 1))(h, w)
        np.testing.assert_allclose(got_loss.item(), ref_loss.item(), rtol=1e-5)
        np.testing.assert_allclose(np.array(dh), np.array(ref_dh), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(dw), np.array(ref_dw), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("profile", PROFILES, ids=ids)
def test_bfloat16_head_loss_is_float32_and_close(profile):
    """bf16 matmuls, float32 reductions: a float32 loss near the float32 graph of the same bf16 values,
    gradients in bf16 within bf16 rounding."""
    k = kernels.for_profile(replace(profile, loss_rows=100))
    h, w, y = random_head(1100, 1000, mx.bfloat16, seed=5)  # several groups of gradient GEMMs
    value, (dh, dw) = mx.value_and_grad(k.cross_entropy, argnums=(0, 1))(h, w, y)
    ref, (ref_dh, ref_dw) = mx.value_and_grad(plain_loss, argnums=(0, 1))(h.astype(mx.float32), w.astype(mx.float32), y)
    assert value.dtype == mx.float32 and dh.dtype == mx.bfloat16 and dw.dtype == mx.bfloat16
    np.testing.assert_allclose(value.item(), ref.item(), rtol=2e-2)  # logits rounded to bf16 by the matmul
    for got, want in ((dh, ref_dh), (dw, ref_dw)):
        got, want = np.array(got.astype(mx.float32)), np.array(want)
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # d @ w sums bf16-rounded terms


def test_bfloat16_weight_gradient_sums_its_groups_in_float32():
    """64 groups of 512 rows each add a bf16 product into dw: summed in float32, as one GEMM over all rows would,
    dw is ~0.36% from the float32 graph's on average (summed in bf16, ~0.75%)."""
    k = kernels.for_profile(replace(device.PROFILES["metal"], loss_rows=256))
    h, w, y = random_head(32768, 256, mx.bfloat16, seed=2)
    dw = np.array(mx.grad(k.cross_entropy, argnums=1)(h, w, y).astype(mx.float32))
    want = np.array(mx.grad(plain_loss, argnums=1)(h.astype(mx.float32), w.astype(mx.float32), y))
    assert np.abs(dw - want).mean() / np.abs(want).mean() < 0.0055


def reference_rowwise(logits: mx.array, y: mx.array, softcap: float, n: int) -> tuple[mx.array, mx.array]:
    """cuda.py's kernel contract in plain float32 MLX ops: per-row loss, (softmax - onehot) / n through the cap."""
    z = logits.astype(mx.float32)
    if softcap:
        z = softcap * mx.tanh(z / softcap)
    lse = mx.logsumexp(z, axis=-1)
    d = (mx.exp(z - lse[:, None]) - (mx.arange(z.shape[1]) == y[:, None])) / n
    if softcap:
        d = d * (1 - mx.square(z / softcap))
    return lse - mx.take_along_axis(z, y[:, None], axis=-1)[:, 0], d.astype(logits.dtype)


@pytest.mark.parametrize("n, rows", [(300, 0), (300, 128), (300, 7), (1100, 300)])
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_device_rowwise_kernel_path_equals_plain_cross_entropy(n, rows, softcap):
    """The path a device kernel takes (all rows at once, chunks that do not divide n, several groups of gradient
    GEMMs): loss and gradients."""
    train_loss, eval_loss = make_losses(rows, rowwise=reference_rowwise)
    h, w, y = random_head(n, 1000)
    capped = lambda h, w, y: plain_loss(h, w, y, softcap)  # noqa: E731
    ref_loss, (ref_dh, ref_dw) = mx.value_and_grad(capped, argnums=(0, 1))(h, w, y)
    np.testing.assert_allclose(eval_loss(h, w, y, softcap).item(), ref_loss.item(), rtol=1e-5)
    got_loss, (dh, dw) = mx.value_and_grad(mx.compile(lambda h, w: train_loss(h, w, y, softcap)), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(got_loss.item(), ref_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(dh), np.array(ref_dh), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(dw), np.array(ref_dw), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rowwise", [None, reference_rowwise], ids=["mlx-ops", "device-kernel-path"])
def test_head_loss_holds_one_chunk_of_logits_at_a_time(rowwise):
    """Run op by op (nothing queued ahead: memory.start_measuring), the compiled head + loss and its gradients over
    4096 rows need less than half of one float32 N x V array above what was live: chunk after chunk (mx.depends),
    never all rows' logits or gradients at once."""
    train_loss, _ = make_losses(512, rowwise=rowwise)
    h, w, y = random_head(4096, 8192)
    step = mx.compile(mx.value_and_grad(train_loss, argnums=(0, 1)))
    mx.eval(step(h, w, y))
    before = mx.get_memory_limit()
    try:
        base = mx.get_active_memory()
        memory.start_measuring()
        mx.eval(step(h, w, y))
        need = mx.get_peak_memory() - base
    finally:
        mx.set_memory_limit(before)
    print(f"\nneed {need / 1e6:.0f} MB above live; one float32 N x V array: {4096 * 8192 * 4 / 1e6:.0f} MB")
    assert need < 0.5 * 4096 * 8192 * 4


def test_loss_gradient_follows_the_cotangent_and_batch_shape():
    train_loss, _ = make_losses(rows=4)
    h = mx.random.normal((2, 5, 16), key=mx.random.key(0))
    w = mx.random.normal((50, 16), key=mx.random.key(1))
    y = mx.random.randint(0, 50, (2, 5), key=mx.random.key(2)).astype(mx.int32)
    dh = mx.grad(lambda h: 3 * train_loss(h, w, y))(h)
    ref = mx.grad(lambda h: 3 * plain_loss(h.reshape(10, 16), w, y.reshape(10)))(h)
    assert dh.shape == h.shape
    np.testing.assert_allclose(np.array(dh), np.array(ref), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- linear layers
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_linear_equals_autodiff_with_its_weight_gradient_in_the_weights_layout(bias, dtype, maybe_compile):
    keys = mx.random.split(mx.random.key(0), 4)
    x = mx.random.normal((2, 5, 16), key=keys[0]).astype(dtype)
    w = mx.random.normal((24, 16), key=keys[1]).astype(dtype)
    b = mx.random.normal((24,), key=keys[2]).astype(dtype) if bias else None
    ct = mx.random.normal((2, 5, 24), key=keys[3]).astype(dtype)

    def ref(x, w, b):
        return x @ w.T if b is None else x @ w.T + b

    args, argnums = (x, w, b), (0, 1, 2) if bias else (0, 1)
    got = maybe_compile(mx.value_and_grad(lambda *a: (kernels.linear(*a) * ct).sum(), argnums=argnums))(*args)
    want = mx.value_and_grad(lambda *a: (ref(*a) * ct).sum(), argnums=argnums)(*args)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == mx.float32 else dict(rtol=2e-2, atol=2e-2)
    for g, r in zip([got[0], *got[1]], [want[0], *want[1]]):
        assert g.dtype == r.dtype and g.shape == r.shape
        np.testing.assert_allclose(np.array(g.astype(mx.float32)), np.array(r.astype(mx.float32)), **tol)
    dw = got[1][1]
    assert memoryview(dw).strides == (16 * dw.itemsize, dw.itemsize)  # row-major, not autodiff's transposed view
    assert memoryview(want[1][1]).strides != memoryview(dw).strides  # (what autodiff gives)


# --------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("switches", [{}, dict(n_layer=4, value_embeds=2, unet=True, mlp="relu2")],
                         ids=["gpt2", "value_embeds_unet_relu2"])
@pytest.mark.parametrize("profile", PROFILES, ids=ids)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(switches: dict, profile, monkeypatch):
    """Also for blocks that take a value embedding (its table's gradient flows through the checkpoint), and with
    every profile's kernels (their custom backwards nested in the checkpoint's)."""
    bound = kernels.for_profile(profile)
    for name in ("attention", "activation_matmul", "cross_entropy"):
        monkeypatch.setattr(kernels, name, getattr(bound, name))
    model = GPT(GPTConfig(**{**dict(block_size=32, vocab_size=300, n_layer=3, n_head=2, n_embd=32), **switches}), seed=0)
    x = mx.random.randint(0, 300, (2, 32), key=mx.random.key(1))
    y = mx.random.randint(0, 300, (2, 32), key=mx.random.key(2))
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: kernels.cross_entropy(m.hidden(x), m.head_weight, y))
    results = []
    for flag in (False, True):
        model.checkpoint_blocks = flag
        results.append(loss_and_grad(model, x, y))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(l0.item(), l1.item(), rtol=1e-6)
    from mlx.utils import tree_flatten

    assert all(np.abs(np.array(g)).max() > 0 for name, g in tree_flatten(g0) if name.startswith("ve."))
    for (name, a), (_, b) in zip(tree_flatten(g0), tree_flatten(g1)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7, err_msg=name)


def test_activation_checkpointing_of_frozen_blocks_and_of_a_module_without_weights():
    """A block's lone input (its weights frozen) reached the checkpoint's backward bare, and was split into rows."""
    from nanogpt_mlx.model import checkpoint

    x = mx.random.normal((2, 3), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(mx.grad(lambda a: checkpoint(nn.GELU())(a).sum())(x)),
                               np.array(mx.grad(lambda a: nn.GELU()(a).sum())(x)), rtol=1e-6)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32), seed=0)
    for block in model.h:
        block.freeze()
    ids = mx.array([[1, 2, 3, 4]])
    results = []
    for flag in (False, True):
        model.checkpoint_blocks = flag
        results.append(nn.value_and_grad(model, lambda m, x, y: m.loss(x, y))(model, ids, ids))
    (l0, g0), (l1, g1) = results
    assert l0.item() == pytest.approx(l1.item(), rel=1e-6)
    np.testing.assert_allclose(np.array(g0["wte"]["weight"]), np.array(g1["wte"]["weight"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 3e-3)])
def test_every_profile_trains_the_same(tmp_path, dtype, tol):
    """`nanogpt-mlx train` under each forced profile: the same losses as the x86 CPU profile's, step by step."""
    from conftest import run_cli

    rng = np.random.default_rng(0)
    for name in ("x_val_000000.npy", "x_train_000001.npy"):
        np.save(tmp_path / name, rng.integers(0, 1000, 8 * 128 * 8 + 1).astype(np.uint16))
    losses = {}
    for profile in ("cpu-x86", "cuda", "metal"):
        out = tmp_path / profile
        run_cli("train", "--data", str(tmp_path), "--out", str(out), "--n-layer", "2", "--n-head", "4",
                "--n-embd", "128", "--block-size", "128", "--vocab-size", "1024", "--batch-size", "8",
                "--seq-len", "128", "--total-batch-size", "1024", "--max-steps", "6", "--warmup-steps", "2",
                "--max-lr", "3e-3", "--val-every", "0", "--sample-every", "0", "--hellaswag-every", "0",
                "--checkpoint-every", "0", "--dtype", dtype, check=True, env={device.PROFILE_ENV: profile})
        losses[profile] = [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if r["kind"] == "train"]
    assert len(losses["cpu-x86"]) == 6
    for profile in ("cuda", "metal"):
        np.testing.assert_allclose(losses[profile], losses["cpu-x86"], atol=tol, err_msg=profile)


# --------------------------------------------------------------------------- the decision
PROBE = """
import json, subprocess, sys
calls = []
real_run = subprocess.run
subprocess.run = lambda *a, **k: calls.append(a) or real_run(*a, **k)
import nanogpt_mlx
from nanogpt_mlx import cli, device, kernels, train, evaluate, sample
import mlx.core as mx
maps = open("/proc/self/maps").read() if sys.platform == "linux" else ""  # the libraries loaded (Linux)
cpu_modules = [m for m in ("cpu", "cpu_jit", "cpu_math") if f"nanogpt_mlx.{m}" in sys.modules]
print(json.dumps({"profile": device.PROFILE.name, "cpu_modules": cpu_modules,
                  "system_openblas": "libopenblas.so" in maps, "gemv_shim": "gemv_shim" in maps,
                  "subprocesses": len(calls), "mlx_exp": kernels.BOUND.exp is mx.exp}))
"""


@pytest.mark.parametrize("forced", ["cuda", "metal"])
def test_gpu_profile_import_loads_no_cpu_machinery(forced):
    env = {**os.environ, device.PROFILE_ENV: forced}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout)
    assert got == {"profile": forced, "cpu_modules": [], "system_openblas": False, "gemv_shim": False,
                   "subprocesses": 0, "mlx_exp": True}


def test_cpu_profile_import_binds_cpu_kernels():
    env = {**os.environ, device.PROFILE_ENV: "cpu-x86"}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout)
    assert got["profile"] == "cpu-x86" and got["cpu_modules"] == ["cpu", "cpu_jit", "cpu_math"] and not got["mlx_exp"]


@pytest.mark.parametrize("platform_name, machine, installed, expected", [
    ("linux", "x86_64", [], "cpu-x86"), ("linux", "AMD64", [], "cpu-x86"), ("linux", "aarch64", [], "cpu-arm"),
    ("darwin", "arm64", [], "metal"), ("darwin", "x86_64", [], "cpu-x86"), ("linux", "x86_64", ["mlx-cuda-12"], "cuda"),
    ("linux", "aarch64", ["mlx-cuda-13"], "cuda"), ("linux", "x86_64", ["mlx-cuda"], "cuda"),
    ("darwin", "x86_64", ["mlx-cuda-12"], "cpu-x86")])  # (CUDA only on Linux)
def test_detect_picks_the_profile_of_the_platform(monkeypatch, platform_name, machine, installed, expected):
    """The tests force a profile, so the detection itself ran only for the machine the suite runs on."""
    def version(name):
        if name not in installed:
            raise device.metadata.PackageNotFoundError(name)
        return "0.29.0"

    monkeypatch.setattr(device.sys, "platform", platform_name)
    monkeypatch.setattr(device.platform, "machine", lambda: machine)
    monkeypatch.setattr(device.metadata, "version", version)
    monkeypatch.setattr(device, "note", "")
    monkeypatch.delenv(device.PROFILE_ENV, raising=False)
    assert device.detect() == expected and device.choose().name == expected
    forced = "cpu-arm" if expected == "cuda" else "cuda"
    monkeypatch.setenv(device.PROFILE_ENV, f" {forced} ")
    assert device.choose().name == forced and device.note == ""


def test_readme_profiles_table_is_the_profiles():
    """README's table of each profile's default dtype, head + loss rows per chunk and HellaSwag examples per
    forward, against the profiles: nothing pinned them."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = readme[readme.index("| profile | default `--dtype` |"):].split("\n\n")[0].splitlines()[2:]
    table = {}
    for row in rows:
        names, dtype, loss_rows, eval_batch = (cell.strip() for cell in row.strip("|").split("|"))
        for name in names.split(", "):
            table[name] = (dtype.split()[0], int(loss_rows.split()[0]), int(eval_batch))
    assert table == {name: (p.dtype, p.loss_rows, p.eval_batch) for name, p in device.PROFILES.items()}


def test_unknown_forced_profile_falls_back_with_a_note():
    env = {**os.environ, device.PROFILE_ENV: "tpu"}
    out = subprocess.run([sys.executable, "-m", "nanogpt_mlx.cli", "info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "is not a profile" in out.stdout


@pytest.mark.parametrize("profile", PROFILES, ids=ids)
@pytest.mark.parametrize("kind", ["gelu", "relu2"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_activation_matmul_equals_autodiff(profile, kind, dtype, maybe_compile):
    """act(h) @ w.T + b and its gradients against autodiff of nn.gelu_approx / relu^2 in float32."""
    k = kernels.for_profile(profile)
    k1, k2, k3, k4 = mx.random.split(mx.random.key(7), 4)
    h = (mx.random.normal((2, 9, 64), key=k1) * 3).astype(dtype)
    w, b = (mx.random.normal((16, 64), key=k2) * 0.1).astype(dtype), mx.random.normal((16,), key=k4).astype(dtype)
    g = mx.random.normal((2, 9, 16), key=k3)
    act = nn.gelu_approx if kind == "gelu" else (lambda a: mx.square(nn.relu(a)))

    def loss(h, w, b, f=lambda h, w, b: k.activation_matmul(kind, h, w, b)):
        return (f(h, w, b).astype(mx.float32) * g).sum()

    ref, ref_grads = mx.value_and_grad(lambda h, w, b: loss(h, w, b, lambda h, w, b: act(h) @ w.T + b),
                                       argnums=(0, 1, 2))(*(a.astype(mx.float32) for a in (h, w, b)))
    got, grads = maybe_compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))(h, w, b)
    rtol, atol = (1e-5, 1e-5) if dtype == mx.float32 else (2e-2, 2e-2)
    np.testing.assert_allclose(got.item(), ref.item(), rtol=rtol)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == dtype
        scale = np.abs(np.array(r)).max()
        np.testing.assert_allclose(np.array(a.astype(mx.float32)) / scale, np.array(r) / scale, rtol=rtol, atol=atol)
    no_bias = (k.activation_matmul(kind, h, w) + b).astype(mx.float32)
    np.testing.assert_allclose(np.array(no_bias), np.array(k.activation_matmul(kind, h, w, b).astype(mx.float32)),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["gelu", "relu2"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_recomputed_activation_keeps_less_than_autodiff(kind, dtype, monkeypatch):
    """The GPU profiles' MLP backward recomputes act(h) from h by expressions mx.compile cannot merge with the
    forward's, so a compiled step of the model keeps fewer activations than with autodiff."""
    def peak(activation_matmul) -> int:
        monkeypatch.setattr(kernels, "activation_matmul", activation_matmul)
        return body_step_peak(GPTConfig(n_layer=12, n_head=4, n_embd=128, vocab_size=256, mlp=kind), dtype, seq=128)

    new = peak(kernels.recomputing_activation_matmul())
    old = peak(kernels.plain_activation_matmul(kernels.mlx_gelu))
    print(f"peak {new / 1e6:.1f} MB against {old / 1e6:.1f} MB with autodiff")
    assert new < 0.9 * old


def test_recomputed_gelu_keeps_what_relu2_keeps(monkeypatch):
    """GPT-2's GELU computes in float32. If its bf16 recomputation shared the forward's float32 cast of h,
    mx.compile would merge the two and keep float32 copies from the forward to the backward (several more bf16
    n_embd-units per layer and token). ReLU² has no cast: one more layer must add about as much for both."""
    monkeypatch.setattr(kernels, "activation_matmul", kernels.recomputing_activation_matmul())
    C, B, T = 128, 4, 128

    def per_layer(kind: str) -> float:
        p2, p16 = (body_step_peak(GPTConfig(n_layer=n, n_head=4, n_embd=C, vocab_size=256, mlp=kind), mx.bfloat16,
                                  seq=T, batch=B) for n in (2, 16))  # 14 layers apart: one-off transients fade
        return (p16 - p2) / 14 / (C * B * T * 2)

    gelu, relu2 = per_layer("gelu"), per_layer("relu2")
    print(f"units per layer: GELU {gelu:.2f}, ReLU^2 {relu2:.2f}")
    assert gelu - relu2 < 2.5


@pytest.mark.parametrize("n", [1, 7, 16, 256, 1000, 4096, 50257, 50304])
def test_row_reductions_by_lanes_equal_mlx(n):
    """cpu_math.py's row_max / row_sum reduce lanes at a time where the row length allows (and as one row where not):
    the same maxima exactly, the same sums to float32 rounding."""
    x = mx.random.normal((3, 5, n), key=mx.random.key(n)) * 10
    assert cpu_math._lanes(n) == {16: 8, 256: 32, 1000: 8, 4096: 128, 50304: 128}.get(n, 0)
    np.testing.assert_array_equal(np.array(cpu_math.row_max(x)), np.array(x.max(axis=-1, keepdims=True)))
    np.testing.assert_allclose(np.array(cpu_math.row_sum(x)), np.array(x.sum(axis=-1, keepdims=True)), rtol=1e-5,
                               atol=1e-3)
