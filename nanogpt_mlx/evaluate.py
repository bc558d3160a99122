"""Evaluation: HellaSwag (build-nanogpt's completion-style scoring) and mean loss over token shards.

HellaSwag: each example is a context and 4 endings. Every ending becomes one row of
`context tokens + tokens of " " + ending`; the model's per-token cross-entropy over the ending
tokens gives a summed loss (`acc` picks its argmin) and a mean loss (`acc_norm` picks its argmin).
Here each context runs once into a KV cache shared by its 4 endings, examples with equal context
lengths share a forward, and endings are right-padded: attention is causal, so padding after a
row's end cannot change its losses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from . import device
from .console import bar_off
from .data import DataLoader, check_batch_shape, check_rank
from .downloads import download
from .errors import UserError, check_int, first_line
from .files import atomic_path, cache_dir, named_dir, output_file, parse_json, user_path
from .model import GPT, KVCache, check_gpt
from .tokenizer import encode

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
URL_ENV = "NANOGPT_MLX_HELLASWAG_URL"  # override the download URL (tests use a local server)
HELLASWAG_VAL_SIZE = 10042

# Published figures to compare against (all on the 10,042 validation examples).
GPT2_HELLASWAG = {"acc": 0.2859, "acc_norm": 0.2955}  # GPT-2 124M, build-nanogpt's hellaswag.py
GPT2_HELLASWAG_TRAINING = 0.2945  # GPT-2 124M acc_norm as build-nanogpt's training-time eval reports it
GPT3_HELLASWAG = 0.337  # GPT-3 Small (124M) acc_norm, from the GPT-3 paper


# ----------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Example:
    index: int  # position in the file (0-based), the same on every rank
    ctx: str
    endings: tuple[str, str, str, str]
    label: int


def download_hellaswag(url: str | None = None, dest: str | os.PathLike | None = None, progress: bool = True,
                       local_option: str = "--data", python: str = "load_hellaswag(FILE)") -> Path:
    """The validation JSONL, downloaded once into the cache (atomically, and only once it parses as HellaSwag) and
    reused after; each URL has its own copy. `dest` (a leading `~` expanded) puts it elsewhere. A failure names
    `local_option` and `python`, the caller's ways to pass a local copy instead."""
    url = url or os.environ.get(URL_ENV) or HELLASWAG_URL
    if dest is None:
        mirror = "" if url == HELLASWAG_URL else hashlib.sha256(url.encode()).hexdigest()[:16]
        dest = cache_dir() / "hellaswag" / mirror / "hellaswag_val.jsonl"
    dest = user_path(named_dir(dest, "HellaSwag file", name="a file"))
    hint = f"pass {local_option} FILE with a local copy of hellaswag_val.jsonl (Python: {python})"
    return download(url, dest, "HellaSwag", hint, progress, check=load_hellaswag)


def load_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    """Parse HellaSwag JSONL (rowanz/hellaswag format: ctx, endings, label), checking every line; the first
    `limit` examples if given."""
    if limit is not None:
        check_int("limit", limit)
    path = user_path(named_dir(path, "HellaSwag file", name="a file"))
    if path.is_dir() or not path.exists():  # (a pipe is read: --data <(zcat hellaswag_val.jsonl.gz))
        raise UserError(f"{path}: {'is a directory, not the examples file' if path.is_dir() else 'file not found'}")
    examples: list[Example] = []
    with open(path, encoding="utf-8-sig") as f:  # (a byte order mark, as some editors save, is no JSON)
        try:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if line.strip():
                    examples.append(_parse_line(line, len(examples), f"{path}:{lineno}"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def _parse_line(line: str, index: int, where: str) -> Example:
    try:
        d = parse_json(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # nested too deeply, an integer of over 4300 digits
        raise UserError(f"{where}: not valid JSON ({first_line(e).split(';')[0]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object")
    for key in ("ctx", "endings", "label"):
        if key not in d:
            raise UserError(f"{where}: missing field {key!r}")
    ctx, endings, label = d["ctx"], d["endings"], d["label"]
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if not (isinstance(endings, list) and len(endings) == 4 and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings")
    if isinstance(label, str) and label.isascii() and label.isdigit():  # "2", not "²" (a digit int() refuses)
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 3:
        raise UserError(f"{where}: label {d['label']!r} is not an integer 0..3")
    return Example(index, ctx, tuple(endings), label)


Rendered = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]  # an example's context tokens and endings' tokens


def render_example(ex: Example) -> Rendered:
    """Context tokens and the tokens of each `" " + ending` (GPT-2 BPE puts the space in the word)."""
    return tuple(encode(ex.ctx)), tuple(tuple(encode(" " + e)) for e in ex.endings)


# -------------------------------------------------------------------------------- scoring
@dataclass
class ExampleScore:
    index: int
    label: int
    predicted: int  # argmin of the summed ending loss (acc)
    predicted_norm: int  # argmin of the mean ending loss (acc_norm)
    losses: list[float]  # summed cross-entropy of each ending
    mean_losses: list[float]  # per-token mean of each ending
    num_tokens: list[int]  # tokens in each ending


@dataclass
class HellaSwagResult:
    """Counts that ranks can sum, plus the per-example scores."""

    num_total: int = 0
    num_correct: int = 0
    num_correct_norm: int = 0
    records: list[ExampleScore] = field(default_factory=list, repr=False)  # (a notebook showed all 10,042)

    @property
    def acc(self) -> float:
        return self.num_correct / max(self.num_total, 1)

    @property
    def acc_norm(self) -> float:
        return self.num_correct_norm / max(self.num_total, 1)

    def __repr__(self) -> str:
        return (f"HellaSwagResult(acc={self.acc:.4f}, acc_norm={self.acc_norm:.4f}, num_total={self.num_total}, "
                f"records=[{len(self.records)} ExampleScore])")

    def count(self, rec: ExampleScore) -> None:
        """Count `rec` (its caller keeps the records, in the examples' order: they are scored in another)."""
        self.num_total += 1
        self.num_correct += rec.predicted == rec.label
        self.num_correct_norm += rec.predicted_norm == rec.label


def _repeat_cache(cache: list[KVCache], repeats: int) -> None:
    """Turn each cached sequence into `repeats` consecutive copies of it."""
    for layer in cache:
        layer.keys = mx.repeat(layer.keys[..., : layer.offset, :], repeats, axis=0)
        layer.values = mx.repeat(layer.values[..., : layer.offset, :], repeats, axis=0)


def ending_losses(model: GPT, contexts: Sequence[Sequence[int]], endings: Sequence[Sequence[Sequence[int]]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Summed cross-entropy and token count of each ending, both (n, 4), for n examples whose
    contexts have the same length.

    The contexts run once into a KV cache, which is then repeated for the 4 endings of each
    example: the numbers of build-nanogpt's 4 rows of context + ending, without running the
    context 4 times. Ending j's loss at token i comes from the logits at the position before it.
    """
    n = len(contexts)
    rows = [e for ends in endings for e in ends]  # 4n endings, example-major
    lengths = np.array([len(e) for e in rows])
    width = int(lengths.max())  # context + width fits the model: check_examples saw to it
    cache = model.make_cache()
    # cross-entropy in float32 from logits in the model's dtype (as under PyTorch's autocast)
    last = model(mx.array(contexts), cache)[:, -1].astype(mx.float32)  # (n, V): predicts each ending's first token
    first = nn.losses.cross_entropy(mx.repeat(last, 4, axis=0), mx.array([e[0] for e in rows]))
    summed = np.array(first).astype(np.float64)
    if width > 1:
        _repeat_cache(cache, 4)
        # feed every ending token but the last (its logits predict nothing), right-padded
        inputs = np.zeros((len(rows), width - 1), dtype=np.int32)
        for r, e in enumerate(rows):
            inputs[r, : len(e) - 1] = e[:-1]
        logits = model(mx.array(inputs), cache).reshape(inputs.size, -1)
        # cross-entropy of the real positions only (row-major, so in the order of the targets)
        valid = np.flatnonzero(np.arange(width - 1) < (lengths - 1)[:, None])
        targets = mx.array([t for e in rows for t in e[1:]])
        losses = nn.losses.cross_entropy(logits[mx.array(valid)].astype(mx.float32), targets)
        summed += np.bincount(valid // (width - 1), weights=np.array(losses), minlength=len(rows))
    return summed.reshape(n, 4), lengths.reshape(n, 4)


def _score(ex: Example, summed: np.ndarray, counts: np.ndarray) -> ExampleScore:
    mean = summed / counts
    return ExampleScore(ex.index, ex.label, int(np.argmin(summed)), int(np.argmin(mean)),
                        summed.tolist(), mean.tolist(), counts.tolist())


def check_examples(model: GPT, examples: Sequence[Example]) -> list[Rendered]:
    """Each example's context and ending tokens, in the order of `examples`, checked against the model: ids within
    its vocab, every row (context + ending) within its context."""
    rendered = [render_example(ex) for ex in examples]
    for ex, (ctx, endings) in zip(examples, rendered):
        model.check_token_ids([*ctx, *(t for e in endings for t in e)], f"HellaSwag example {ex.index}")
        longest = len(ctx) + max(map(len, endings))
        if longest > model.config.block_size:
            raise UserError(f"HellaSwag example {ex.index}: a row has {longest} tokens, more than the model's "
                            f"context of {model.config.block_size}")
    return rendered


def _check_examples_given(examples) -> None:
    """Refuse what is no sequence of Examples (a path to them was an AttributeError deep inside), or none."""
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        got = repr(examples) if isinstance(examples, (str, os.PathLike)) else f"a {type(examples).__name__}"
    elif not examples:  # (scored, they gave acc 0.0 of nothing)
        got = "none"
    else:
        got = next((f"a {type(ex).__name__} among them" for ex in examples if not isinstance(ex, Example)), None)
    if got:
        raise UserError(f"examples must be a list of HellaSwag Examples (load_hellaswag(path) reads them), got {got}")


def score_hellaswag(model: GPT, examples: Sequence[Example], batch_examples: int | None = None, rank: int = 0,
                    world: int = 1, progress: bool = True, rendered: Sequence[Rendered] | None = None,
                    after_batch: Callable[[int, int], None] | None = None) -> HellaSwagResult:
    """Score this rank's share of `examples` (every world-th, from rank), up to `batch_examples` per forward.

    The records come back in the order of `examples`. Sum the counts of all ranks for the full result. `rendered`:
    check_examples' result for all `examples` and this model, kept by a caller that scores them again and again.
    `after_batch(done, total)`, called after each forward with this rank's examples scored and to score, may end
    the scoring by raising.
    Examples are told apart by their position, not their index: two files' examples, concatenated, repeat indices.
    """
    check_gpt(model)
    _check_examples_given(examples)
    if batch_examples is None:
        batch_examples = device.PROFILE.eval_batch  # rows per forward only pay off on a GPU
    check_int("batch_examples", batch_examples)
    check_rank(rank, world)
    if rendered is not None and len(rendered) != len(examples):
        raise UserError(f"rendered holds {len(rendered)} examples' tokens for {len(examples)} examples")
    mine = examples[rank::world]
    tokens = check_examples(model, mine) if rendered is None else rendered[rank::world]
    # Examples with contexts of equal length can share a forward (their caches line up); sorting
    # each such group by ending length keeps the padding small. Batches hold positions in `mine`.
    groups: dict[int, list[int]] = {}
    for i, (ctx, _) in enumerate(tokens):
        groups.setdefault(len(ctx), []).append(i)
    batches = []
    for group in groups.values():
        group.sort(key=lambda i: max(map(len, tokens[i][1])))
        batches += [group[j : j + batch_examples] for j in range(0, len(group), batch_examples)]
    result = HellaSwagResult()
    records: list[ExampleScore | None] = [None] * len(mine)
    with tqdm(total=len(mine), desc="hellaswag", unit="ex", disable=bar_off(progress)) as bar:
        for batch in batches:
            summed, counts = ending_losses(model, [tokens[i][0] for i in batch], [tokens[i][1] for i in batch])
            if not (finite := np.isfinite(summed).all(axis=1)).all():  # argmin would pick a NaN's ending, or the first
                raise model.overflowed(f"on HellaSwag example {mine[batch[int(np.argmin(finite))]].index}")
            for i, s, n in zip(batch, summed, counts):
                records[i] = _score(mine[i], s, n)
                result.count(records[i])
            bar.update(len(batch))
            bar.set_postfix(acc=f"{result.acc:.4f}", acc_norm=f"{result.acc_norm:.4f}")
            if after_batch:
                after_batch(result.num_total, len(mine))  # (not bar.n: a bar disabled counts nothing)
    result.records = records
    return result


def write_records(path: str | os.PathLike, records: Sequence[ExampleScore]) -> None:
    """One JSON object per example (atomic)."""
    with atomic_path(output_file(path, "records file")) as tmp, open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(asdict(rec)) + "\n")


# ---------------------------------------------------------------------------- token loss
def loader_loss(model: GPT, loader: DataLoader, batches: int, progress: bool = False,
                loss: Callable[[mx.array, mx.array], mx.array] | None = None,
                after_batch: Callable[[int, int], None] | None = None) -> float:
    """Mean cross-entropy over the loader's first `batches` batches (it is reset first), as
    build-nanogpt's periodic validation: the mean of the per-batch mean losses. `loss(x, y)` defaults to the
    model's (GPT.loss, no gradient); the Trainer passes its compiled one. `after_batch(done, batches)`, called after
    each batch, may end the loss by raising."""
    check_gpt(model)
    check_int("batches", batches)
    loss = loss or partial(model.loss, grad=False)
    loader.reset()
    total = 0.0
    for done in tqdm(range(1, batches + 1), desc="loss", unit="batch", disable=bar_off(progress)):
        total += loss(*(mx.array(a) for a in loader.next_batch())).item()
        if not math.isfinite(total):  # a NaN loss printed as one, with status 0
            raise model.overflowed(f"on batch {done} of {batches}")
        if after_batch:
            after_batch(done, batches)
    return total / batches


def eval_loss(model: GPT, data_dir: str | os.PathLike, split: str = "val", batches: int = 20, B: int = 8,
              T: int | None = None, rank: int = 0, world: int = 1, progress: bool = True) -> float:
    """Mean loss over `batches` (B, T) batches of a split's shards, at most one pass over them.

    T defaults to the model's context.
    """
    loader = eval_loader(model, data_dir, split, B, T, rank, world)
    return loader_loss(model, loader, loader.within_one_pass(batches), progress)


def eval_loader(model: GPT, data_dir: str | os.PathLike, split: str = "val", B: int = 8, T: int | None = None,
                rank: int = 0, world: int = 1) -> DataLoader:
    """The (B, T) batches of a split that eval_loss reads (one pass at most); T defaults to the model's context."""
    check_gpt(model)
    T = model.config.block_size if T is None else T
    check_batch_shape(B, T, rank, world)
    if T > model.config.block_size:
        raise UserError(f"sequence length {T} exceeds the model's context of {model.config.block_size}")
    return DataLoader(data_dir, split, B, T, rank, world, vocab_size=model.config.vocab_size)


def perplexity(loss: float) -> float:
    """exp(loss), inf past what a float holds; a nan loss's is nan (it was inf)."""
    try:  # a float, or a one-number array (MLX's or NumPy's: a loss as the model returns it)
        value = None if isinstance(loss, (str, bytes, bool)) else float(loss)
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise UserError(f"loss must be a number, got {loss!r}")
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
