"""One optimizer step on the device: build-nanogpt's inner loop (forward + backward of loss / grad_accum for each
micro-batch, the gradients summed; then the all-reduce, clip_grad_norm_ and optimizer.step()) as two compiled MLX
functions, and the queue that builds a micro-step's graph while the device runs the one before.

The optimizer updates float32 master weights, packed as the recipe's optimizer groups them (optim.Packing); the
model's weights are views of them (float32), or of their copy in the compute dtype (use_master).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from .distributed import Dist
from .model import GPT
from .optim import Packing, apply_scaled, clip_scale
from .threads import StepThreads

Grads = dict  # the float32 gradients summed so far, packed (optim.Packing); None before a step's first micro-step


def use_master(model: GPT, packing: Packing, master: dict, dtype: mx.Dtype) -> None:
    """Point the model's weights at the master weights, cast to `dtype` (views where it is float32)."""
    model.update(packing.unpack(master["params"], dtype))


class Steps(NamedTuple):
    """A micro-step's (x, y) and the gradients summed so far, computed. accumulate returns (loss, gradients summed);
    update, the step's last micro-step, also averages over ranks, clips and applies the optimizer, returning
    (loss, the gradients' global norm before clipping). Losses are this micro-step's share of the step's mean."""

    accumulate: Callable[[mx.array, mx.array, Grads | None], tuple[mx.array, Grads]]
    update: Callable[[mx.array, mx.array, Grads | None], tuple[mx.array, mx.array]]


def compile_steps(model: GPT, optimizer: optim.Optimizer, packing: Packing, master: dict, dist: Dist,
                  dtype: mx.Dtype, grad_clip: float, micro_steps: int, threads: int = 1, compile: bool = True) -> Steps:
    """The steps of `micro_steps` micro-batches each, over `threads` step threads (threads.py: each computes the
    forward + backward of its rows, and the compiled steps add their losses and gradients)."""
    # no closure may hold a Trainer: a cycle through the compiled steps kept a dropped one's weights, optimizer state
    # and step threads until Python's cycle collector ran, which MLX's memory does not prompt (a notebook's sweep)
    shares = micro_steps * threads  # of the step's mean loss, one for each micro-step and thread

    def forward_backward(m: GPT, x: mx.array, y: mx.array) -> tuple[mx.array, Grads]:
        loss, g = nn.value_and_grad(m, lambda m, x, y: m.loss(x, y) / shares)(m, x, y)
        return loss, tree_map(lambda a: a.astype(mx.float32), packing.pack(g))  # packed in the compute dtype

    def add(parts: list[tuple[mx.array, Grads]], grads: Grads | None) -> tuple[mx.array, Grads]:
        loss, g = parts[0]
        for part_loss, part_g in parts[1:]:
            loss, g = loss + part_loss, tree_map(mx.add, g, part_g)
        return loss, g if grads is None else tree_map(mx.add, grads, g)

    def apply(loss: mx.array, g: Grads) -> tuple[mx.array, mx.array]:
        g = dist.average_gradients(g)
        scale, norm = clip_scale(g, grad_clip)  # applied inside the update: no clipped copy
        # the weights kept in their order: mx.compile keys the steps' traces on the captured state's shapes, not
        # its names, and an optimizer that returned them in another order (MLX's MultiOptimizer: one that varies
        # with Python's hash seed) had the next step traced again, or, where the shapes matched, run this trace
        # with same-shaped tensors in each other's places (wte updated from lm_head's weights)
        updated = apply_scaled(optimizer, g, master["params"], scale)
        master["params"] = tree_map(lambda _, new: new, master["params"], updated)
        use_master(model, packing, master, dtype)
        return loss, norm

    state = [model.state, optimizer.state, master]
    wrap = partial(mx.compile, inputs=state, outputs=state) if compile else (lambda f: f)
    if threads == 1:
        return Steps(wrap(lambda x, y, grads: add([forward_backward(model, x, y)], grads)),
                     wrap(lambda x, y, grads: apply(*add([forward_backward(model, x, y)], grads))))
    parts = StepThreads(model, threads, forward_backward, compile)
    accumulate, update = wrap(add), wrap(lambda computed, grads: apply(*add(computed, grads)))
    return Steps(lambda x, y, grads: accumulate(parts(x, y), grads), lambda x, y, grads: update(parts(x, y), grads))


@dataclass
class Step:
    """An optimizer step queued on the device: its loss (summed over micro-steps) and norm still lazy."""

    step: int
    lr: float
    t0: float  # when it started (perf_counter)
    loss: mx.array
    norm: mx.array
    ended: float = 0.0  # when the device was seen to have finished it (Queue.put)


class Queue:
    """The work on the device: one micro-step evaluating while the host builds the next one's graph."""

    def __init__(self, dist: Dist):
        self.dist = dist
        self._in_flight: tuple = ()  # what the device is evaluating ...
        self._ends: Step | None = None  # ... and the step it ends, if it is a step's last micro-step
        self._last_ended = 0.0  # when the last finished step ended (perf_counter)

    def put(self, *arrays: mx.array, ends: Step | None = None) -> None:
        """Start evaluating `arrays` once the work queued before them has finished (and note when that work
        ended a step). Their graph was built while the device ran that work, so the device hardly waits for
        the host between micro-steps and steps; and they allocate nothing before it is done, so memory holds
        one micro-step at a time. Without arrays: wait for what is queued."""
        self.dist.sync(*self._in_flight)
        if self._ends is not None:
            self._ends.ended = time.perf_counter()
        # the arrays themselves, not the model's and optimizer's state containers: building the next step
        # updates those in place, and waiting on them then would wait for that step too
        arrays = tuple(a for _, a in tree_flatten(list(arrays)))
        # the last ones dropped first: the next update's moments reuse their buffers only where nothing else holds
        # them (optim.unfused); held here, every moment was allocated anew beside the old
        self._in_flight = ()
        self.dist.submit(*arrays)
        self._in_flight, self._ends = arrays, ends

    def finish(self, s: Step) -> tuple[float, float, float]:
        """Wait for a queued step: its mean loss over ranks, gradient norm and seconds (from its start, or, if
        it was queued behind the step before, from when that one ended)."""
        if self._ends is s:  # nothing is queued behind it
            self.put()
        loss, norm = self.dist.mean(s.loss.item()), s.norm.item()
        dt, self._last_ended = s.ended - max(s.t0, self._last_ended), s.ended
        return loss, norm, dt
