"""optim.Packing: the parameters of each optimizer group in one flat buffer. Packing and unpacking give the
tensors back, AdamW over the packed buffers equals AdamW over the tensors, and the optimizer state is stored
per tensor (the checkpoint layout of an unpacked optimizer), so checkpoints of either kind resume."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from nanogpt_mlx import GPT, GPTConfig
from nanogpt_mlx.optim import Packing, build_nanogpt_adamw, clip_grad_norm, decay_group


def params_and_grads(n_embd: int = 36):
    """A GPT whose tensor sizes are not multiples of Packing.ALIGN, and gradients for it."""
    params = GPT(GPTConfig(n_layer=2, n_head=3, n_embd=n_embd, vocab_size=101, block_size=20), seed=0).parameters()
    keys = iter(mx.random.split(mx.random.key(1), len(tree_flatten(params))))
    grads = tree_map(lambda p: mx.random.normal(p.shape, key=next(keys)) * 1e-2, params)
    return params, grads


def assert_trees_equal(a, b) -> None:
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert sorted(fa) == sorted(fb)
    for k, x in fa.items():
        y = fb[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=k)


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setattr(Packing, "BUCKET", 4096)  # several buckets per group in the small model


def test_pack_and_unpack_give_the_tensors_back(small_buckets):
    params, _ = params_and_grads()
    flat = dict(tree_flatten(params))
    packing = Packing(params, decay_group)
    packed = packing.pack(params)
    assert all(a.ndim == 1 for a in packed.values())
    assert {Packing.group_of(b) for b in packed} == {"decay", "no_decay"} and len(packed) > 2
    assert_trees_equal(packing.unpack(packed), params)
    for bucket, slots in packing.slots.items():
        assert all(decay_group(path, flat[path]) == Packing.group_of(bucket) for path, _, _ in slots)
        assert all(offset % Packing.ALIGN == 0 for _, _, offset in slots)
        assert packed[bucket].size == packing.sizes[bucket]
        assert packing.sizes[bucket] <= Packing.BUCKET or len(slots) == 1  # only a tensor alone may exceed it
        used = sum(flat[path].size for path, _, _ in slots)
        assert float(mx.abs(packed[bucket]).sum()) == pytest.approx(  # the alignment gaps are zeros
            sum(float(mx.abs(flat[path]).sum()) for path, _, _ in slots), rel=1e-5) and used <= packed[bucket].size
    bf16 = packing.unpack(packed, mx.bfloat16)
    assert all(a.dtype == mx.bfloat16 for _, a in tree_flatten(bf16))


def test_no_groups_packs_nothing():
    params, _ = params_and_grads()
    packing = Packing(params, None)
    assert packing.pack(params) is params
    assert_trees_equal(packing.unpack(params), params)
    assert packing.pack_state({"a": mx.zeros(2)}, like={}).keys() == {"a"}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_packed_adamw_equals_adamw_per_tensor(compiled, small_buckets):
    """Three build-nanogpt AdamW steps with clipping: the same weights (the norm is summed in another order)
    and, unpacked, the same optimizer state under the same names."""
    params, grads = params_and_grads()
    packing = Packing(params, decay_group)
    per_tensor, packed = (build_nanogpt_adamw(1e-2, 0.1, (0.9, 0.95), 1e-8) for _ in range(2))
    box = {"tensors": params, "packed": packing.pack(params)}
    per_tensor.init(box["tensors"])
    packed.init(box["packed"])

    def step():
        g, _ = clip_grad_norm(grads, 0.05)
        box["tensors"] = per_tensor.apply_gradients(g, box["tensors"])
        g, _ = clip_grad_norm(packing.pack(grads), 0.05)
        box["packed"] = packed.apply_gradients(g, box["packed"])

    state = [box, per_tensor.state, packed.state]
    run = mx.compile(step, inputs=state, outputs=state) if compiled else step
    for _ in range(3):
        run()
        mx.eval(state)
    got, want = dict(tree_flatten(packing.unpack(box["packed"]))), dict(tree_flatten(box["tensors"]))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(np.array(got[k]), np.array(want[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    unpacked = dict(tree_flatten(packing.unpack_state(packed.state)))
    reference = dict(tree_flatten(per_tensor.state))
    assert unpacked.keys() == reference.keys()
    for k in reference:
        np.testing.assert_allclose(np.array(unpacked[k]), np.array(reference[k]), rtol=1e-4, atol=1e-9, err_msg=k)
    # a per-tensor state (an older checkpoint's) packs into the packed optimizer's layout
    assert_trees_equal(packing.pack_state(packing.unpack_state(packed.state), like=packed.state), packed.state)
    repacked = dict(tree_flatten(packing.pack_state(per_tensor.state, like=packed.state)))
    assert repacked.keys() == dict(tree_flatten(packed.state)).keys()


@pytest.mark.parametrize("max_norm, scale", [(10.0, 1.0), (1e-2, 1e-3), (1e-7, 1e-6)],
                         ids=["above-the-norm", "clipped", "tiny-norm"])
def test_clip_grad_norm_is_pytorchs(max_norm, scale):
    """clip_grad_norm against torch.nn.utils.clip_grad_norm_: the pre-clip norm, and the scale min(1, max_norm /
    (norm + 1e-6)), whose 1e-6 decides a tiny norm's (max_norm 1e-7 of a 1.9e-6 norm: 1/29, not 1/19); max_norm 0
    (the speedrun's) clips nothing and still gives the norm."""
    import torch

    _, grads = params_and_grads()
    grads = tree_map(lambda g: g * scale, grads)
    flat = dict(tree_flatten(grads))
    tensors = {k: torch.tensor(np.array(g), dtype=torch.float64, requires_grad=True) for k, g in flat.items()}
    for t in tensors.values():
        t.grad = t.detach().clone()
    want_norm = torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm).item()
    clipped, norm = clip_grad_norm(grads, max_norm)
    np.testing.assert_allclose(norm.item(), want_norm, rtol=1e-5)
    for k, g in tree_flatten(clipped):
        np.testing.assert_allclose(np.array(g), tensors[k].grad.numpy(), rtol=1e-5, atol=1e-12, err_msg=k)
    unclipped, norm = clip_grad_norm(grads, 0.0)
    np.testing.assert_allclose(norm.item(), want_norm, rtol=1e-5)
    assert_trees_equal(unclipped, grads)


@pytest.mark.parametrize("recipe", ["build-nanogpt", "speedrun"])
def test_an_update_scaled_inside_equals_one_of_clipped_gradients(recipe):
    """apply_scaled folds clipping's factor into each update's coefficients (no clipped copy of the gradients):
    AdamW's and Muon's weights and moments equal those updated from the clipped gradients, over steps with and
    without clipping, and no scale is left on the optimizers for a later update."""
    from nanogpt_mlx import recipes
    from nanogpt_mlx.config import TrainConfig
    from nanogpt_mlx.optim import apply_scaled, clip_scale

    recipe = recipes.get(recipe)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=16, **recipe.model), seed=0)
    params = tree_map(lambda p: p.astype(mx.float32), model.parameters())
    opts = [recipe.make_optimizer(TrainConfig(recipe=recipe.name), mx.float32) for _ in range(2)]
    for opt in opts:
        opt.init(params)
    scaled, copied = params, params
    for step, max_norm in enumerate([1e-3, 0.0, 1e-2]):
        keys = iter(mx.random.split(mx.random.key(step), len(tree_flatten(params))))
        grads = tree_map(lambda p: mx.random.normal(p.shape, key=next(keys)) * 1e-2, params)
        scale, norm = clip_scale(grads, max_norm)
        assert (scale is None) == (max_norm == 0) and (scale is None or scale.item() < 1)
        scaled = apply_scaled(opts[0], grads, scaled, scale)
        copied = opts[1].apply_gradients(clip_grad_norm(grads, max_norm)[0], copied)
        for a, b in zip(tree_flatten([scaled, opts[0].state]), tree_flatten([copied, opts[1].state])):
            np.testing.assert_allclose(np.array(a[1]), np.array(b[1]), rtol=2e-5, atol=1e-7, err_msg=a[0])
    assert all(o.grad_scale is None for o in getattr(opts[0], "optimizers", [opts[0]]))
