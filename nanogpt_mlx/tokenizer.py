"""The GPT-2 BPE tokenizer (tiktoken), from ranks shipped with the package: works offline."""

from __future__ import annotations

import base64
from functools import lru_cache
from importlib import resources

import tiktoken

EOT = 50256
EOT_TEXT = "<|endoftext|>"
# tiktoken's r50k (GPT-2) split pattern, possessive form.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@lru_cache(maxsize=1)
def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks (token bytes -> id) from the file shipped with the package."""
    data = resources.files(__package__).joinpath("gpt2.tiktoken").read_bytes()
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2's encoding, identical to `tiktoken.get_encoding("gpt2")` but without a download."""
    return tiktoken.Encoding(
        name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=gpt2_ranks(), special_tokens={EOT_TEXT: EOT}
    )


def encode(text: str, special: bool = False) -> list[int]:
    """Text to ids. `<|endoftext|>` in the text is ordinary text (as build-nanogpt's data preparation reads
    documents), or with `special` the EOT token (as Hugging Face's and mlx-lm's GPT-2 tokenizers read a prompt)."""
    return get_tokenizer().encode(text, allowed_special="all") if special else get_tokenizer().encode_ordinary(text)


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(ids)
