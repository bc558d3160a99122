"""Muon against an independent float64 NumPy reference of the algorithm (KellerJordan/Muon)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx.optim import Muon, newton_schulz


def np_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def np_muon(p, grads, lr, beta, wd):
    m = np.zeros_like(p)
    for g in grads:
        m = beta * m + (1 - beta) * g
        u = np_newton_schulz((1 - beta) * g + beta * m)
        u = u * max(1.0, p.shape[0] / p.shape[1]) ** 0.5
        p = p * (1 - lr * wd) - lr * u
    return p


@pytest.mark.parametrize("shape", [(48, 48), (32, 80), (80, 32)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_muon_equals_the_numpy_reference(shape, wd):
    rng = np.random.default_rng(sum(shape))
    p0 = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) * 10.0 ** -k for k in range(4)]  # momentum carries across steps
    ref = np_muon(p0, grads, lr=0.02, beta=0.95, wd=wd)
    opt = Muon(learning_rate=0.02, momentum=0.95, weight_decay=wd)
    params = {"w": mx.array(p0.astype(np.float32))}
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g.astype(np.float32))}, params)
    got = np.array(params["w"], dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    assert np.abs(got - p0).max() > 0.01  # the updates did move the weights


@pytest.mark.parametrize("shape", [(32, 80), (80, 32)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_newton_schulz_singular_values_lie_in_the_band(shape, dtype):
    g = mx.random.normal(shape, key=mx.random.key(0))
    s = np.linalg.svd(np.array(newton_schulz(g, dtype=dtype).astype(mx.float32)), compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.25, s


def test_warmup_stable_decay_and_momentum_warmup():
    from nanogpt_mlx.optim import muon_momentum, wsd_lr

    lrs = [wsd_lr(s, 0.05, warmup_steps=2, max_steps=10, cooldown_frac=0.4) for s in range(11)]
    assert lrs[:2] == pytest.approx([0.025, 0.05])
    assert lrs[2:6] == pytest.approx([0.05] * 4)  # stable until 60% of the run
    assert lrs[6:] == pytest.approx([0.05 * (1 - s / 10) / 0.4 for s in range(6, 11)])  # linear to 0
    assert lrs[-1] == 0
    assert [muon_momentum(s, 300) for s in (0, 150, 300, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert muon_momentum(0, 0) == muon_momentum(7, 0) == 0.95  # no warm-up: the end value from the start


def test_momentum_can_change_between_steps_of_a_compiled_update():
    """The momentum is in the state, so a compiled update reads each step's. (The test used one gradient at both
    steps: the Nesterov input was then a multiple of it whatever the momentum, which Newton-Schulz normalises away,
    and an update that kept its first momentum passed.)"""
    opt = Muon(learning_rate=0.02, momentum=0.85)
    params = {"w": mx.random.normal((8, 8), key=mx.random.key(2))}
    opt.init(params)
    state = [opt.state]
    step = mx.compile(lambda g, p: opt.apply_gradients(g, p), inputs=state, outputs=state)
    grads = [{"w": mx.random.normal((8, 8), key=mx.random.key(k))} for k in (0, 1)]
    fast = step(grads[0], params)
    opt.momentum = 0.95
    assert abs(opt.momentum.item() - 0.95) < 1e-7
    fast = np.array(step(grads[1], fast)["w"])

    def reference(momenta: tuple[float, float]) -> np.ndarray:
        ref = Muon(learning_rate=0.02, momentum=momenta[0])
        ref.init(params)
        p = params
        for g, beta in zip(grads, momenta):
            ref.momentum = beta
            p = ref.apply_gradients(g, p)
        return np.array(p["w"])

    np.testing.assert_allclose(fast, reference((0.85, 0.95)), rtol=1e-5, atol=1e-6)
    kept = reference((0.85, 0.85))  # what an update that ignored the change would give
    assert np.abs(fast - kept).max() > 100 * (1e-6 + 1e-5 * np.abs(kept).max())


def test_split_matrix_orthogonalises_each_row_block():
    """c_attn's stacked q, k, v (3C x C) are updated as three separate C x C matrices, as the speedrun's."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((3 * 16, 16))
    grads = [rng.standard_normal(p0.shape) for _ in range(3)]
    ref = np.concatenate([np_muon(p0[i * 16:(i + 1) * 16], [g[i * 16:(i + 1) * 16] for g in grads],
                                  lr=0.02, beta=0.9, wd=0.05) for i in range(3)])
    opt = Muon(learning_rate=0.02, momentum=0.9, weight_decay=0.05, splits=3)
    params = {"w": mx.array(p0.astype(np.float32))}
    for g in grads:
        params = opt.apply_gradients({"w": mx.array(g.astype(np.float32))}, params)
    got = np.array(params["w"], dtype=np.float64)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    whole = np_muon(p0, grads, lr=0.02, beta=0.9, wd=0.05)  # one 48 x 16 matrix: a different update
    assert np.abs(whole - ref).max() > 100 * 2e-5 * np.abs(ref).max()


def test_a_parameter_muon_cannot_update_is_one_line():
    """A vector failed at the first update as a tuple's unpacking, rows that its splits do not divide as a reshape."""
    from nanogpt_mlx.errors import UserError

    for shape, splits in (((8,), 1), ((10, 4), 3)):
        with pytest.raises(UserError, match=rf"^Muon updates matrices whose rows divide into its {splits} split\(s\), "
                                            rf"got a parameter of shape \({shape[0]},"):
            Muon(0.02, splits=splits).update({"w": mx.zeros(shape)}, {"w": mx.ones(shape)})
    assert Muon(0.02, splits=3).init({"w": mx.zeros((9, 4))}) is None
