"""The GPT-2 tokenizer works offline from the shipped ranks and encodes as GPT-2 does, and so do the
Hugging Face tokenizer files generated from them."""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import pytest

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


# ------------------------------------------------------------- Hugging Face tokenizer files
SHAKESPEARE_LIKE = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
'Tis but thy name that is my enemy; thou'rt thyself, though not a Montague.
I'll ne'er forget it -- we've sworn, they're gone -- 'twas 1,597 years ago!!

JULIET:   O Romeo, Romeo! wherefore art thou Romeo?\t\t(aside)
Deny thy father and refuse thy name;
    Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.   \n\n\n"""
UNICODE = ("Grüße, Zürich! naïve café — 東京都 日本語 🙂👍🏽 \u200b zero-width, tabs\tand\n\nnewlines, "
           "'s 've 're  multiple   spaces, ∑∫√ emoji-with-ZWJ 👩‍💻, Ελληνικά, العربية, עברית \r\n trailing  ")


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    from nanogpt_mlx.hf_tokenizer import write_tokenizer_files

    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(out, model_max_length=1024)
    return out


def test_merges_are_gpt2s():
    from nanogpt_mlx.hf_tokenizer import merge_lines

    lines = merge_lines()
    assert len(lines) == 50000
    assert lines[:5] == ["Ġ t", "Ġ a", "h e", "i n", "r e"]  # the first lines of the hub's gpt2 merges.txt


def test_vocab_json_is_gpt2s(hf_files):
    """As the hub's gpt2 vocab.json: every id once, in order, <|endoftext|> last (the tokenizers read it from
    tokenizer.json's added_tokens, so a vocab.json without it passed)."""
    vocab = json.loads((hf_files / "vocab.json").read_text())
    assert list(vocab.values()) == list(range(50257)) and vocab["<|endoftext|>"] == EOT == 50256
    assert list(vocab)[:3] == ["!", '"', "#"] and vocab["Ġt"] == 256


@pytest.mark.parametrize("text", [SHAKESPEARE_LIKE, UNICODE])
def test_auto_tokenizer_of_the_files_encodes_as_we_do(hf_files, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_files)
    assert tok.eos_token_id == tok.bos_token_id == EOT and len(tok) == 50257
    assert tok(text)["input_ids"] == encode(text)
    assert tok.decode(encode(text)) == text


def test_offsets_are_those_of_transformers_own_gpt2_tokenizer(hf_files):
    """Character offsets (token classification, highlighting): those of the tokenizer transformers builds from
    vocab.json and merges.txt itself (its GPT-2 converter), spaces before a word included."""
    from transformers import AutoTokenizer, GPT2Tokenizer

    ours = AutoTokenizer.from_pretrained(hf_files)
    reference = GPT2Tokenizer(vocab=str(hf_files / "vocab.json"), merges=str(hf_files / "merges.txt"))
    assert len(reference) == 50257
    for text in (" hello  world", SHAKESPEARE_LIKE, UNICODE):
        assert (ours(text, return_offsets_mapping=True)["offset_mapping"]
                == reference(text, return_offsets_mapping=True)["offset_mapping"])


def test_a_prompts_special_token_is_eot_as_hugging_faces(hf_files):
    """Prompts (special=True) read <|endoftext|> as the exported tokenizer, mlx-lm and the hub's gpt2 do."""
    from transformers import AutoTokenizer

    text = "<|endoftext|>ROMEO:<|endoftext|> x"
    assert encode(text, special=True) == AutoTokenizer.from_pretrained(hf_files)(text)["input_ids"]
    assert encode(text, special=True)[0] == EOT and encode(text, special=True).count(EOT) == 2


def test_vocab_and_merges_files_encode_every_token_as_we_do(hf_files):
    """vocab.json + merges.txt alone (what older clients read), on every token's own text and on text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(hf_files / "vocab.json"), str(hf_files / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    enc = get_tokenizer()
    texts = [SHAKESPEARE_LIKE, UNICODE]
    for i in range(50256):
        try:
            texts.append(enc.decode_single_token_bytes(i).decode("utf-8"))
        except UnicodeDecodeError:  # part of a multi-byte character: not text on its own
            pass
    assert len(texts) > 49000
    assert [e.ids for e in tok.encode_batch(texts)] == enc.encode_ordinary_batch(texts)


def test_decode_takes_arrays_and_refuses_what_has_no_text():
    """An id of a padded vocab's rows (a loop of one's own sampling all 50304 logits) was tiktoken's KeyError, -1
    an OverflowError; encode(None) a TypeError of tiktoken's."""
    import mlx.core as mx
    import numpy as np

    from nanogpt_mlx.errors import UserError

    ids = encode("Hello, world")
    assert decode(np.array(ids)) == decode(mx.array(ids)) == decode(tuple(ids)) == "Hello, world"
    assert decode([EOT]) == "<|endoftext|>"
    for bad in (50257, 50303, -1):
        with pytest.raises(UserError, match=rf"^token id {bad} is none of GPT-2's \(0..50256\)"):
            decode([15496, bad])
    for bad in ([[1, 2]], [1.7, 2.2], mx.array([1.0])):  # (a float was cut to an id)
        with pytest.raises(UserError, match=r"^decode takes a flat sequence of token ids \(ints\), got "):
            decode(bad)
    with pytest.raises(UserError, match="^encode takes a str, got NoneType$"):
        encode(None)
