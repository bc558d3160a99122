"""The multiply-add exp, softmax, GELU and attention of ops.py against MLX's own."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nanogpt_mlx import ops


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def maybe_compile(request):
    return mx.compile if request.param else (lambda f: f)


def test_exp_is_accurate_to_float32_rounding(maybe_compile):
    z = mx.concatenate([mx.linspace(-87, 0, 200001), mx.array([-1e-30, 0.0])])
    got = np.array(maybe_compile(ops._exp_poly)(z), dtype=np.float64)
    rel = np.abs(got / np.exp(np.array(z, dtype=np.float64)) - 1)
    assert rel.max() < 3e-7
    assert got[-1] == 1.0
    assert 0 <= ops._exp_poly(mx.array([-mx.inf])).item() < 1e-37  # ~0, not nan
    np.testing.assert_allclose(np.array(mx.grad(lambda x: ops._exp_poly(x).sum())(z[:100])),
                               np.exp(np.array(z[:100])), rtol=3e-7)


def test_softmax_and_gradient(maybe_compile):
    x = mx.random.normal((4, 300), key=mx.random.key(0)) * 10
    x = mx.where(mx.arange(300) > 250, -mx.inf, x)  # masked entries, as in causal attention
    cot = mx.random.normal((4, 300), key=mx.random.key(1))
    ref_y, ref_vjp = mx.vjp(lambda x: mx.softmax(x, axis=-1), [x], [cot])
    y, vjp = mx.vjp(maybe_compile(ops._softmax), [x], [cot])
    np.testing.assert_allclose(np.array(y[0]), np.array(ref_y[0]), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.array(vjp[0]), np.array(ref_vjp[0]), rtol=1e-4, atol=1e-7)


def test_gelu_and_gradient(maybe_compile):
    x = mx.concatenate([mx.linspace(-12, 12, 10001), mx.array([-1e20, 1e20, 0.0])])
    ref, ref_grad = nn.gelu_approx(x), mx.grad(lambda x: nn.gelu_approx(x).sum())(x[:-3])
    got, grad = maybe_compile(ops._gelu)(x), mx.grad(lambda x: ops._gelu(x).sum())(x)
    assert grad[-3:].tolist() == [0.0, 1.0, 0.5]  # MLX's own gives nan at +-1e20
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(grad[:-3]), np.array(ref_grad), rtol=1e-5, atol=3e-6)


@pytest.mark.parametrize("T, S", [(7, 7), (1, 9), (3, 9)])  # full causal, one cached query, a cached prefix
def test_attention_equals_fused_sdpa(monkeypatch, T, S):
    k1, k2, k3, k4 = mx.random.split(mx.random.key(T * S), 4)
    q = mx.random.normal((2, 3, T, 8), key=k1)
    k, v = mx.random.normal((2, 3, S, 8), key=k2), mx.random.normal((2, 3, S, 8), key=k3)
    cot = mx.random.normal((2, 3, T, 8), key=k4)
    causal = T > 1

    def run(fast: bool):
        monkeypatch.setattr(ops, "software_math", lambda: fast)
        return mx.vjp(lambda q, k, v: ops.attention(q, k, v, scale=0.35, causal=causal), [q, k, v], [cot])

    (ref,), ref_grads = run(False)
    (got,), grads = run(True)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4, atol=1e-6)


def test_sqrt_is_accurate(maybe_compile):
    x = mx.concatenate([mx.exp(mx.linspace(-80, 80, 100001)), mx.array([1e-38, 1.0, 4.0])])
    got = np.array(maybe_compile(ops.sqrt)(x), dtype=np.float64)
    np.testing.assert_allclose(got, np.sqrt(np.array(x, dtype=np.float64)), rtol=3e-7)
    assert ops.sqrt(mx.array([0.0])).item() < 1e-19  # an AdamW denominator's eps (1e-8) dwarfs it
