"""Shared fixtures: small random GPT-2 models saved the way Hugging Face saves them (no network)."""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import nanogpt_mlx  # noqa: F401  (loads OpenBLAS before anything imports mlx.core)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # a background job of a non-interactive shell starts with Ctrl-C ignored, and Python then installs no
    # KeyboardInterrupt: the tests of Ctrl-C failed on correct code. Handled here, it is at its default again in
    # the commands the tests start (exec resets a handled signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def save_hf_gpt2(path: Path, n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=50257, seed=0) -> Path:
    """A random transformers GPT2LMHeadModel written with save_pretrained (safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=vocab_size)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """2 layers, 64 dims, full GPT-2 vocab, context 128."""
    return save_hf_gpt2(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def hub_gpt2_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """tiny_hf_dir laid out as the hub's `gpt2` is: config.json with that file's keys (n_ctx; no tie_word_embeddings,
    which transformers reads as true), tensors named without `transformer.`, no lm_head, and the causal-mask buffers
    that older transformers saved (`.attn.bias`, `.attn.masked_bias`)."""
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = tmp_path_factory.mktemp("hub_gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(tiny_hf_dir / "model.safetensors")).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((128, 128), np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 128, "n_embd": 64, "n_head": 2, "n_layer": 2,
        "n_positions": 128, "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257}))
    return path


@pytest.fixture(scope="session")
def lively_hf_dir(tmp_path_factory) -> Path:
    """A random transformers GPT-2 with larger weights (init std 0.2): its greedy text does not
    collapse into one repeated token, so comparing token sequences means something."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lively")
    GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=128, initializer_range=0.2)
                    ).save_pretrained(path)
    return path


def run_cli(*args: str, check: bool = False, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run `python -m nanogpt_mlx ARGS` (the `nanogpt-mlx` command) in a subprocess, capturing text output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **kw.pop("env", {})}
    proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"nanogpt-mlx {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, status: int = 1) -> None:
    """Bad input: exit `status` (1, a UserError's; 2, a usage error's), exactly one line on stderr, no traceback,
    mentions each needle."""
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("nanogpt-mlx: note:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def paired_params(a, b) -> list[tuple[str, object, object]]:
    """Two models' parameters side by side by name, their names checked to be the same first (a zip of the two
    lists stops at the shorter one, comparing fewer weights)."""
    pa, pb = dict(a.parameters_flat()), dict(b.parameters_flat())
    assert list(pa) == list(pb)
    return [(k, pa[k], pb[k]) for k in pa]


def run_main(capsys, *args: str) -> subprocess.CompletedProcess:
    """Run `nanogpt-mlx ARGS` in this process (so monkeypatches apply), as run_cli reports it."""
    from nanogpt_mlx.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture
def read_only(monkeypatch):
    """`read_only(DIR)` makes DIR behave like a read-only mount in this process: creating, writing,
    renaming, linking or deleting anything under it raises EROFS. (chmod does not stop root, who runs CI.)"""
    import mlx.core as mx

    roots: list[Path] = []

    def check(path) -> None:
        if isinstance(path, (str, os.PathLike)) and any(Path(os.path.abspath(path)).is_relative_to(r) for r in roots):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    def guarded(real, n_paths=1, writes=lambda *a, **k: True):
        def fake(*args, **kwargs):
            if writes(*args, **kwargs):
                for path in args[:n_paths]:
                    check(path)
            return real(*args, **kwargs)
        return fake

    def write_mode(file, mode="r", *args, **kwargs) -> bool:
        return any(c in mode for c in "wax+")

    def write_flags(path, flags, *args, **kwargs) -> bool:
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    monkeypatch.setattr(builtins, "open", guarded(builtins.open, writes=write_mode))
    monkeypatch.setattr(io, "open", guarded(io.open, writes=write_mode))  # pathlib's
    monkeypatch.setattr(os, "open", guarded(os.open, writes=write_flags))
    for name in ("mkdir", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))
    for name in ("replace", "rename", "link"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name), n_paths=2))
    monkeypatch.setattr(mx, "save_safetensors", guarded(mx.save_safetensors))
    return lambda directory: roots.append(Path(directory).absolute())
