"""Text generation: top-k / top-p / temperature / greedy sampling with a KV cache, streamed."""

from __future__ import annotations

import codecs
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, replace

import mlx.core as mx
from mlx.utils import tree_flatten

from . import memory
from .errors import UserError, check_bool, check_fields, check_int, check_seed, check_types
from .model import GPT, GPT2_VOCAB_SIZE, check_gpt
from .tokenizer import EOT, decode, encode, get_tokenizer

_TINY = mx.finfo(mx.float32).smallest_normal  # the smallest temperature divided by (filtered_logits)


@dataclass(frozen=True)  # checked once, at creation: a field changed after would skip the checks
class SampleConfig:
    max_new_tokens: int = 30
    temperature: float = 1.0
    top_k: int | None = 50  # build-nanogpt's default
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None  # None: drawn from MLX's global random state (mx.random.seed fixes it; a process's own)
    stop_at_eot: bool = True
    crop: bool = False  # drop the oldest prompt tokens instead of refusing a prompt that does not fit

    def __post_init__(self):
        check_types(self)
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 or self.greedy and self.temperature == 0):  # nan too
            raise UserError(f"temperature must be > 0 (use greedy for argmax), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            check_seed("seed", self.seed)


def next_token(logits: mx.array, cfg: SampleConfig | None = None, key: mx.array | None = None) -> mx.array:
    """logits (B, V) of the last position -> next token ids (B,). Padded vocab is never chosen.

    Draws with `key`, or MLX's global random state when it is None. Row i draws with a key of its own, made from
    `key` and i alone (_row_keys), so the first rows of a larger batch draw as a smaller batch does (one key for the
    batch lays its noise out over all the rows).
    """
    cfg = _config(cfg)
    if cfg.greedy:
        return mx.argmax(_checked_logits(logits)[:, :GPT2_VOCAB_SIZE], axis=-1)
    filtered = filtered_logits(logits, cfg)
    if key is None:
        return mx.random.categorical(filtered)
    keys = _row_keys(key, len(filtered))
    return mx.concatenate([mx.random.categorical(filtered[i : i + 1], key=k) for i, k in enumerate(keys)])


def _row_keys(key: mx.array, n: int) -> list[mx.array]:
    """n keys: `key` itself, then each split off the one before (mx.random.split(key, n)'s keys differ with n)."""
    keys = [key]
    while len(keys) < n:
        keys.append(mx.random.split(keys[-1])[1])
    return keys


def filtered_logits(logits: mx.array, cfg: SampleConfig | None = None) -> mx.array:
    """logits (B, V) -> float32 (B, GPT-2's vocab) divided by the temperature, -inf where top-k or top-p drop
    a token: what next_token draws from (cfg defaults to SampleConfig())."""
    cfg = _config(cfg)
    logits = _checked_logits(logits)[:, :GPT2_VOCAB_SIZE].astype(mx.float32)
    # from the largest logit down: a tiny temperature then tends to greedy instead of overflowing to inf - inf; and
    # at least float32's smallest normal number, which a smaller one rounds to 0 (the largest logit 0 / 0, nan)
    logits = (logits - logits.max(axis=-1, keepdims=True)) / max(cfg.temperature, _TINY)
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = mx.partition(logits, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]  # k-th largest
        logits = mx.where(logits < kth, -mx.inf, logits)
    if cfg.top_p is not None and cfg.top_p < 1:
        # keep the fewest most likely tokens whose mass reaches top_p (the likeliest always stays): drop a token
        # if it and all less likely ones hold at most 1 - top_p, as transformers' TopPLogitsWarper does. Those
        # masses are summed from the smallest up: added onto a float32 sum near 1, 10^4 probabilities of ~1e-6
        # rounded away 1e-4 of the mass, and top_p 0.99 kept ~50 tokens too few
        order = mx.argsort(logits, axis=-1)
        weights = mx.exp(mx.take_along_axis(logits, order, axis=-1))  # not normalized: the largest is 1
        tail = mx.cumsum(weights, axis=-1)
        # (the likeliest stays also where 1 - top_p rounds to 1: a top_p below float32's resolution)
        drop_sorted = (tail <= (1 - cfg.top_p) * tail[:, -1:]) & (mx.arange(tail.shape[-1]) < tail.shape[-1] - 1)
        drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
        logits = mx.where(drop, -mx.inf, logits)
    return logits


def _checked_logits(logits: mx.array) -> mx.array:
    """logits, refused unless an mx.array of shape (batch, vocab): one row of shape (V,) was an indexing error."""
    if not isinstance(logits, mx.array) or logits.ndim != 2:
        raise UserError(f"logits must be an mx.array of shape (batch, vocab), got {getattr(logits, 'shape', logits)!r}")
    return logits


def _is_integer(dtype) -> bool:
    """Whether an MLX or NumPy dtype holds integers (NumPy's kinds as data.open_shard checks them)."""
    return mx.issubdtype(dtype, mx.integer) if isinstance(dtype, mx.Dtype) else dtype.kind in "iu"


def _config(cfg: SampleConfig | None, settings: dict | None = None) -> SampleConfig:
    """cfg, or the defaults for None, with `settings` (SampleConfig fields) over it; anything else is refused (a
    number passed where num_samples goes)."""
    if cfg is None:
        cfg = SampleConfig()
    if not isinstance(cfg, SampleConfig):
        raise UserError(f"cfg must be a SampleConfig, got {cfg!r}")
    if settings:
        check_fields(SampleConfig, settings)
        cfg = replace(cfg, **settings)  # (checked again, as made)
    return cfg


def prepare_prompt(model: GPT, ids: list[int], cfg: SampleConfig | None = None) -> list[int]:
    """Check that the prompt's tokens are in the model's vocab and that prompt + new tokens fit the context;
    crop the prompt's start if asked to."""
    check_gpt(model)
    cfg = _config(cfg)
    room = model.config.block_size - cfg.max_new_tokens + 1  # the last new token is never fed back
    if hasattr(ids, "ndim"):  # a NumPy or MLX array, whose truth value is no emptiness test
        if ids.ndim != 1 or not _is_integer(ids.dtype):
            raise UserError(f"the prompt's token ids must be a list or a 1-D integer array, got a {ids.ndim}-D "
                            f"array of {ids.dtype}")
        ids = [int(i) for i in ids.tolist()]
    elif not isinstance(ids, (list, tuple)):  # a str's or bytes' items are no token ids
        raise UserError(f"the prompt's token ids must be a list or a 1-D integer array, got a {type(ids).__name__}"
                        + (" (text goes to sample_texts or stream_text)" if isinstance(ids, str) else ""))
    else:
        bad = [i for i in ids if not isinstance(i, numbers.Integral) or isinstance(i, bool)][:1]
        if bad:
            raise UserError(f"the prompt's token ids must be integers, got {bad[0]!r}")
        ids = [int(i) for i in ids]  # NumPy integers too
    empty = not ids
    if empty:  # unconditional generation starts from <|endoftext|>, as GPT-2 does
        ids = [EOT]
    model.check_token_ids(ids, "an empty prompt (it starts from <|endoftext|>)" if empty else "the prompt")
    if len(ids) <= room:
        return ids
    if cfg.crop and room > 0:
        return ids[-room:]
    crop = "" if room <= 0 else "; pass --crop to keep its end (Python: SampleConfig(crop=True))"
    prompt = "an empty prompt's <|endoftext|>" if empty else f"a prompt of {len(ids)} token{'s' * (len(ids) != 1)}"
    raise UserError(f"{prompt} + {cfg.max_new_tokens} new tokens exceeds the model's context of "
                    f"{model.config.block_size}{crop}")


def generate(model: GPT, prompt_ids: list[int], cfg: SampleConfig | None = None, num_samples: int = 1,
             use_cache: bool = True) -> Iterator[mx.array]:
    """An iterator of the next token of each sample, shape (num_samples,), until done; the arguments are checked
    (and the batch against the device's memory) when it is called, not at the first token.

    Step t+1 is queued (mx.async_eval) before step t is read, so building its graph and the
    caller's work overlap the computation. With the same seed the cached and uncached paths
    draw from the same random keys: the same greedy tokens, and the same sampled ones unless their
    logits' rounding, which differs between the paths (a new position's matmuls alone, or the whole sequence's),
    moves a draw across the line between two tokens. A finished sample (it
    emitted <|endoftext|>) keeps yielding EOT until all are finished. cfg defaults to SampleConfig(). Tokens are
    drawn from GPT-2's vocab only (next_token): a model with more rows never samples those.
    """
    cfg = _config(cfg)
    check_int("num_samples", num_samples)
    check_bool("use_cache", use_cache)
    ids = prepare_prompt(model, prompt_ids, cfg)
    weights = tree_flatten(model.parameters())
    memory.check_sampling(model.config, num_samples, len(ids), cfg.max_new_tokens, sum(w.nbytes for _, w in weights),
                          model.head_weight.dtype.size, top_p=not cfg.greedy and (cfg.top_p or 1) < 1)
    return _generate(model, ids, cfg, num_samples, use_cache)


def _generate(model: GPT, ids: list[int], cfg: SampleConfig, num_samples: int, use_cache: bool
              ) -> Iterator[mx.array]:
    """generate's tokens, for checked arguments."""
    # (from MLX's global state, not os.urandom: an MLX user's mx.random.seed(0) fixes the samples)
    seed = cfg.seed if cfg.seed is not None else mx.random.randint(0, 2**31 - 1, ()).item()
    key = mx.random.key(seed)

    def next_key() -> mx.array:
        """The next token's key, split off the one before: more new tokens extend fewer, token for token."""
        nonlocal key
        key, sub = mx.random.split(key)
        return sub

    cache = model.make_cache() if use_cache else None
    x = mx.array([ids] * num_samples)  # (B, T): the whole sequence, for the uncached path

    def step(inputs: mx.array, done: mx.array, key: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        h = model.hidden(inputs, cache)[:, -1, :]  # only the last position needs logits
        logits = model.head(h)
        tok = next_token(logits, cfg, key)
        if cfg.stop_at_eot:
            tok = mx.where(done, EOT, tok)
            done = done | (tok == EOT)
        return tok, done, mx.isfinite(logits).all()  # (B x V values: nothing beside the head's matmul)

    pending = step(x, mx.zeros((num_samples,), dtype=mx.bool_), next_key())
    mx.async_eval(*pending)
    for i in range(cfg.max_new_tokens):
        tok, done, finite = pending
        if i + 1 < cfg.max_new_tokens:  # queue the next step before waiting for this one
            if cache is None:
                x = mx.concatenate([x, tok[:, None]], axis=1)
            pending = step(tok[:, None] if cache is not None else x, done, next_key())
            mx.async_eval(*pending)
        if not finite.item():  # drawn from them, the token was "!" (id 0) or any
            raise model.overflowed(f"at new token {i + 1}")
        yield tok
        if cfg.stop_at_eot and done.all().item():
            return


def _prompt_ids(model: GPT, prompt: str, cfg: SampleConfig) -> list[int]:
    if not isinstance(prompt, str):  # None was a TypeError from inside the tokenizer
        raise UserError(f"the prompt must be text (a str), got {type(prompt).__name__}")
    return prepare_prompt(model, encode(prompt, special=True), cfg)


def _shown(prompt: str, ids: list[int]) -> list[int]:
    """The prompt's tokens as its samples show them: the <|endoftext|> that an empty prompt starts from is the model's
    start, not text that the prompt had."""
    return ids if prompt else []


def sample_texts(model: GPT, prompt: str, cfg: SampleConfig | None = None, num_samples: int = 1,
                 **settings) -> list[str]:
    """Prompt (its end, where cfg.crop dropped its start) + continuation of each sample, cut at <|endoftext|> unless
    cfg.stop_at_eot is off. `settings`: SampleConfig fields over cfg's (sample_texts(m, "A", max_new_tokens=40))."""
    cfg = _config(cfg, settings)
    ids = _prompt_ids(model, prompt, cfg)
    tokens = generate(model, ids, cfg, num_samples)  # checked before num_samples rows are made
    new: list[list[int]] = [[] for _ in range(num_samples)]
    for tok in tokens:
        for row, t in zip(new, tok.tolist()):
            row.append(t)
    if cfg.stop_at_eot:
        new = [row[: row.index(EOT)] if EOT in row else row for row in new]
    return [decode(_shown(prompt, ids) + row) for row in new]


def stream_text(model: GPT, prompt: str, cfg: SampleConfig | None = None, **settings) -> Iterator[str]:
    """An iterator of text pieces of one sample as they are generated (the prompt first, its end where cfg.crop
    dropped its start), valid UTF-8 only; the arguments are checked when it is called, as generate's. `settings`:
    SampleConfig fields over cfg's."""
    cfg = _config(cfg, settings)
    ids = _prompt_ids(model, prompt, cfg)
    return _stream(prompt, ids, cfg, generate(model, ids, cfg, 1))


def _stream(prompt: str, ids: list[int], cfg: SampleConfig, tokens: Iterator[mx.array]) -> Iterator[str]:
    """stream_text's pieces, of checked arguments."""
    enc = get_tokenizer()
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    yield dec.decode(enc.decode_bytes(_shown(prompt, ids)))
    for tok in tokens:
        t = tok.item()
        if t == EOT and cfg.stop_at_eot:
            break
        yield dec.decode(enc.decode_bytes([t]))
    yield dec.decode(b"", final=True)
