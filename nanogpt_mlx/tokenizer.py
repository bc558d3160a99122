"""The GPT-2 BPE tokenizer (tiktoken), from ranks shipped with the package: works offline."""

from __future__ import annotations

import base64
import operator
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

import tiktoken

from .errors import UserError

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
    if not isinstance(text, str):  # (tiktoken's TypeError named no argument)
        raise UserError(f"encode takes a str, got {type(text).__name__}")
    return get_tokenizer().encode(text, allowed_special="all") if special else get_tokenizer().encode_ordinary(text)


def decode(ids: Iterable[int]) -> str:
    """Ids (a list, or a 1-D NumPy or MLX array) to text, bytes that are no UTF-8 replaced. An id past GPT-2's
    50257 (a padded vocab's rows, which a loop of one's own may sample) is refused: tiktoken's KeyError before."""
    try:
        ids = [operator.index(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]  # (a float is no id)
    except (TypeError, ValueError):
        raise UserError(f"decode takes a flat sequence of token ids (ints), got {ids!r:.60}") from None
    if (bad := next((i for i in ids if not 0 <= i <= EOT), None)) is not None:
        raise UserError(f"token id {bad} is none of GPT-2's (0..{EOT}): a padded vocab's rows past it have no text")
    return get_tokenizer().decode(ids)
