"""Model weights out: a Hugging Face GPT-2 directory (`nanogpt-mlx export`), which `transformers` and mlx-lm load.

Exports use the names of the hub's `gpt2` repository (no `transformer.` prefix) and its Conv1D layouts, (in, out),
and come with GPT-2's tokenizer files and a generation config that stops at <|endoftext|>.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from .device import dtype_name
from .errors import UserError, check_bool
from .files import (STAGING, atomic_dir, atomic_files, atomic_path, atomic_write_text, check_writable, mlx_path,
                    named_dir, user_path)
from .hf_tokenizer import OTHER_TOKENIZER_FILES, TOKENIZER_FILES, write_tokenizer_files
from .model import GPT, GPT2_VOCAB_SIZE, GPTConfig, check_gpt, dtype_named
from .tokenizer import EOT
from .weights import CONV1D, HF_FILES, checkpoints, is_native, save_safetensors

EXPORT_FILES = [*HF_FILES, "generation_config.json", *TOKENIZER_FILES]
# weight files that loaders read beside or instead of model.safetensors (mlx-lm loads every model*.safetensors,
# transformers the others where it finds no safetensors): an export over a directory removes them
OTHER_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json", "tf_model*.h5", "tf_model.h5.index.json", "flax_model*.msgpack",
                 "flax_model.msgpack.index.json")


def to_hf(model: GPT, dtype: mx.Dtype = mx.float32) -> dict[str, mx.array]:
    """This project's tensors -> the hub's `gpt2` names and Conv1D layouts in `dtype`, padded vocab cropped to
    50257."""
    out = {}
    for k, w in model.parameters_flat():
        if k == "wte.weight" and w.shape[0] > GPT2_VOCAB_SIZE:
            w = w[:GPT2_VOCAB_SIZE]
        out[k] = mx.contiguous(w.T if k.endswith(CONV1D) else w).astype(dtype)
    return out


def hf_config(config: GPTConfig, dtype: str = "float32") -> dict:
    """config.json of a Hugging Face GPT-2 with this architecture whose weights are `dtype` (a name torch knows)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "vocab_size": min(config.vocab_size, GPT2_VOCAB_SIZE),
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "tie_word_embeddings": True,
        "dtype": dtype,  # transformers 5 loads the weights in it (by default: dtype "auto"); 4.x read torch_dtype
        "torch_dtype": dtype,
    }


def generation_config() -> dict:
    """generation_config.json: generation stops at <|endoftext|>, as `sample` does."""
    return {"bos_token_id": EOT, "eos_token_id": EOT}


def check_export_target(out_dir: str | os.PathLike, force: bool = False,
                        source: str | os.PathLike | None = None) -> Path:
    """Where an export may go: a new or empty directory (any directory with `force`), never a file,
    the `source` directory itself or a nanogpt-mlx run or checkpoint, which would lose its own format."""
    check_bool("force", force)  # "no" would force
    out = user_path(mlx_path(named_dir(out_dir, "export directory")))
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose a directory for the export")
    check_writable(out)
    if not out.is_dir():
        return out
    if source is not None and user_path(source).is_dir() and out.samefile(user_path(source)):
        raise UserError(f"{out}: is the model being exported; write the export to another directory")
    # a run is known by its checkpoints too: its top-level config.json may be gone (removed, or a run killed before
    # its first save pointed OUT at one), and --force wrote the export among them
    if is_native(out) or checkpoints(out):
        raise UserError(f"{out}: holds a nanogpt-mlx checkpoint, which the export would overwrite; "
                        "write it to another directory")
    # a staging directory is another export's, running or killed (removing it could break a running one)
    if any(not p.name.startswith(STAGING) for p in out.iterdir()) and not force:
        raise UserError(f"{out}: directory is not empty; pass --force (in Python force=True) to write into it, or "
                        "choose another")
    return out


def check_gpt2(config: GPTConfig) -> None:
    """Refuse a model that Hugging Face's GPT-2 (and mlx-lm's gpt2) would load as a different model, or that GPT-2's
    tokenizer, written with it, does not fit."""
    if config.vocab_size < GPT2_VOCAB_SIZE:  # the tokenizer's ids past its rows fail in transformers' pipeline
        raise UserError(f"cannot export as Hugging Face GPT-2: vocab_size {config.vocab_size} has no rows for all "
                        f"{GPT2_VOCAB_SIZE} tokens of GPT-2's tokenizer, which the export writes; keep it as a "
                        "nanogpt-mlx checkpoint")
    # init only sets the starting weights, and rope_base acts only with rope: neither changes the model exported
    switches = {k: v for k, v in config.switches().items() if k != "init" and (k != "rope_base" or config.rope)}
    untied = switches.pop("tie_embeddings", None) is not None
    reasons = []
    if switches:
        reasons.append(f"switches GPT-2 does not have ({', '.join(f'{k}={v}' for k, v in switches.items())})")
    if untied:  # Hugging Face's GPT-2 may be untied, but mlx-lm's gpt2 reads wte as its head
        reasons.append("its own lm_head (tie_embeddings=False), which mlx-lm's gpt2 ignores for wte")
    if reasons:  # (a recipe's model trains on from its checkpoint; an untied GPT-2 has no recipe)
        keep = "keep it as a nanogpt-mlx checkpoint (sample, eval and train --init-from read it)" if switches else \
            "sample and eval read it as it is"
        raise UserError(f"cannot export as Hugging Face GPT-2: the model has {' and '.join(reasons)}; {keep}")


def export_hf(model: GPT, out_dir: str | os.PathLike, force: bool = False, dtype: str | mx.Dtype = "float32"
              ) -> list[str]:
    """Write a Hugging Face GPT-2 directory (weights in `dtype`, which config.json names; config, generation config,
    tokenizer) that `transformers` (`from_pretrained`, `pipeline`) and mlx-lm (`load`) read as they read the hub's
    `gpt2`. Into an existing directory (`force`) it also removes the weight and tokenizer files that loaders would
    read with it there, and returns their names.
    A model with switches GPT-2 does not have (the speedrun recipe's) is refused before anything is written. (A
    Trainer's model computes in its dtype, bfloat16 on a GPU: its float32 weights are its OUT's, load_model(OUT).)"""
    check_gpt(model)
    check_gpt2(model.config)
    dtype = dtype_named(dtype)
    out_dir = check_export_target(out_dir, force)
    if not out_dir.exists():  # all the files or none (a full disk midway)
        with atomic_dir(out_dir) as tmp:
            _write_hf(model, tmp, dtype)
        return []
    # over an earlier export: it stays whole on a failure; another model's weights and tokenizer files go with it, or
    # loaders mix them in
    others = sorted({p.name for pattern in (*OTHER_WEIGHTS, *OTHER_TOKENIZER_FILES) for p in out_dir.glob(pattern)}
                    - set(EXPORT_FILES))
    with atomic_files(out_dir, EXPORT_FILES, remove=others) as staging:
        _write_hf(model, staging, dtype)
    return others


def _write_hf(model: GPT, out_dir: Path, dtype: mx.Dtype) -> None:
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_safetensors(tmp, to_hf(model, dtype), metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config(model.config, dtype_name(dtype)), indent=2))
    atomic_write_text(out_dir / "generation_config.json", json.dumps(generation_config(), indent=2))
    write_tokenizer_files(out_dir, model.config.block_size)
