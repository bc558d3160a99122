"""The fused head + cross-entropy of loss.py against MLX's plain graph, and its exp."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nanogpt_mlx import loss


def plain(h, w, y):
    return nn.losses.cross_entropy(h @ w.T, y, reduction="mean")


@pytest.mark.parametrize("n", [1, 128, 300])  # one row, exactly one chunk, a partial last chunk
def test_fused_loss_and_gradients_equal_the_plain_graph(n):
    key = mx.random.key(n)
    k1, k2, k3 = mx.random.split(key, 3)
    h = mx.random.normal((n, 48), key=k1) * 2
    w = mx.random.normal((1000, 48), key=k2)  # logits with a spread of ~15: exp is tested far from 0
    y = mx.random.randint(0, 1000, (n,), key=k3).astype(mx.int32)
    ref_loss, (ref_dh, ref_dw) = mx.value_and_grad(plain, argnums=(0, 1))(h, w, y)
    np.testing.assert_allclose(loss.eval_cross_entropy(h, w, y).item(), ref_loss.item(), rtol=1e-5)
    for fn in (loss.cross_entropy, mx.compile(loss.cross_entropy)):
        got_loss, (dh, dw) = mx.value_and_grad(fn, argnums=(0, 1))(h, w, y)
        np.testing.assert_allclose(got_loss.item(), ref_loss.item(), rtol=1e-5)
        np.testing.assert_allclose(np.array(dh), np.array(ref_dh), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.array(dw), np.array(ref_dw), rtol=1e-4, atol=1e-6)


def test_gradient_follows_the_cotangent_and_batch_shape():
    h = mx.random.normal((2, 5, 16), key=mx.random.key(0))
    w = mx.random.normal((50, 16), key=mx.random.key(1))
    y = mx.random.randint(0, 50, (2, 5), key=mx.random.key(2)).astype(mx.int32)
    dh = mx.grad(lambda h: 3 * loss.cross_entropy(h, w, y))(h)
    ref = mx.grad(lambda h: 3 * plain(h.reshape(10, 16), w, y.reshape(10)))(h)
    assert dh.shape == h.shape
    np.testing.assert_allclose(np.array(dh), np.array(ref), rtol=1e-4, atol=1e-7)


def test_bfloat16_hidden_states_give_float32_loss():
    h = mx.random.normal((8, 16), key=mx.random.key(0)).astype(mx.bfloat16)
    w = mx.random.normal((50, 16), key=mx.random.key(1)).astype(mx.bfloat16)
    y = mx.zeros((8,), dtype=mx.int32)
    value, dh = mx.value_and_grad(loss.cross_entropy)(h, w, y)
    assert value.dtype == mx.float32 and dh.dtype == mx.bfloat16
    np.testing.assert_allclose(value.item(), plain(h.astype(mx.float32), w.astype(mx.float32), y).item(), rtol=1e-5)
