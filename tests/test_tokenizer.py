"""The GPT-2 tokenizer works offline from the shipped ranks and encodes as GPT-2 does."""

from __future__ import annotations

import hashlib
from importlib import resources

from nanogpt_mlx.tokenizer import EOT, decode, encode, get_tokenizer


def test_build_nanogpt_prompt_ids():
    assert encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_shipped_ranks_are_r50k_base():
    data = resources.files("nanogpt_mlx").joinpath("gpt2.tiktoken").read_bytes()
    # sha256 that tiktoken itself checks for https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken
    assert hashlib.sha256(data).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    enc = get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT == 50256
    assert enc.decode([EOT]) == "<|endoftext|>"


def test_unicode_round_trip():
    text = ("Grüße, Zürich! naïve café — 東京都 日本語 🙂👍🏽 \u200b zero-width, tabs\tand\n\nnewlines, "
            "'s 've 're  multiple   spaces, ∑∫√ emoji-with-ZWJ 👩‍💻, Ελληνικά, العربية, עברית")
    ids = encode(text)
    assert decode(ids) == text
    assert all(0 <= i < 50257 for i in ids)
    assert len(ids) < len(text.encode("utf-8"))  # real merges happened, not one token per byte


def test_special_token_text_is_plain_text():
    ids = encode("a<|endoftext|>b")
    assert EOT not in ids and decode(ids) == "a<|endoftext|>b"
