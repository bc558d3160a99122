"""A training micro-batch's rows split over threads, each computing its share on an MLX stream of its own.

MLX's CPU backend evaluates a stream's operations one after another, and only its GEMMs (OpenBLAS) use more
than one core: its elementwise kernels, reductions and copies, much of a small GPT's step, leave the other
cores idle. Here n threads each take B / n rows of a micro-batch with one-thread GEMMs
(device.one_blas_thread), so every part of the step runs on every core: data parallelism inside one process,
the gradients added in memory rather than sent between ranks. The cores are still not busy all the time: MLX
bounds the work queued ahead (ten tasks of ten dispatches, ~50 operations) across all the streams of a process,
whichever thread queued it, so while one stream works through long operations (the head's GEMMs) the other's thread
may wait to queue more and its stream run dry. Separate processes (launch.py's ranks) share no such bound and
step faster on a CPU (README), at the cost of an all-reduce and a process per rank. (Several streams evaluated
from one thread did worse still: one eval loop waits for both.)

Each thread differentiates a model object of its own that shares the weights' arrays, since tracing a
gradient writes traced values into the module; its compiled function takes the weights as an input. An MLX
stream belongs to the thread that made it, so each thread makes its own; building graphs (a compiled
function's first call traces it) is done one thread at a time, evaluating them all at once.
"""

from __future__ import annotations

import copy
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import device

Part = Callable[[nn.Module, mx.array, mx.array], Any]  # (model, rows of x, rows of y) -> arrays to evaluate


def replica(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that shares its arrays (no memory, no random init)."""
    return copy.deepcopy(model, {id(a): a for _, a in tree_flatten(model.parameters())})


class StepThreads:
    """`part` of each thread's share of a micro-batch's rows, computed at once: `threads(x, y)` returns
    [part(model copy i, x rows i, y rows i) for each of the n threads], evaluated, with `model`'s weights
    at the time of the call."""

    def __init__(self, model: nn.Module, n: int, part: Part, compile: bool = True):
        self.model, self.n = model, n
        lock = threading.Lock()
        self._jobs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        threads = []
        for i, jobs in enumerate(self._jobs):
            fn = _share(replica(model), part, i, n)
            threads.append(threading.Thread(target=_serve, args=(i, mx.compile(fn) if compile else fn, jobs, lock),
                                            daemon=True, name=f"nanogpt-mlx-step-{i}"))
            threads[-1].start()
        weakref.finalize(self, _stop, self._jobs, threads)  # with this object, or at exit

    def __call__(self, x: mx.array, y: mx.array) -> list:
        params = self.model.parameters()
        # computed here, in this thread's stream, not by all threads at once: the weights (the last update's output)
        # and the batch
        mx.eval(params, x, y)
        results: queue.SimpleQueue = queue.SimpleQueue()  # this call's own: an abandoned call's come late
        with device.one_blas_thread():
            for jobs in self._jobs:
                jobs.put((params, x, y, results))
            got = sorted((results.get() for _ in self._jobs), key=lambda r: r[0])
        for _, _, error in got:
            if error is not None:
                raise error
        return [out for _, out, _ in got]


def _share(model: nn.Module, part: Part, i: int, n: int) -> Callable:
    def share(params: dict, x: mx.array, y: mx.array):
        model.update(params)
        rows = x.shape[0] // n
        return part(model, x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows])

    return share


def _serve(i: int, fn: Callable, jobs: queue.SimpleQueue, lock: threading.Lock) -> None:
    stream = mx.new_stream(mx.default_device())
    try:
        while (job := jobs.get()) is not None:
            params, x, y, results = job
            try:
                with mx.stream(stream):
                    with lock:
                        out = fn(params, x, y)
                    mx.eval(out)
                results.put((i, out, None))
            except BaseException as e:  # raised in the calling thread
                results.put((i, None, e))
    finally:
        # a thread's streams outliving it may abort the process as it exits (README), most often after a step failed
        mx.clear_streams()


def _stop(jobs: list[queue.SimpleQueue], threads: list[threading.Thread]) -> None:
    """End the threads, and wait for them: a thread's compiled functions (MLX caches them per thread) are released
    as it exits, which needs the interpreter alive; a daemon thread still running at exit aborts the process."""
    for q in jobs:
        q.put(None)
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join()
