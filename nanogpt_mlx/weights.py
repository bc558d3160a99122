"""Model weights in: Hugging Face GPT-2 (a local directory, or from the hub: hub.py) and this project's model format
(save_model; out to Hugging Face's: export.py).

Hugging Face GPT-2 stores its projections as Conv1D, shape (in, out); MLX's Linear is (out, in),
so conversion is transposes plus, on the way in, dropping the `transformer.` prefix that
`save_pretrained` writes. Only safetensors are
read (float64 ones, which MLX cannot read, with numpy): pickled `pytorch_model.bin` files can run code and are
refused. config.json is checked against the weights file's header before a model is built, so a wrong size fails
at once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import device
from .console import few, warn
from .errors import UserError, check_bool, first_line
from .files import (atomic_path, atomic_write_text, cannot, mlx_path, named_dir, parse_json, read_json,
                    user_path)
from .hub import SHARD_INDEX, download, shard_names
from .model import GPT, GPT2_VOCAB_SIZE, SIZES, GPTConfig, check_gpt, dtype_named

HF_FILES = ["config.json", "model.safetensors"]
TRAINER_STATE = "trainer.json"  # beside the model in a run's checkpoint (checkpoint.STATE_FILE): not to save over
NATIVE_FORMAT = "nanogpt-mlx"  # marker in config.json of this project's checkpoints
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# the task heads of transformers' other GPT-2 models (GPT2DoubleHeadsModel, ...ForSequenceClassification,
# ...ForTokenClassification, ...ForQuestionAnswering): their GPT-2 loads as a language model without them, as in
# transformers' GPT2LMHeadModel
_TASK_HEADS = ("multiple_choice_head.", "score.", "classifier.", "qa_outputs.")
_GPT2_FIXED = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


def sanitize(hf_weights: dict[str, mx.array], tied: bool = True) -> dict[str, mx.array]:
    """Hugging Face GPT-2 tensors -> this project's names and layouts (`tied`: lm_head is wte, and dropped)."""
    out = {}
    for k, w in hf_weights.items():
        k = k.removeprefix("transformer.")
        if (tied and k == "lm_head.weight") or k.endswith((".attn.bias", ".attn.masked_bias")) or \
                k.startswith(_TASK_HEADS):
            continue  # a tied lm_head is wte; then causal-mask buffers, and heads of other tasks than GPT-2's
        # a copy, not a transposed view: strided weights take a slower matmul path at every step
        out[k] = mx.contiguous(w.T) if k.endswith(CONV1D) else w
    return out


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (expected a Hugging Face GPT-2 or nanogpt-mlx directory)")
    try:
        cfg = read_json(path)
    except ValueError as e:  # not JSON, not UTF-8
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


_NATIVE_SIZES = dict(zip(SIZES, SIZES))  # GPTConfig field -> key in our config.json, and in Hugging Face's:
_HF_SIZES = {**_NATIVE_SIZES, "block_size": "n_positions"}


def _int_sizes(d: dict, keys: dict[str, str], where: Path) -> dict[str, int]:
    """The model sizes `keys` (GPTConfig name -> key in `d`) of a config.json; floats, strings and
    booleans are refused rather than truncated."""
    values = {}
    for name, key in keys.items():
        if key not in d:
            raise UserError(f"{where}/config.json: missing field {key!r}")
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise UserError(f"{where}/config.json: {key} must be an integer, got {v!r}")
        values[name] = v
    return values


def _config_from_hf(cfg: dict, where: Path) -> GPTConfig:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where}: model_type is {cfg.get('model_type')!r}, only GPT-2 is supported")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):  # transformers' names of one formula
        raise UserError(f"{where}: activation {act!r} is not GPT-2's tanh GELU")
    for key, gpt2_value in _GPT2_FIXED.items():  # variants this architecture does not implement
        if cfg.get(key, gpt2_value) != gpt2_value:
            raise UserError(f"{where}/config.json: {key}={cfg[key]!r} is not supported (GPT-2 uses {gpt2_value!r})")
    sizes = _int_sizes(cfg, _HF_SIZES, where)  # before n_embd is computed with (a null was a TypeError)
    if cfg.get("n_inner") not in (None, 4 * sizes["n_embd"]):  # None: 4 * n_embd
        raise UserError(f"{where}/config.json: n_inner={cfg['n_inner']!r} is not supported (GPT-2's MLP is 4 * n_embd "
                        f"= {4 * sizes['n_embd']} wide)")
    tied = cfg.get("tie_word_embeddings", True)
    if not isinstance(tied, bool):
        raise UserError(f"{where}/config.json: tie_word_embeddings must be true or false, got {tied!r}")
    try:
        return GPTConfig(**sizes, tie_embeddings=tied)
    except UserError as e:  # sizes that make no model (n_head not dividing n_embd), said with the file
        raise UserError(f"{where}/config.json: {str(e).removeprefix('model config: ')}") from None


def _config_from_native(cfg: dict, where: Path) -> GPTConfig:
    model = cfg.get("model")
    if not isinstance(model, dict):
        raise UserError(f"{where}/config.json: not a valid nanogpt-mlx model config (no 'model' object)")
    _int_sizes(model, _NATIVE_SIZES, where)  # sizes as JSON integers, named with the file
    try:
        return GPTConfig.from_dict(model)
    except (UserError, ValueError) as e:  # (FieldTypeError is a UserError)
        raise UserError(f"{where}/config.json: not a valid nanogpt-mlx model config "
                        f"({str(e).removeprefix('model config: ')})") from None


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    """A safetensors header (8-byte length + JSON), checked against the file size: each tensor's (dtype, shape, start,
    end) in the data, and where the data starts in the file."""
    bad = f"{path}: cannot read safetensors"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise UserError(f"{bad} (header length {n}, file size {size})")
            header = parse_json(f.read(n))
        tensors, end = {}, 0
        for k, v in header.items():
            if k != "__metadata__":
                start, stop = map(int, v["data_offsets"])  # ([0] failed as an IndexError's traceback)
                tensors[k] = (str(v["dtype"]), tuple(int(d) for d in v["shape"]), start, stop)
                end = max(end, stop)
    except OSError as e:
        raise cannot("read safetensors", path, e) from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{bad} (bad header: {first_line(e)})") from None
    if end > size - 8 - n:
        raise UserError(f"{bad} (truncated: its header describes {end} bytes of data, the file holds {size - 8 - n})")
    return tensors, 8 + n


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, checked against the file size."""
    return {k: shape for k, (_, shape, _, _) in _safetensors_header(path)[0].items()}


def _check_sizes(config: GPTConfig, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Compare config.json with the sizes the weights file holds, before a model of that size is built."""
    names = {k.removeprefix("transformer."): s for k, s in shapes.items()}
    tables = ["wte.weight"] + ([] if config.rope else ["wpe.weight"])  # RoPE models have no position table
    if any(len(names.get(t, ())) != 2 for t in tables):
        raise UserError(f"{where}: model.safetensors has no 2-D {' and '.join(tables)} (not a GPT-2)")
    vocab, n_embd = names["wte.weight"]
    layers = {k.split(".")[1] for k in names if k.startswith("h.")}
    found = {"n_layer": len(layers), "n_embd": n_embd, "vocab_size": vocab}
    if not config.rope:
        found["block_size"] = names["wpe.weight"][0]
    for field, n in found.items():
        if getattr(config, field) != n:
            raise UserError(f"{where}: weights do not match config.json ({field} {getattr(config, field)} in "
                            f"config.json, {n} in model.safetensors)")


def _weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards its index names."""
    path, index = directory / "model.safetensors", directory / SHARD_INDEX
    if path.is_file():
        return [path]
    if index.is_file():
        names = shard_names(index)
        missing = [n for n in names if not (directory / n).is_file()]
        if not names:
            raise UserError(f"{index}: names no shards (its weight_map is empty)")
        if missing:
            raise UserError(f"{index}: names shards that are not there: {few(missing)}")
        return [directory / n for n in names]
    pickled = sorted(p.name for p in directory.glob("pytorch_model*.bin"))  # one file, or save_pretrained's shards
    if pickled:
        raise UserError(f"{directory}: only {pickled[0]}{' ...' if len(pickled) > 1 else ''} found; pickle files are "
                        "not loaded, convert it to model.safetensors")
    raise UserError(f"{path}: file not found")


# safetensors dtypes as numpy reads them (little-endian); bfloat16, which numpy lacks, as its bits
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                 "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _load_float64(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], int, int]],
                  start: int) -> dict[str, mx.array]:
    """A safetensors file holding float64 tensors, which MLX cannot read (transformers' `.to(torch.float64)` then
    `save_pretrained`): read with numpy, its float64 tensors cast to float32 one at a time (a float64 copy of a
    model is twice the float32 one that is trained and sampled)."""
    bad = f"{path}: cannot read safetensors"
    out = {}
    try:
        with open(path, "rb") as f:
            for k, (dtype, shape, begin, end) in tensors.items():
                if dtype not in _NUMPY_DTYPES:
                    raise UserError(f"{bad} (unsupported dtype {dtype} of {k})")
                f.seek(start + begin)  # one tensor in memory at a time, not a mapping of the whole file
                w = np.frombuffer(f.read(end - begin), _NUMPY_DTYPES[dtype]).reshape(shape)
                if dtype == "F64":
                    with np.errstate(over="ignore"):
                        w32 = w.astype(np.float32)
                    if not np.isfinite(w32).all() and np.isfinite(w).all():
                        # as inf it was refused as "a damaged model": it is only too wide for float32
                        raise UserError(f"{path}: {k} holds values beyond float32's range")
                    w = w32
                out[k] = mx.array(w).view(mx.bfloat16) if dtype == "BF16" else mx.array(w)
    except OSError as e:
        raise cannot("read safetensors", path, e) from None
    except ValueError as e:  # a tensor's bytes that are not its shape's
        raise UserError(f"{bad} (bad header: {first_line(e)})") from None
    return out


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    tensors, start = _safetensors_header(path)
    if any(dtype == "F64" for dtype, *_ in tensors.values()):
        return _load_float64(path, tensors, start)
    name = mlx_path(path)
    try:
        return mx.load(name)
    except Exception as e:  # MLX raises plain RuntimeError/ValueError for bad files
        raise UserError(f"{path}: cannot read safetensors ({first_line(e)})") from None


def _load_into(model: GPT, weights: dict[str, mx.array], where: Path, dtype: mx.Dtype = mx.float32) -> None:
    expected = dict(model.parameters_flat())
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        said = "; ".join(f"{what} {len(names)}: {few(names)}"
                         for what, names in (("missing", missing), ("unexpected", unexpected)) if names)
        raise UserError(f"{where}: weights do not match config.json ({said})")
    for k, w in weights.items():
        if w.shape != expected[k].shape:
            raise UserError(f"{where}: {k} has shape {tuple(w.shape)}, config.json implies {tuple(expected[k].shape)}")
        if not mx.issubdtype(w.dtype, mx.floating):  # int32 copies of the weights loaded as (nearly) all zeros
            raise UserError(f"{where}: {k} is {device.dtype_name(w.dtype)}, not floating point: not a model's weights")
    cast = {}
    for k in list(weights):  # one tensor at a time: its file's copy is let go before the next is read
        cast[k] = weights.pop(k).astype(dtype)
        # a NaN or inf weight makes the logits NaN: sampling gave "!!!!" (token 0) and evaluation NaN losses, status 0
        if nonfinite([(k, cast[k])]) is not None:
            beyond = "" if dtype == mx.float32 else f", or values beyond {device.dtype_name(dtype)}'s range"
            raise UserError(f"{where}: {k} holds NaN/inf: a damaged model{beyond}")
    model.load_flat(cast)


def nonfinite(arrays: Iterable[tuple[str, mx.array]], group_bytes: int = 1 << 28) -> str | None:
    """The name of the first of (name, array) `arrays` that holds a NaN or inf, or None. Checked in groups of about
    `group_bytes`: the host queues all of a group's temporaries at once."""
    sums: list[mx.array] = []
    names: list[str] = []
    pending = 0
    for name, a in arrays:
        sums.append(mx.sum(a * 0))  # 0 where every value is finite, NaN where one is not: faster than isfinite
        names.append(name)
        pending += a.nbytes
        if pending >= group_bytes:
            mx.eval(sums)
            pending = 0
    if not sums:
        return None
    finite = (mx.stack(sums) == 0).tolist()
    return next((name for name, ok in zip(names, finite) if not ok), None)


def _warn_left_out(hf_weights: dict[str, mx.array], config: GPTConfig, where: Path) -> None:
    """Say what of a Hugging Face model sanitize leaves out that is more than a copy: another task's head, and a tied
    model's lm_head that is not wte (transformers uses such a head, untied)."""
    heads = sorted({k.split(".")[0] for k in hf_weights if k.startswith(_TASK_HEADS)})
    if heads:
        warn(f"{where}: {', '.join(heads)} ignored: a head for another task than GPT-2's language model")
    lm_head = hf_weights.get("lm_head.weight")
    wte = hf_weights.get("transformer.wte.weight", hf_weights.get("wte.weight"))
    if config.tie_embeddings and lm_head is not None and wte is not None and not mx.array_equal(lm_head, wte).item():
        warn(f"{where}: lm_head.weight, unlike wte.weight, ignored: config.json ties them (tie_word_embeddings); set "
             "it to false to use that head")


def load_local(directory: str | os.PathLike, dtype: str | mx.Dtype = "float32") -> GPT:
    """Load a local Hugging Face GPT-2 directory or a nanogpt-mlx checkpoint (a leading `~` expanded), its weights in
    `dtype` (float32 or bfloat16), whatever the file's."""
    dtype_ = dtype_named(dtype)  # before the (maybe long) read
    directory = user_path(named_dir(directory, "model directory"))
    cfg = _read_config(directory)
    native = cfg.get("format") == NATIVE_FORMAT
    config = _config_from_native(cfg, directory) if native else _config_from_hf(cfg, directory)
    files = _weight_files(directory)
    _check_sizes(config, {k: v for f in files for k, v in safetensors_shapes(f).items()}, directory)
    weights = {k: v for f in files for k, v in _load_safetensors(f).items()}
    if not native:
        _warn_left_out(weights, config, directory)
        weights = sanitize(weights, config.tie_embeddings)
        if config.vocab_size > GPT2_VOCAB_SIZE:  # (this project's padded rows are its checkpoints', never tokens)
            warn(f"{directory}: {config.vocab_size - GPT2_VOCAB_SIZE} tokens beyond GPT-2's {GPT2_VOCAB_SIZE}: "
                 "nanogpt-mlx uses GPT-2's tokenizer, so sample never draws them and export drops them")
    model = GPT(config, seed=0)
    _load_into(model, weights, directory, dtype_)
    return model


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not name.endswith(".safetensors")


def load_model(name_or_path: str | os.PathLike, dtype: str | mx.Dtype = "float32", *, computes: bool = True) -> GPT:
    """A model from a local HF directory or checkpoint, else a hub id (`gpt2`, `gpt2-medium`, ...), its weights in
    `dtype`: float32 (as `transformers` loads GPT-2) or bfloat16 (half the memory; a GPU's fast path). A dtype slow
    on this device is noted, unless the model does not compute (`computes` False: an export only writes it)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise UserError(f"the model must be a hub id or a directory (a str or path), got {name_or_path!r}")
    dtype_named(dtype)  # before a download
    device.say_notes(dtype if computes else None)  # (a command said the device's at its start; Python hears them here)
    path = user_path(named_dir(name_or_path, "model"))  # '' would be the working directory
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: expected a directory with config.json and model.safetensors")
        return load_local(path, dtype)
    if not _looks_like_hub_id(str(name_or_path)):
        raise UserError(f"{name_or_path}: no such directory")
    return load_local(download(str(name_or_path)), dtype)


def save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """mx.save_safetensors, with its write failures ("[write] Unable to write N bytes") as OSError,
    which `atomic_path` reports as one line."""
    name = mlx_path(path)
    try:
        mx.save_safetensors(name, arrays, metadata=metadata)
    except RuntimeError as e:
        raise OSError(first_line(e)) from None


def save_model(model: GPT, out_dir: str | os.PathLike, force: bool = False, dtype: str | mx.Dtype = "float32"
               ) -> None:
    """Write this project's model format into `out_dir` (a leading `~` expanded): model.safetensors in `dtype` +
    config.json (atomic per file), which `load_model`, `sample --model` and `train --init-from` read. Into a new or
    empty directory, or over a model it wrote before; with `force`, into any other directory, but never a training
    run's OUT or one of its checkpoints (refused, UserError: their models are the run's, saved by the Trainer)."""
    check_gpt(model)
    check_bool("force", force)  # "no" would force
    dtype = dtype_named(dtype)
    out_dir = user_path(named_dir(out_dir, "model directory"))
    _check_save_target(out_dir, force)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_safetensors(tmp, {k: w.astype(dtype) for k, w in model.parameters_flat()})
    atomic_write_text(out_dir / "config.json",
                      json.dumps({"format": NATIVE_FORMAT, "model": model.config.to_dict()}, indent=2))


def step_of(ckpt: Path) -> int | None:
    """The step a checkpoint directory's name gives (None: not a checkpoint's name)."""
    digits = ckpt.name.removeprefix("ckpt-")
    # ASCII digits only: "²" is a digit to str.isdigit and no int, and "١" an int (1) of a directory not ours
    return int(digits) if ckpt.name.startswith("ckpt-") and digits.isascii() and digits.isdigit() else None


def checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary ones are never listed); by step, as
    names sort wrongly from step 10^6 on (ckpt-1000000 < ckpt-999999)."""
    out = Path(out)
    found = [p for p in out.glob("ckpt-*") if p.is_dir() and step_of(p) is not None] if out.is_dir() else []
    return sorted(found, key=step_of)


def _check_save_target(out: Path, force: bool) -> None:
    """Refuse (UserError) what save_model would overwrite: a file, a run (its model.safetensors is its latest
    checkpoint's), a run's checkpoint, and a non-empty directory that holds more than a model it wrote (`force`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose a directory for the model")
    if not out.is_dir():
        return
    if found := checkpoints(out):
        raise UserError(f"{out}: is a training run (it holds {found[-1].name}), whose model the save would replace; "
                        "save to another directory")
    if (out / TRAINER_STATE).exists():
        raise UserError(f"{out}: is a training run's checkpoint ({TRAINER_STATE}), which the save would overwrite; "
                        "save to another directory")
    # a model saved here before may be saved over, nothing else unforced (temporaries are a save's killed midway)
    names = {p.name for p in out.iterdir() if not p.name.startswith((".model.tmp", ".config.tmp"))}
    if names and not (names <= set(HF_FILES) and is_native(out)) and not force:
        raise UserError(f"{out}: directory is not empty (nor a model saved by save_model alone); pass force=True to "
                        "write into it, or choose another")


def is_native(directory: Path) -> bool:
    """Whether `directory` holds this project's model format (its config.json says so)."""
    with contextlib.suppress(UserError):  # no or bad config.json: not ours
        return directory.is_dir() and _read_config(directory).get("format") == NATIVE_FORMAT
    return False
