"""Generation: KV cache = no cache, greedy = transformers, the sampling filters, stopping, prompts."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx import GPT, GPTConfig, UserError
from nanogpt_mlx.sample import SampleConfig, filtered_logits, generate, next_token, sample_texts, stream_text
from nanogpt_mlx.tokenizer import EOT, encode, get_tokenizer
from nanogpt_mlx.weights import load_model

PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model,"


@pytest.fixture(scope="module")
def model(lively_hf_dir) -> GPT:
    return load_model(lively_hf_dir)


def tokens(model, cfg: SampleConfig, num_samples: int = 1, prompt=PROMPT, **kw) -> list[list[int]]:
    """(num_samples, steps) token ids."""
    return np.array([t.tolist() for t in generate(model, prompt, cfg, num_samples, **kw)]).T.tolist()


def test_greedy_equals_transformers_generate(lively_hf_dir, model):
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(lively_hf_dir).eval()
    hf.generation_config.eos_token_id = None  # generate exactly 40 tokens, like stop_at_eot=False
    ref = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=40, pad_token_id=0)[0, 8:].tolist()
    ours = tokens(model, SampleConfig(max_new_tokens=40, greedy=True, stop_at_eot=False))[0]
    assert ours == ref
    assert len(set(ref)) > 10  # a varied sequence, not one repeated token


@pytest.mark.parametrize("cfg", [
    SampleConfig(max_new_tokens=30, greedy=True, stop_at_eot=False),
    SampleConfig(max_new_tokens=30, top_k=50, seed=7, stop_at_eot=False),
    SampleConfig(max_new_tokens=30, top_k=None, top_p=0.9, temperature=0.8, seed=8, stop_at_eot=False),
])
def test_kv_cache_equals_no_cache(model, cfg):
    cached = tokens(model, cfg, num_samples=3)
    assert cached == tokens(model, cfg, num_samples=3, use_cache=False)
    assert len(cached[0]) == 30 and (cfg.greedy or cached[0] != cached[1])  # samples differ from each other


def test_seed_fixes_samples_and_top_k_1_is_greedy(model):
    cfg = SampleConfig(max_new_tokens=20, top_k=50, seed=3, stop_at_eot=False)
    assert tokens(model, cfg) == tokens(model, cfg)
    assert tokens(model, cfg) != tokens(model, SampleConfig(max_new_tokens=20, top_k=50, seed=4, stop_at_eot=False))
    greedy = tokens(model, SampleConfig(max_new_tokens=20, greedy=True, stop_at_eot=False))
    assert tokens(model, SampleConfig(max_new_tokens=20, top_k=1, seed=5, stop_at_eot=False)) == greedy
    # more new tokens continue fewer: each token's key is split off the one before, not one split of all
    longer = tokens(model, SampleConfig(max_new_tokens=30, top_k=50, seed=3, stop_at_eot=False))
    assert [row[:20] for row in longer] == tokens(model, cfg)
    # more samples continue fewer: sample i is the same whether 1 or 4 are drawn (top-k and top-p too; one key for
    # the batch drew each row from noise laid out over all rows)
    for many in (cfg, SampleConfig(max_new_tokens=20, top_p=0.9, temperature=0.8, seed=3, stop_at_eot=False)):
        four = tokens(model, many, num_samples=4)
        assert [tokens(model, many, num_samples=n) for n in (1, 2, 3)] == [four[:n] for n in (1, 2, 3)]
        assert len({tuple(row) for row in four}) == 4
    for seed in (-1, 2**64):
        with pytest.raises(UserError, match=r"seed must be an integer in \[0, 2\^64\)"):
            SampleConfig(seed=seed)


def test_sampling_settings_go_in_as_keywords_too(model):
    """sample_texts(m, "x", max_new_tokens=10), as mlx-lm's generate takes its settings, was a TypeError."""
    cfg = SampleConfig(max_new_tokens=12, top_k=5, seed=1)
    assert sample_texts(model, "A", max_new_tokens=12, top_k=5, seed=1) == sample_texts(model, "A", cfg)
    assert sample_texts(model, "A", cfg, seed=2) == sample_texts(model, "A", SampleConfig(max_new_tokens=12, top_k=5,
                                                                                          seed=2))
    assert "".join(stream_text(model, "A", greedy=True, max_new_tokens=8)) == sample_texts(
        model, "A", SampleConfig(greedy=True, max_new_tokens=8))[0]
    with pytest.raises(UserError, match="^SampleConfig has no field max_tokens$"):
        sample_texts(model, "A", max_tokens=3)
    with pytest.raises(UserError, match="top_k must be >= 1"):
        stream_text(model, "A", top_k=0)


def test_without_a_seed_mlxs_global_seed_fixes_samples(model, tiny_hf_dir):
    """seed=None drew from os.urandom: an MLX user's mx.random.seed(0) changed nothing. Each process still draws its
    own samples (`sample` without --seed)."""
    from conftest import run_cli

    cfg = SampleConfig(max_new_tokens=20, top_k=50, stop_at_eot=False)
    mx.random.seed(0)
    first = tokens(model, cfg)
    mx.random.seed(0)
    assert tokens(model, cfg) == first != tokens(model, cfg)
    args = ("sample", "--model", str(tiny_hf_dir), "--num-samples", "2", "--max-new-tokens", "16", "--no-stop")
    assert run_cli(*args, check=True).stdout != run_cli(*args, check=True).stdout


def draw(logits: list[float], n: int = 4000, **cfg) -> np.ndarray:
    """n independent draws of next_token from the same logits."""
    x = mx.broadcast_to(mx.array(logits, dtype=mx.float32), (n, len(logits)))
    return np.array(next_token(x, SampleConfig(**cfg), mx.random.key(0)))


def test_top_k_top_p_and_temperature_filter_correctly():
    logits = np.log([0.5, 0.3, 0.15, 0.05]).tolist()
    assert set(draw(logits, top_k=2)) == {0, 1}
    assert set(draw(logits, top_k=3)) == {0, 1, 2}
    # top-p keeps the smallest prefix whose mass reaches p: 0.5 + 0.3 >= 0.7, so tokens 0 and 1
    picks = draw(logits, top_k=None, top_p=0.7)
    assert set(picks) == {0, 1} and abs((picks == 0).mean() - 0.5 / 0.8) < 0.03
    assert set(draw(logits, top_k=None, top_p=0.81)) == {0, 1, 2}
    assert set(draw(logits, top_k=None, top_p=0.4)) == {0}
    assert set(draw([-1.0, 2.0, 0.0], top_k=None, top_p=1e-9)) == {1}  # 1 - top_p is 1.0 in float32: all dropped
    assert set(draw(logits, top_k=None, top_p=1.0)) == {0, 1, 2, 3}
    # without filters, frequencies follow softmax(logits / temperature)
    for t in (1.0, 2.0):
        picks = draw(logits, top_k=None, temperature=t)
        p = np.array([0.5, 0.3, 0.15, 0.05]) ** (1 / t)
        assert np.abs(np.bincount(picks, minlength=4) / len(picks) - p / p.sum()).max() < 0.03
    assert set(draw(logits, top_k=None, temperature=0.01)) == {0}
    assert set(draw(logits, greedy=True)) == {0}


def test_padded_vocab_is_never_sampled():
    logits = np.zeros(50304, dtype=np.float32)
    logits[50257:] = 100.0  # the padding would win every draw if it could
    logits[123] = 5.0
    assert set(draw(logits.tolist(), n=64, greedy=True)) == {123}
    assert np.all(draw(logits.tolist(), n=256, top_k=None) < 50257)
    assert set(draw(logits.tolist(), n=64, top_k=1)) == {123}


def eot_model() -> GPT:
    """A model that always predicts <|endoftext|>: constant final hidden state, aligned with wte[EOT]."""
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32), seed=0)
    direction = mx.random.normal((32,), key=mx.random.key(1))
    model.ln_f.weight = mx.zeros((32,))
    model.ln_f.bias = direction
    model.wte.weight[EOT] = 10 * direction
    return model


def test_generation_stops_at_end_of_text():
    model = eot_model()
    assert tokens(model, SampleConfig(max_new_tokens=10, greedy=True), num_samples=2) == [[EOT], [EOT]]
    assert tokens(model, SampleConfig(max_new_tokens=10, greedy=True, stop_at_eot=False))[0] == [EOT] * 10
    assert sample_texts(model, "Hi there", SampleConfig(max_new_tokens=10, greedy=True), 2) == ["Hi there"] * 2


def test_a_finished_sample_yields_end_of_text_while_others_go_on():
    """Each draw is <|endoftext|> or token 42, equally likely: a row that drew EOT stays at EOT (generate's
    contract), while the other rows go on drawing."""
    model = eot_model()
    model.wte.weight[42] = model.wte.weight[EOT]
    rows = tokens(model, SampleConfig(max_new_tokens=12, top_k=2, seed=0), num_samples=4)
    firsts = [row.index(EOT) for row in rows]
    assert all(set(row[first:]) == {EOT} for row, first in zip(rows, firsts))
    assert min(firsts) < max(firsts) and set(rows[firsts.index(max(firsts))][:max(firsts)]) == {42}


@pytest.mark.parametrize("stop_at_eot", [True, False])
def test_streamed_text_ends_as_sample_texts_does(monkeypatch, stop_at_eot):
    """A sample whose last token is half of a character (a replacement character at the end), one with EOT in the
    middle (where it stops only with stop_at_eot), and one with a character split across two tokens: the stream
    ends with the same text as sample_texts."""
    import nanogpt_mlx.sample as sample_mod

    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32), seed=0)
    byte = get_tokenizer().encode_single_token
    half = byte(b"\xe2")  # the first byte of a 3-byte character
    # "é" as two tokens mid-sample: streamed whole, not as two replacement characters
    for ids in ([15496, half], [15496, EOT, 318, half], [15496, byte(b"\xc3"), byte(b"\xa9"), 318]):
        monkeypatch.setattr(sample_mod, "generate", lambda *a, ids=ids, **kw: (mx.array([t]) for t in ids))
        cfg = SampleConfig(max_new_tokens=len(ids), stop_at_eot=stop_at_eot)
        pieces = list(stream_text(model, "A", cfg))
        assert "".join(pieces) == sample_texts(model, "A", cfg, 1)[0] and pieces[:2] == ["A", "Hello"]
    assert pieces[2:] == ["", "\u00e9", " is", ""]


def test_stream_text_equals_sample_texts(model):
    cfg = SampleConfig(max_new_tokens=25, top_k=20, seed=11, stop_at_eot=False)
    streamed = "".join(stream_text(model, "Once upon a time", cfg))
    assert streamed == sample_texts(model, "Once upon a time", cfg, 1)[0]
    assert streamed.startswith("Once upon a time") and len(streamed) > len("Once upon a time")


def test_prompt_longer_than_context(model):
    long_prompt = list(range(1000, 1120))  # 120 tokens + 20 new > 128
    cfg = SampleConfig(max_new_tokens=20, greedy=True, stop_at_eot=False)
    # Python callers are told their way to crop too, not only the CLI's
    with pytest.raises(UserError, match=re.escape("context of 128; pass --crop to keep its end (Python: "
                                                  "SampleConfig(crop=True))")):
        tokens(model, cfg, prompt=long_prompt)
    cropped = SampleConfig(max_new_tokens=20, greedy=True, stop_at_eot=False, crop=True)
    # the last new token is never fed back: 109 + 20 tokens need 128 positions
    assert tokens(model, cropped, prompt=long_prompt) == tokens(model, cfg, prompt=long_prompt[-109:])
    with pytest.raises(UserError, match="^a prompt of 110 tokens \\+ 20 new tokens exceeds the model's context"):
        tokens(model, cfg, prompt=long_prompt[-110:])
    # an empty prompt is <|endoftext|>: it was "prompt of 1 tokens", which the user never gave
    with pytest.raises(UserError, match="^an empty prompt's <\\|endoftext\\|> \\+ 129 new tokens exceeds the model's "
                                        "context of 128$"):
        tokens(model, SampleConfig(max_new_tokens=129, greedy=True), prompt=[])
    with pytest.raises(UserError, match="max_new_tokens must be >= 1"):
        SampleConfig(max_new_tokens=0)
    with pytest.raises(UserError, match="top_k must be >= 1"):
        SampleConfig(top_k=0)


def test_prompt_outside_the_vocab_is_refused():
    """A model with a smaller vocab than GPT-2's tokenizer: MLX's gather would read past its embedding."""
    small = GPT(GPTConfig(block_size=32, vocab_size=1000, n_layer=1, n_head=2, n_embd=32), seed=0)
    cfg = SampleConfig(max_new_tokens=2, greedy=True, stop_at_eot=False)
    with pytest.raises(UserError, match="the prompt: token id 15496 is outside the model's vocab_size of 1000"):
        tokens(small, cfg)
    with pytest.raises(UserError, match="token id 50256"):  # an empty prompt starts from <|endoftext|>
        tokens(small, cfg, prompt=[])
    assert len(tokens(small, cfg, prompt=[464, 999])[0]) == 2


def test_a_prompt_may_be_a_numpy_or_mlx_array_of_token_ids(model):
    cfg = SampleConfig(max_new_tokens=3, greedy=True, stop_at_eot=False)
    want = tokens(model, cfg, prompt=[464, 318])
    for ids in (np.array([464, 318]), np.array([464, 318], dtype=np.uint16), mx.array([464, 318])):
        assert tokens(model, cfg, prompt=ids) == want
    assert tokens(model, cfg, prompt=np.array([], dtype=np.int64)) == tokens(model, cfg, prompt=[EOT])
    for bad in (np.array([[464, 318]]), np.array([464.0, 318.0]), mx.array([1.5])):
        with pytest.raises(UserError, match="must be a list or a 1-D integer array"):
            tokens(model, cfg, prompt=bad)


def test_empty_prompt_starts_from_end_of_text(model):
    cfg = SampleConfig(max_new_tokens=5, greedy=True, stop_at_eot=False)
    assert tokens(model, cfg, prompt=[]) == tokens(model, cfg, prompt=[EOT])
    assert len(encode("")) == 0
    # the token's text in a prompt is the token, as for transformers and mlx-lm; an empty prompt's samples show
    # the continuation alone (they began with an "<|endoftext|>" that the prompt did not have)
    (given,) = sample_texts(model, "<|endoftext|>", cfg)
    assert given.startswith("<|endoftext|>") and sample_texts(model, "", cfg) == [given[len("<|endoftext|>"):]]
    assert "".join(stream_text(model, "", cfg)) == given[len("<|endoftext|>"):]
    # a model without that token: the error was of a token id 50256 in "the prompt", which had none
    small = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=1, n_head=2, n_embd=16), seed=0)
    with pytest.raises(UserError, match=r"^an empty prompt \(it starts from <\|endoftext\|>\): token id 50256 is "
                                        "outside the model's vocab_size of 1000"):
        sample_texts(small, "", cfg)


def test_every_config_argument_has_a_default(model):
    """The Python API works without building a SampleConfig: its defaults are the CLI's."""
    texts = sample_texts(model, "ROMEO:")
    assert len(texts) == 1 and texts[0].startswith("ROMEO:")
    assert "".join(stream_text(model, "ROMEO:")).startswith("ROMEO:")
    assert len(list(generate(model, encode("ROMEO:")))) <= SampleConfig().max_new_tokens
    assert next_token(mx.zeros((2, 50257))).shape == (2,)


def test_more_samples_than_memory_holds_are_refused(model, monkeypatch):
    """MLX's CPU backend crashes on an allocation it cannot make: the batch is checked against the device first."""
    from nanogpt_mlx import device

    cfg = SampleConfig(max_new_tokens=5, greedy=True, stop_at_eot=False)
    peak = mx.get_peak_memory()
    with pytest.raises(UserError, match=r"1000000000 samples at once need ~\d+\.\d GB .* at most \d+ fit"):
        tokens(model, cfg, 10**9)
    assert mx.get_peak_memory() == peak  # refused before anything was allocated
    monkeypatch.setattr(device, "memory_bytes", lambda: 10**6)  # less than the model
    with pytest.raises(UserError, match="at most 0 fit"):
        tokens(model, cfg, 1)


def test_the_samples_said_to_fit_leave_a_tenth_of_the_memory(model, monkeypatch, capsys):
    """"At most N fit" named the count that filled all of the device's memory (by an estimate near the real use), and
    N itself was sampled without a word."""
    from nanogpt_mlx import device, memory

    cfg, weights = model.config, 10**8
    monkeypatch.setattr(device, "memory_bytes", lambda: weights + 100 * memory.sample_bytes(cfg, 8, 5, 4))
    with pytest.raises(UserError, match="at most 90 fit"):
        memory.check_sampling(cfg, 101, 8, 5, weights, 4)
    memory.check_sampling(cfg, 90, 8, 5, weights, 4)
    assert capsys.readouterr().err == ""
    memory.check_sampling(cfg, 95, 8, 5, weights, 4)
    assert "95 samples at once need" in capsys.readouterr().err


def test_sample_texts_refuses_too_many_samples_before_making_their_rows(model):
    """sample_texts made a list per sample before generate's memory check ran: 10^7 took seconds and most of a GB
    to be refused, 10^9 exhausted memory first."""
    import time

    start = time.perf_counter()
    with pytest.raises(UserError, match="10000000 samples at once need"):
        sample_texts(model, "hi", SampleConfig(max_new_tokens=3), 10**7)
    assert time.perf_counter() - start < 1


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_the_sample_check_refuses_what_needs_more_than_the_memory(top_p, monkeypatch):
    """With a device a tenth short of what sampling took, the check refuses: top-p's arrays (the order, sorted
    weights, sums, masks) were not counted, and it allowed 1.6x what fit."""
    from mlx.utils import tree_flatten

    from nanogpt_mlx import device

    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32), seed=0)
    weights = sum(w.nbytes for _, w in tree_flatten(model.parameters()))
    cfg = SampleConfig(max_new_tokens=4, top_p=top_p, seed=0)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    tokens(model, cfg, 200)
    took = mx.get_peak_memory() - weights
    monkeypatch.setattr(device, "memory_bytes", lambda: weights + int(0.9 * took))
    with pytest.raises(UserError, match="200 samples at once need"):
        tokens(model, cfg, 200)


def test_the_sample_check_counts_the_kv_cache_as_allocated(monkeypatch):
    """The KV cache grows 256 positions at a time: with room for ten samples' caches as allocated (8 prompt +
    24 new tokens hold 256 positions), at most ten may be said to fit, not the ~80 that 32 positions would (a
    model whose cache outweighs its vocab-sized rows)."""
    from mlx.utils import tree_flatten

    from nanogpt_mlx import device

    model = GPT(GPTConfig(block_size=256, vocab_size=128, n_layer=8, n_head=4, n_embd=256), seed=0)
    cache = model.make_cache()
    mx.eval(model(mx.arange(32)[None], cache))
    kv = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    weights = sum(w.nbytes for _, w in tree_flatten(model.parameters()))
    monkeypatch.setattr(device, "memory_bytes", lambda: weights + 10 * kv)
    with pytest.raises(UserError, match=r"at most \d fit"):
        tokens(model, SampleConfig(max_new_tokens=24, greedy=True, stop_at_eot=False), 1000, prompt=list(range(8)))


def test_negative_ids_tiny_temperatures_and_no_samples(model):
    """A negative id read before the embedding (-10^6 crashed MLX), a temperature of 1e-40 overflowed every logit to
    -inf (a uniform draw, even with top-k 1): it tends to greedy now, also below float32's smallest number."""
    cfg = SampleConfig(max_new_tokens=3, greedy=True, stop_at_eot=False)
    for bad in (-1, -1_000_000):
        with pytest.raises(UserError, match=f"the prompt: token id {bad} is outside"):
            tokens(model, cfg, prompt=[464, bad])
    greedy = tokens(model, cfg, 2)
    for top_k in (1, 50):
        cold = SampleConfig(max_new_tokens=3, temperature=1e-40, top_k=top_k, seed=3, stop_at_eot=False)
        assert tokens(model, cold, 2) == greedy
    logits = mx.array([[-80.0, -75.0, -90.0] + [-100.0] * 50254])
    # 1e-46, below float32's smallest: the largest logit was 0 / 0, nan, and every draw <|endoftext|>
    for t in (1e-37, 1e-46, 5e-324):
        assert [next_token(logits, SampleConfig(temperature=t), mx.random.key(s)).item() for s in range(5)] == [1] * 5
    with pytest.raises(UserError, match="num_samples must be >= 1, got 0"):
        sample_texts(model, "hi", cfg, 0)
    with pytest.raises(UserError, match="temperature must be > 0 .*got nan"):  # it sampled EOT at once, silently
        SampleConfig(temperature=float("nan"))
    with pytest.raises(UserError, match="temperature must be > 0 .*got 0"):
        SampleConfig(temperature=0)
    assert tokens(model, SampleConfig(max_new_tokens=3, greedy=True, temperature=0, stop_at_eot=False), 2) == greedy


def test_a_sample_config_cannot_be_changed_past_its_checks():
    """Changed after it was made, a SampleConfig skipped its checks: temperature 0 drew EOT at every step from NaN
    logits, top_k 0 switched top-k off, "5" failed deep inside."""
    import dataclasses

    cfg = SampleConfig(max_new_tokens=5, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 0
    assert dataclasses.replace(cfg, top_k=3).top_k == 3  # the way to vary one, checked again:
    with pytest.raises(UserError, match="top_k must be >= 1, got 0"):
        dataclasses.replace(cfg, top_k=0)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99, 0.999])
def test_top_p_keeps_the_tokens_transformers_keeps(top_p):
    """Over GPT-2's whole vocab: the float32 cumulative sum from the likeliest token down rounded ~1e-4 of the mass
    away, and top_p 0.99 kept ~50 tokens fewer than transformers' TopPLogitsWarper (and float64) keep."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from nanogpt_mlx.sample import filtered_logits

    logits = (np.random.default_rng(0).standard_normal((3, 50257)) * 3).astype(np.float32)
    ours = np.isfinite(np.array(filtered_logits(mx.array(logits), SampleConfig(top_k=None, top_p=top_p))))
    ref = np.isfinite(TopPLogitsWarper(top_p)(None, torch.tensor(logits, dtype=torch.float64)).numpy())
    assert (ours == ref).all(), (ours.sum(axis=1), ref.sum(axis=1))


def test_a_prompt_that_is_no_text_is_one_line(model):
    """sample_texts(model, None) was a TypeError from inside the tokenizer. stream_text's arguments are checked when
    it is called, as generate's (they were at its first piece)."""
    for call in (lambda: sample_texts(model, None), lambda: stream_text(model, 5)):
        with pytest.raises(UserError, match="the prompt must be text \\(a str\\), got"):
            call()
    with pytest.raises(UserError, match="exceeds the model's context"):
        stream_text(model, "x " * 200)


@pytest.mark.parametrize("call, needle", [
    (lambda m: generate(m, "abc"), "token ids must be a list or a 1-D integer array, got a str (text goes to"),
    (lambda m: generate(m, b"x"), "token ids must be a list or a 1-D integer array, got a bytes"),
    (lambda m: generate(m, 5), "token ids must be a list or a 1-D integer array, got a int"),
    (lambda m: generate(m, [464, 1.5]), "the prompt's token ids must be integers, got 1.5"),
    (lambda m: generate(m, [True]), "the prompt's token ids must be integers, got True"),
    (lambda m: generate(m, [464], SampleConfig(), 2.0), "num_samples must be an integer, got 2.0"),
    (lambda m: sample_texts(m, "a", SampleConfig(), 2.0), "num_samples must be an integer, got 2.0"),
    (lambda m: sample_texts(m, "a", 2), "cfg must be a SampleConfig, got 2"),
    (lambda m: sample_texts("out/cli", "a"), "a GPT model is needed (load one with weights.load_model), got 'out/cli'"),
    (lambda m: generate(None, [464]), "a GPT model is needed (load one with weights.load_model), got None"),
], ids=["str", "bytes", "int", "float-id", "bool-id", "float-num_samples", "sample_texts-num_samples", "cfg",
        "model-path", "model-none"])
def test_python_arguments_of_the_wrong_type_are_one_line(model, call, needle):
    """They were TypeErrors from deep inside ('<=' not supported, 'float' object cannot be interpreted...), raised
    when the call was made, not at the first token."""
    with pytest.raises(UserError, match=re.escape(needle)):
        call(model)


def test_a_list_of_numpy_integers_is_a_prompt(model):
    cfg = SampleConfig(max_new_tokens=3, greedy=True, stop_at_eot=False)
    assert tokens(model, cfg, prompt=list(np.array([464, 318]))) == tokens(model, cfg, prompt=[464, 318])


@pytest.mark.parametrize("top_p, kept", [(0.5, 2), (0.75, 3), (0.25, 1)])
def test_top_p_keeps_no_token_past_a_mass_of_exactly_top_p(top_p, kept):
    """Four equally likely tokens (exact quarters): top_p 0.5 keeps 2, whose mass is exactly 0.5, as
    TopPLogitsWarper drops a token when it and the less likely ones hold at most 1 - top_p (<=, not <)."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from nanogpt_mlx.sample import filtered_logits

    logits = np.zeros((1, 4), dtype=np.float32)
    ours = np.isfinite(np.array(filtered_logits(mx.array(logits), SampleConfig(top_k=None, top_p=top_p))))
    ref = np.isfinite(TopPLogitsWarper(top_p)(None, torch.tensor(logits, dtype=torch.float64)).numpy())
    assert ours.sum() == ref.sum() == kept


def test_the_memory_a_batch_of_samples_needs_covers_its_caches_growth():
    """While a layer's cache grows, its old and new keys and values are held at once: the estimate fell ~7-13%
    short of the peak over 600 tokens (an estimate within 10% of the memory is let through with a warning)."""
    from nanogpt_mlx import memory

    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=1024, vocab_size=512)
    model = GPT(cfg, seed=0)
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    live = mx.get_active_memory()
    for _ in generate(model, [1] * 5, SampleConfig(max_new_tokens=600, stop_at_eot=False, seed=0), 16):
        pass
    peak, estimate = mx.get_peak_memory() - live, 16 * memory.sample_bytes(cfg, 5, 600, 4)
    assert peak <= estimate <= 1.5 * peak, (peak, estimate)


@pytest.mark.parametrize("call, needle", [
    (lambda: next_token(mx.zeros((2, 8)), 3), "cfg must be a SampleConfig, got 3"),  # an AttributeError
    (lambda: filtered_logits(mx.zeros((8,)), None), "logits must be an mx.array of shape (batch, vocab)"),
    # greedy skipped the check: MLX's "Too many indices", or argmax's "incompatible function arguments"
    (lambda: next_token(mx.zeros((50304,)), SampleConfig(greedy=True)), "logits must be an mx.array of shape"),
    (lambda: next_token(np.zeros((1, 50304)), SampleConfig(greedy=True)), "logits must be an mx.array of shape"),
    (lambda: generate(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=64)), [1],
                      SampleConfig(max_new_tokens=2), 1, use_cache="no"), "use_cache must be True or False"),
])
def test_the_sampling_functions_refuse_what_they_cannot_take(call, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        call()


def test_logits_that_overflow_are_one_line(tmp_path):
    """Finite weights whose logits overflow float32 (a diverged run's: the load's NaN check passes them) sampled
    garbage with status 0."""
    from conftest import assert_one_line_error, run_cli

    from nanogpt_mlx.weights import save_model

    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=8), seed=0)
    model.ln_f.weight, model.wte.weight = model.ln_f.weight * 1e38, model.wte.weight * 100  # finite; the logits not
    with pytest.raises(UserError, match=r"^the model's logits are NaN/inf at new token 1: its activations overflow "
                                        r"\(a diverged or damaged model\)$"):
        sample_texts(model, "Hello", SampleConfig(max_new_tokens=3, greedy=True))
    save_model(model, tmp_path / "m")
    assert_one_line_error(run_cli("sample", "--model", str(tmp_path / "m"), "--num-samples", "2", "--max-new-tokens",
                                  "4"),
                          "the model's logits are NaN/inf at new token 1")
