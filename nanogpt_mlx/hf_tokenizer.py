"""Hugging Face tokenizer files for GPT-2, generated offline from the shipped tiktoken ranks.

GPT-2's byte-level BPE in Hugging Face form is `vocab.json` (token string -> id) plus `merges.txt`
(the merge rules, highest priority first); `tokenizer.json` holds both for the `tokenizers` library.
Token strings spell each byte with GPT-2's printable stand-in (`bytes_to_unicode`, e.g. space -> "Ġ").
tiktoken has only ranks: token r >= 256 was made by merge r - 256, and the pair it merged is what
BPE restricted to the ranks below r makes of its bytes (exactly two tokens). Nothing here imports
`tokenizers` or `transformers`: the files are plain JSON and text.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from .files import atomic_write_text
from .tokenizer import EOT, EOT_TEXT, gpt2_ranks

TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]
# tokenizer files of other models that transformers' AutoTokenizer (mlx-lm's too) reads with these: special tokens, a
# chat template (a pad id past our vocab, another prompt format); an export over a directory removes them
OTHER_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                         "additional_chat_templates", "tokenizer.model")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    others (control characters, space, ...) for the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def token_string(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's byte-pair merge of `token` using only ranks < `below`: repeatedly merge the
    adjacent pair whose concatenation has the lowest rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], below)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


@lru_cache(maxsize=1)
def merges() -> list[tuple[bytes, bytes]]:
    """GPT-2's merge rules in priority order: merge i makes the token of rank 256 + i."""
    ranks = gpt2_ranks()
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [len(t) for t, _ in by_rank[:256]] != [1] * 256:
        raise ValueError("ranks 0..255 must be the single bytes")
    out = []
    for token, rank in by_rank[256:]:
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:  # never for GPT-2's ranks: each token is one merge of two earlier ones
            raise ValueError(f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens")
        out.append((parts[0], parts[1]))
    return out


def merge_lines() -> list[str]:
    """The merges as `merges.txt` and tokenizer.json spell them: two token strings and a space."""
    return [f"{token_string(a)} {token_string(b)}" for a, b in merges()]


def vocab() -> dict[str, int]:
    ranks = sorted(gpt2_ranks().items(), key=lambda kv: kv[1])
    return {**{token_string(t): r for t, r in ranks}, EOT_TEXT: EOT}


def tokenizer_json() -> dict:
    """The `tokenizers` serialization of GPT-2's tokenizer (as the hub's gpt2 repo has it)."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT, "content": EOT_TEXT, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab(),
                  "merges": merge_lines()},
    }


def tokenizer_config(model_max_length: int) -> dict:
    return {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
            "add_prefix_space": False, "model_max_length": model_max_length}


def write_tokenizer_files(out_dir: str | os.PathLike, model_max_length: int) -> None:
    """vocab.json, merges.txt, tokenizer.json and tokenizer_config.json in `out_dir` (each atomic)."""
    out_dir = Path(out_dir)
    files = {
        "vocab.json": json.dumps(vocab(), ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merge_lines()) + "\n",
        "tokenizer.json": json.dumps(tokenizer_json(), ensure_ascii=False),
        "tokenizer_config.json": json.dumps(tokenizer_config(model_max_length), indent=2),
    }
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
