"""Estimate a training step's peak memory before it runs, and refuse a run that cannot fit (and a batch of
samples that cannot: check_sampling).

An out-of-memory crash on a Mac (unified memory) can take minutes of swapping before it
happens, and on a GPU it comes after the model is built and compiled. The estimate adds up what
one optimizer step holds: float32 master weights, AdamW's two moments (Muon's one), float32 gradient sums, a
bfloat16 copy of the weights when computing in bfloat16, and the larger of two peaks: the activations the
backward pass needs for one micro-batch with the fused head + loss's buffers, or the optimizer update's new
weights and gradient copies (OptimizerMemory), which outweigh them where the parameters outweigh the
batch (a large model fine-tuned at a small batch). The head's share was fitted to
`mx.get_peak_memory()` of real compiled steps on MLX's CPU backend (tests/test_memory.py checks
the estimate against measured steps): its chunks run in order (loss.py), but the host queues
several ahead, so a fitted number of float32 arrays of a chunk's size are alive at once, though never
more than a fitted number of float32 N x V arrays, as when MLX was free to schedule all chunks at once
(_HEAD_ARRAYS, by how the step computes the logits' gradient), plus float32 sums of the head's weight
gradient. With the CUDA kernel (cuda.py) the head holds the logits and
their gradient in the compute dtype: measured on an H200 when the kernel took all rows at once, and
kept for all rows (the queued chunks). The activations per layer come from the device profile,
fitted to steps measured on each backend.

A measured step can also cap the memory MLX uses (`--cap-memory`). MLX allocates an op's outputs
when the host queues the op, not when the device runs it, and keeps its inputs until the work
queued with it has run (on CUDA a graph of up to 100 ops; up to 10 such batches queue before the
host waits). So a step's peak includes buffers of work queued ahead of the device. Under a memory
limit MLX instead waits for queued work whenever its active memory is past the limit: below any
step's need (start_measuring) it runs op by op and its peak is what the step itself needs; a cap
just above that (cap) leaves the host room to queue ahead without the peak growing past it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import mlx.core as mx

from . import device
from .console import byte_unit, warn
from .errors import UserError, check_int
from .kernels import query_blocks
from .loss import gemm_group, scales_in_gemms
from .model import GPTConfig, KVCache

MEASURE_LIMIT = 1 << 20  # bytes: a memory limit below any step's need, under which MLX runs op by op
CAP_HEADROOM = 1.25  # the cap over a measured need: room for the host to queue work ahead of the device
CLOSE = 0.9  # a step or a batch of samples past this share of the memory is warned of; the samples advised stay within
# float32 N x V arrays alive at the peak of the fused head + loss, at most (a, b): a N x V and b of one chunk's rows
# x V (fitted on the CPU backend). The float32 step scales the gradient on the GEMMs' small sides (loss.py) and keeps
# fewer, more with a soft-cap (its slope); the others store (softmax - onehot) / N per chunk.
_HEAD_ARRAYS = {"scaled": (4.0, 21), "scaled, capped": (7.0, 24), "stored": (5.5, 27)}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LEAST_LIMIT = 1e6  # bytes: a largest_batch limit below this is no size in bytes (8 meant 8 GB) and fits no step


@dataclass(frozen=True)
class OptimizerMemory:
    """What a recipe's optimizer holds (recipes.Recipe.memory): `one_moment` parameters whose state is one float32
    array (Muon's), the rest AdamW's two; and `update_bytes` a parameter that its step allocates beyond the
    gradients term, after the backward freed the activations and the head's buffers: the new weights (queued before
    the old ones are freed), the gradients' packed and summed copies, Muon's Newton-Schulz iterates (the new
    moments take over the old ones' buffers: optim.unfused). Fitted on the CPU backend, above steps whose parameters
    outweigh the rest: float32 and bfloat16, with and without accumulation and step threads (tests/test_memory.py)."""
    one_moment: int = 0
    update_bytes: int = 8  # AdamW's


@dataclass(frozen=True)
class Estimate:
    params: int
    weights: int  # float32 masters + the compute-dtype copy
    optimizer: int  # AdamW's m and v; Muon's momentum alone
    gradients: int  # the float32 running sum plus one micro-step's raw gradients
    activations: int  # what the backward pass needs, for one micro-batch
    head: int  # the fused head + loss's N x V logits, gradients and temporaries
    update: int  # the optimizer step's new weights and gradient copies, once the activations and head are freed

    @property
    def total(self) -> int:
        """The larger of the backward's peak and the update's: each comes when the other's buffers are gone."""
        return self.weights + self.optimizer + self.gradients + max(self.activations + self.head, self.update)

    def describe(self) -> str:
        """"~1.23 GB (weights 0.50, ...)": the total and the parts it adds, in GB, or in MB below 1 GB."""
        unit, scale, digits = byte_unit(self.total)
        peak = ("activations", "head") if self.activations + self.head >= self.update else ("update",)
        parts = ", ".join(f"{name} {getattr(self, name) / scale:.{digits}f}"
                          for name in ("weights", "optimizer", "gradients", *peak))
        return f"~{self.total / scale:.{digits}f} {unit} ({parts})"


def _checked(config: GPTConfig, seq_len: int, dtype: str, profile: device.Profile | None, threads: int,
             batch_size: int = 1) -> str:
    """Refuse (UserError) arguments that would fail inside the estimate, far from their cause, or silently estimate
    nothing (batch 0); the dtype's name, '' made the profile's (the device's), as a TrainConfig's is."""
    if not isinstance(config, GPTConfig):
        if type(config).__name__ == "TrainConfig":  # (config.py imports this module, through recipes.py)
            raise UserError("config must be the model's GPTConfig, not a TrainConfig: a run's random init is "
                            "nanogpt_mlx.config.model_config(cfg); with init_from, "
                            "weights.load_model(cfg.init_from).config")
        raise UserError(f"config must be a GPTConfig, got {config!r}")
    check_int("batch_size", batch_size)
    check_int("seq_len", seq_len)
    check_int("threads", threads)
    dtype = dtype if dtype != "" else (profile or device.PROFILE).dtype
    if not isinstance(dtype, str) or dtype not in _BYTES:  # (an mx.Dtype is no key: the configs name theirs)
        raise UserError(f"dtype must be one of {', '.join(map(repr, _BYTES))} or '' (the device's), got {dtype!r}")
    return dtype


def estimate(config: GPTConfig, batch_size: int, seq_len: int, dtype: str, checkpointing: bool = False,
             profile: device.Profile | None = None, threads: int = 1,
             optimizer: OptimizerMemory = OptimizerMemory()) -> Estimate:
    """The estimated peak memory (bytes) of one training step of `config` (a GPTConfig) at (batch_size, seq_len) in
    `dtype` ('float32', 'bfloat16', 'float16'; '': the profile's, as a TrainConfig's ''), its rows split over
    `threads` step threads (threads.py), each of which keeps a float32 gradient until they are added; `optimizer`:
    what the recipe's optimizer holds (AdamW's by default). Refuses (UserError) other arguments."""
    dtype = _checked(config, seq_len, dtype, profile, threads, batch_size)
    return _estimate(config, batch_size, seq_len, dtype, checkpointing, profile, threads, optimizer)


def _estimate(config: GPTConfig, batch_size: int, seq_len: int, dtype: str, checkpointing: bool = False,
              profile: device.Profile | None = None, threads: int = 1,
              optimizer: OptimizerMemory = OptimizerMemory()) -> Estimate:
    """estimate, of arguments checked (_checked): largest_batch and check estimate many sizes."""
    profile = profile or device.PROFILE
    b = _BYTES[dtype]
    C, L, V, nh = config.n_embd, config.n_layer, config.vocab_size, config.n_head
    norm = 2 * C if config.norm == "layernorm" else C  # gain and bias, or a gain
    params = (V * C * (1 if config.tie_embeddings else 2) + (0 if config.rope else config.block_size * C)
              + L * (12 * C * C + (9 * C if config.bias else 0) + 2 * norm) + norm * (2 if config.embed_norm else 1)
              + config.value_embeds * (V * C + 4) + (L // 2 if config.unet else 0))
    n = batch_size * seq_len
    float32 = profile.saved_float32 if config.mlp == "gelu" else 0  # (ReLU^2 keeps its dtype)
    per_layer = (profile.saved_per_layer * b + float32 * (4 - b)) * C * n
    # float32 scores of all blocks of queries (kernels.query_blocks) for all heads of the batch, and of the largest
    areas = [(j - i) * end for i, j, end in query_blocks(seq_len, seq_len, causal=True)]
    scores, block_scores = nh * batch_size * 4 * sum(areas), nh * batch_size * 4 * max(areas)
    fused = profile.fused_attention(dtype, C // nh)
    per_layer += 2 * scores if fused is None else nh * n * 4  # plain ops keep each block's exp(scores - max) for the
    # backward, and a layer's float32 scores are alive around it (on the CPU, more than one array); a
    # fused kernel keeps a log-sum-exp (or row statistic) per query
    activations = L * per_layer + (4 * block_scores if fused is False else 0)  # a recomputing backward's block
    if checkpointing:  # ideally each block's input and one block at a time; MLX's CUDA backend keeps more
        activations -= int(profile.checkpoint_frees * (activations - L * C * n * b - per_layer))
    activations += 4 * C * n * b  # embeddings, final LayerNorm, the hidden states into the head
    activations += profile.backward_work * C * n * 4  # the temporaries of the layer whose backward runs (float32
    # where the kernels compute in it, a bfloat16 step's too)
    if profile.cuda_kernels:
        head = 2 * n * V * b
    else:
        rows = profile.loss_rows or n
        kind = "scaled, capped" if config.logit_softcap else "scaled"
        kind = kind if scales_in_gemms(getattr(mx, dtype)) else "stored"
        nv, chunks = _HEAD_ARRAYS[kind]
        head = int(min(nv * n, chunks * rows) * V * 4)  # MLX's host queues as many chunks ahead for all threads
        if n // threads > gemm_group(rows):  # several groups sum the weight gradient in float32 (loss.py)
            head += 2 * V * C * 4 * threads
    # a micro-step's raw gradients and their float32 sum; each further thread's float32 gradient until they are added
    return Estimate(params=params, weights=params * (4 + (b if b != 4 else 0)),
                    optimizer=4 * (2 * params - optimizer.one_moment),
                    gradients=params * (4 + b + 4 * (threads - 1)), activations=activations, head=head,
                    update=optimizer.update_bytes * params)


def step_threads(batch_size: int, threads: int, fixed: bool) -> int:
    """The step threads (threads.py) of a micro-batch of `batch_size` rows, as train.Trainer chooses them: `threads`
    if fixed (the run's --threads, which must divide the batch), else their greatest common divisor (the device's
    choice, `threads` its most)."""
    return threads if fixed else math.gcd(batch_size, threads)


def largest_batch(config: GPTConfig, seq_len: int, dtype: str, checkpointing: bool, limit: float,
                  profile: device.Profile | None = None, threads: int = 1, fixed_threads: bool = False,
                  rows: int = 0, optimizer: OptimizerMemory = OptimizerMemory()) -> int:
    """The largest micro-batch whose estimate fits in `limit` bytes (0 if none does; bytes, not check's GB: a
    limit below 1e6 is refused), with its step threads (step_threads): a divisor of `rows`, the rows of a rank's
    optimizer step (so that gradient accumulation keeps total_batch_size), or without rows a power of two; with
    fixed threads, a multiple of them. The other arguments: as estimate's."""
    dtype = _checked(config, seq_len, dtype, profile, threads)
    check_int("rows", rows, 0)
    # (`not >=`: a NaN too, under which nothing fits)
    if not isinstance(limit, numbers.Real) or isinstance(limit, bool) or not limit >= _LEAST_LIMIT:
        raise UserError(f"limit is in bytes (8 GB is 8e9), at least {_LEAST_LIMIT:g}; got {limit!r}")
    return _largest_batch(config, seq_len, dtype, checkpointing, limit, profile, threads, fixed_threads, rows,
                          optimizer)


def _largest_batch(config: GPTConfig, seq_len: int, dtype: str, checkpointing: bool, limit: float,
                   profile: device.Profile | None = None, threads: int = 1, fixed_threads: bool = False,
                   rows: int = 0, optimizer: OptimizerMemory = OptimizerMemory()) -> int:
    """largest_batch, of arguments checked (_checked); check's limit may be any (a --max-memory of 0.0001 GB)."""
    sizes = [b for b in range(1, rows + 1) if rows % b == 0] if rows else [2 ** b for b in range(16)]
    # every size: with the device's threads the estimate need not grow with b (batch 2 on 2 threads keeps more than
    # batch 3 on gcd(3, 2) = 1), and stopping at the first size that did not fit advised a smaller one than fits
    return max((b for b in sizes if (not fixed_threads or b % threads == 0) and _estimate(
        config, b, seq_len, dtype, checkpointing, profile, step_threads(b, threads, fixed_threads), optimizer).total
        <= limit), default=0)


def check(config: GPTConfig, batch_size: int, seq_len: int, dtype: str, checkpointing: bool,
          max_memory_gb: float = 0.0, share: int = 1, threads: int = 1, fixed_threads: bool = False,
          rows: int = 0, batch_fixed: bool = False, optimizer: OptimizerMemory = OptimizerMemory()) -> Estimate:
    """Refuse (UserError) a run whose estimated peak exceeds max_memory_gb (0: the device's memory, of which each
    of `share` ranks on this machine gets its share), with the batch size (a divisor of `rows`, a rank's rows per
    optimizer step, if given; not if `batch_fixed`, a resumed run's) or checkpointing that would fit, each with the
    step threads it would run on (step_threads); warn when it comes within 10%. `optimizer`: as estimate's."""
    dtype = _checked(config, seq_len, dtype, None, threads, batch_size)
    est_threads = step_threads(batch_size, threads, fixed_threads)
    est = _estimate(config, batch_size, seq_len, dtype, checkpointing, threads=est_threads, optimizer=optimizer)
    mine = device.memory_bytes() / share
    mine_said = f"this device's {mine / 1e9:.1f} GB" if share == 1 else \
        f"{mine / 1e9:.1f} GB, this device's memory split among its {share} ranks"
    if max_memory_gb:
        limit, where = max_memory_gb * 1e9, f"--max-memory {max_memory_gb:g} GB"
        if mine < est.total <= limit:  # allowed past the device, where it would crash or swap
            warn(f"a step needs {est.describe()}, more than {mine_said}: {where} lets it start")
    else:
        limit, where = mine, mine_said
    if est.total > limit:
        advice, fits = [], 0
        if not batch_fixed:
            fits = _largest_batch(config, seq_len, dtype, checkpointing, limit, threads=threads,
                                  fixed_threads=fixed_threads, rows=rows, optimizer=optimizer)
            if fits:
                advice.append(f"--batch-size {fits} fits (--total-batch-size stays, by more accumulation)")
        if not checkpointing and batch_fixed:
            if _estimate(config, batch_size, seq_len, dtype, True, threads=est_threads, optimizer=optimizer).total \
                    <= limit:
                advice.append("--activation-checkpointing fits it")
        elif not checkpointing:
            fits_ckpt = _largest_batch(config, seq_len, dtype, True, limit, threads=threads,
                                       fixed_threads=fixed_threads, rows=rows, optimizer=optimizer)
            if fits_ckpt > fits:  # (not where the head, which it does not shrink, is what fills the memory)
                advice.append(f"--activation-checkpointing fits --batch-size {fits_ckpt}")
        # fewer step threads at this batch: each thread past the first adds a float32 copy of the gradients
        fewer = next((n for n in range(est_threads - 1, 0, -1) if batch_size % n == 0 and _estimate(
            config, batch_size, seq_len, dtype, checkpointing, threads=n, optimizer=optimizer).total <= limit), 0)
        if fewer:
            advice.append(f"--threads {fewer} fits it")
        larger = "a larger --max-memory" if max_memory_gb else "a larger device"
        otherwise = f"a resumed run keeps its model and batches: continue it with {larger}, or start a new run " \
            "from its weights (--init-from) with a smaller --batch-size" if batch_fixed else \
            "choose a smaller model or sequence length"
        raise UserError(f"a step of batch {batch_size} x {seq_len} needs {est.describe()}, more than {where}; "
                        + ("; ".join(advice) if advice else otherwise))
    if est.total > CLOSE * limit:
        warn(f"a step needs {est.describe()}, close to {where}")
    return est


def sample_bytes(config: GPTConfig, prompt_len: int, new_tokens: int, dtype_bytes: int, top_p: bool = False) -> int:
    """The memory one sample of a batch holds: its KV cache (grown KVCache.step positions at a time; while a
    layer's grows, its old keys and values and the new ones are held at once), the prompt's pass (MLP hidden
    states, one layer's float32 scores) and a few float32 vocab-sized rows for the next-token draw; with `top_p`
    (sample.filtered_logits) more: the order, sorted weights, their sums and masks."""
    C, L, nh, V = config.n_embd, config.n_layer, config.n_head, config.vocab_size
    positions = -(-(prompt_len + new_tokens) // KVCache.step) * KVCache.step
    rows = 6 + (5 if top_p else 0)  # vocab-sized rows of 4 bytes
    cache = 2 * (L + 1) * positions * C
    return (cache + 2 * prompt_len * 4 * C) * dtype_bytes + (nh * prompt_len ** 2 + rows * V) * 4


def check_sampling(config: GPTConfig, num_samples: int, prompt_len: int, new_tokens: int, weights: int,
                   dtype_bytes: int, top_p: bool = False) -> None:
    """Refuse (UserError) generating num_samples sequences at once where they (sample_bytes each) would not fit
    beside the model's `weights` bytes: MLX's CPU backend crashes rather than failing an allocation. Warn within
    10% of it; the count advised leaves that tenth."""
    per_sample = sample_bytes(config, prompt_len, new_tokens, dtype_bytes, top_p)
    room, need = device.memory_bytes() - weights, num_samples * per_sample
    if need > room:
        raise UserError(f"{num_samples} samples at once need ~{need / 1e9:.1f} GB beside the model, more than this "
                        f"device's memory leaves; at most {max(int(CLOSE * room) // per_sample, 0)} fit")
    if need > CLOSE * room:
        warn(f"{num_samples} samples at once need ~{need / 1e9:.1f} GB beside the model, close to what this device's "
             "memory leaves")


def start_measuring() -> None:
    """From now on MLX runs op by op, queuing nothing ahead of the device, and the peak is measured afresh."""
    mx.set_memory_limit(MEASURE_LIMIT)
    mx.reset_peak_memory()


def cap(max_memory_gb: float = 0.0) -> tuple[int, int]:
    """Cap MLX's memory CAP_HEADROOM above the peak since start_measuring (what the work measured there needs
    when nothing is queued ahead of it), or at max_memory_gb if that is lower; returns (need, cap) in bytes."""
    need = mx.get_peak_memory()
    limit = int(need * CAP_HEADROOM)
    if max_memory_gb:
        limit = min(limit, int(max_memory_gb * 1e9))
    mx.set_memory_limit(limit)
    return need, limit
