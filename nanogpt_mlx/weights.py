"""Model weights in and out: Hugging Face GPT-2 (hub or local directory) and this project's checkpoints.

Hugging Face GPT-2 stores its projections as Conv1D, shape (in, out); MLX's Linear is (out, in),
so conversion is a key map (`transformer.` prefix) plus transposes. Only safetensors are read:
pickled `pytorch_model.bin` files can run code and are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

from .errors import UserError
from .files import atomic_path, atomic_write_text
from .model import GPT, GPT2_VOCAB_SIZE, GPTConfig

HF_FILES = ["config.json", "model.safetensors"]
NATIVE_FORMAT = "nanogpt-mlx"  # marker in config.json of this project's checkpoints
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_FIXED = {"layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
               "tie_word_embeddings": True}


def sanitize(hf_weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Hugging Face GPT-2 tensors -> this project's names and layouts."""
    out = {}
    for k, w in hf_weights.items():
        k = k.removeprefix("transformer.")
        if k == "lm_head.weight" or k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # lm_head is tied to wte; the others are causal-mask buffers
        # a copy, not a transposed view: strided weights take a slower matmul path at every step
        out[k] = mx.contiguous(w.T) if k.endswith(_CONV1D) else w
    return out


def to_hf(model: GPT) -> dict[str, mx.array]:
    """This project's tensors -> Hugging Face GPT2LMHeadModel's, padded vocab cropped to 50257."""
    out = {}
    for k, w in model.parameters_flat():
        if k == "wte.weight" and w.shape[0] > GPT2_VOCAB_SIZE:
            w = w[:GPT2_VOCAB_SIZE]
        out["transformer." + k] = mx.contiguous(w.T if k.endswith(_CONV1D) else w)
    return out


def hf_config(config: GPTConfig) -> dict:
    """config.json of a Hugging Face GPT-2 with this architecture."""
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
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
    }


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory}: no config.json (expected a Hugging Face GPT-2 or nanogpt-mlx directory)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def _config_from_hf(cfg: dict, where: Path) -> GPTConfig:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where}: model_type is {cfg.get('model_type')!r}, only GPT-2 is supported")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{where}: activation {act!r} is not GPT-2's tanh GELU")
    for key, gpt2_value in _GPT2_FIXED.items():  # variants this architecture does not implement
        if cfg.get(key, gpt2_value) != gpt2_value:
            raise UserError(f"{where}/config.json: {key}={cfg[key]!r} is not supported (GPT-2 uses {gpt2_value!r})")
    try:
        return GPTConfig(block_size=int(cfg["n_positions"]), vocab_size=int(cfg["vocab_size"]),
                         n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]), n_embd=int(cfg["n_embd"]))
    except KeyError as e:
        raise UserError(f"{where}/config.json: missing field {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}/config.json: bad model size ({e})") from None


def _config_from_native(cfg: dict, where: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(cfg["model"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{where}/config.json: not a valid nanogpt-mlx model config ({e!r})") from None


def _load_safetensors(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        if (path.parent / "pytorch_model.bin").exists():
            raise UserError(f"{path.parent}: only pytorch_model.bin found; pickle files are not loaded, "
                            "convert it to model.safetensors")
        raise UserError(f"{path}: file not found")
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX raises plain RuntimeError/ValueError for bad files
        raise UserError(f"{path}: cannot read safetensors ({str(e).splitlines()[0]})") from None


def _load_into(model: GPT, weights: dict[str, mx.array], where: Path) -> None:
    expected = dict(model.parameters_flat())
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match config.json "
                        f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for k, w in weights.items():
        if w.shape != expected[k].shape:
            raise UserError(f"{where}: {k} has shape {tuple(w.shape)}, config.json implies {tuple(expected[k].shape)}")
    model.load_flat({k: w.astype(mx.float32) for k, w in weights.items()})
    mx.eval(model.parameters())


def load_local(directory: str | os.PathLike) -> GPT:
    """Load a local Hugging Face GPT-2 directory or a nanogpt-mlx checkpoint."""
    directory = Path(directory)
    cfg = _read_config(directory)
    native = cfg.get("format") == NATIVE_FORMAT
    config = _config_from_native(cfg, directory) if native else _config_from_hf(cfg, directory)
    weights = _load_safetensors(directory / "model.safetensors")
    if not native:
        weights = sanitize(weights)
    model = GPT(config, seed=0)
    _load_into(model, weights, directory)
    return model


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download(repo_id: str, files: list[str] = HF_FILES) -> Path:
    """Fetch `files` of a hub repo into the Hugging Face cache (or find them there) and return their folder."""
    from huggingface_hub import hf_hub_download

    tried = f"{repo_id!r} is not a local directory"
    hint = "pass a local directory with config.json and model.safetensors instead"
    try:  # all files cached already: no network round trip at all
        paths = [hf_hub_download(repo_id, f, local_files_only=True) for f in files]
        return Path(paths[0]).parent
    except Exception:  # noqa: BLE001  (any failure here just means "not fully cached")
        pass
    if hub_offline():
        raise UserError(f"{tried} and not in the Hugging Face cache (HF_HUB_OFFLINE is set); {hint}")
    try:
        paths = [hf_hub_download(repo_id, f, etag_timeout=10) for f in files]
    except Exception as e:  # noqa: BLE001  (network, auth, unknown repo: all end the same way)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{tried} and could not be downloaded from the Hugging Face hub ({reason}); {hint}") from None
    return Path(paths[0]).parent


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not name.endswith(".safetensors")


def load_model(name_or_path: str | os.PathLike) -> GPT:
    """A model from a local HF directory or checkpoint, else a hub id (`gpt2`, `gpt2-medium`, ...)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: expected a directory with config.json and model.safetensors")
        return load_local(path)
    if not _looks_like_hub_id(str(name_or_path)):
        raise UserError(f"{name_or_path}: no such directory")
    return load_local(download(str(name_or_path)))


def save_model(model: GPT, out_dir: str | os.PathLike) -> None:
    """Write this project's checkpoint format: model.safetensors + config.json (atomic per file)."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        mx.save_safetensors(str(tmp), dict(model.parameters_flat()))
    atomic_write_text(out_dir / "config.json",
                      json.dumps({"format": NATIVE_FORMAT, "model": model.config.to_dict()}, indent=2))


def export_hf(model: GPT, out_dir: str | os.PathLike) -> None:
    """Write a Hugging Face GPT-2 directory loadable by `GPT2LMHeadModel.from_pretrained`."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        mx.save_safetensors(str(tmp), to_hf(model), metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config(model.config), indent=2))
