"""Weights in and out: Hugging Face directories, the hub cache, this project's checkpoints, bad files."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_one_line_error, paired_params, run_cli
from test_model import hf_logits

from nanogpt_mlx import GPT, GPTConfig, UserError, console, device, recipes
from nanogpt_mlx.export import export_hf
from nanogpt_mlx.weights import load_model, save_model

SMALL = GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)


def read_tensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def test_export_then_transformers_gives_same_logits(tmp_path):
    model = GPT(SMALL, seed=3)
    export_hf(model, tmp_path / "out")
    idx = np.random.default_rng(0).integers(0, 50257, size=(2, 32))
    np.testing.assert_allclose(hf_logits(tmp_path / "out", idx), np.array(model(mx.array(idx))), rtol=0, atol=2e-5)


def test_transformers_in_and_out_is_byte_identical(tiny_hf_dir, tmp_path):
    export_hf(load_model(tiny_hf_dir), tmp_path / "out")
    original, exported = read_tensors(tiny_hf_dir), read_tensors(tmp_path / "out")
    # lm_head is tied to wte and the causal-mask buffers are not weights; exports use the hub's
    # gpt2 names, without save_pretrained's `transformer.` prefix
    expected = {k.removeprefix("transformer."): k for k in original
                if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(exported) == set(expected)
    for k, k_orig in expected.items():
        assert exported[k].dtype == original[k_orig].dtype and exported[k].tobytes() == original[k_orig].tobytes(), k
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_positions"], config["vocab_size"]) == (2, 64, 128, 50257)


def test_the_hubs_gpt2_layout_loads_as_transformers_reads_it(hub_gpt2_dir):
    """The hub's gpt2 config.json has no tie_word_embeddings (true when absent), and older transformers saved the
    causal-mask buffers: the fixtures save_pretrained writes have neither, so reading a missing key as untied, or
    keeping a buffer as a weight, passed the suite."""
    model = load_model(hub_gpt2_dir)
    assert model.config.tie_embeddings
    idx = np.random.default_rng(0).integers(0, 50257, size=(2, 16))
    np.testing.assert_allclose(np.array(model(mx.array(idx))), hf_logits(hub_gpt2_dir, idx), rtol=0, atol=2e-5)


def safetensors_header(path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def test_a_model_loads_in_the_dtype_asked(tiny_hf_dir, tmp_path, monkeypatch):
    """load_model(..., "bfloat16") (or mx.bfloat16): every weight rounded to bfloat16, whatever the file holds; a
    bfloat16 export loads back in float32 by default. A dtype no GPT computes in is refused before any download."""
    import nanogpt_mlx.weights as weights

    f32 = dict(load_model(tiny_hf_dir).parameters_flat())
    for dtype in ("bfloat16", mx.bfloat16):
        b16 = dict(load_model(tiny_hf_dir, dtype).parameters_flat())
        assert b16.keys() == f32.keys() and all(mx.array_equal(f32[k].astype(mx.bfloat16), w) and
                                                w.dtype == mx.bfloat16 for k, w in b16.items())
    export_hf(load_model(tiny_hf_dir, "bfloat16"), tmp_path / "bf16", dtype="bfloat16")
    again = dict(load_model(tmp_path / "bf16").parameters_flat())
    assert all(w.dtype == mx.float32 and mx.array_equal(w, b16[k]) for k, w in again.items())
    # the file's dtype is the one asked for, whatever the model computes in (a Trainer's model: bfloat16 on a GPU)
    export_hf(load_model(tiny_hf_dir, "bfloat16"), tmp_path / "f32")
    save_model(load_model(tiny_hf_dir, "bfloat16"), tmp_path / "native")
    save_model(load_model(tiny_hf_dir), tmp_path / "native16", dtype=mx.bfloat16)
    for name, dtype in (("bf16", "BF16"), ("f32", "F32"), ("native", "F32"), ("native16", "BF16")):
        header = safetensors_header(tmp_path / name / "model.safetensors")
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {dtype}, name
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(UserError, match="^dtype must be one of float32, bfloat16, got 'float16'$"):
        export_hf(load_model(tiny_hf_dir), tmp_path / "f16", dtype="float16")
    assert not (tmp_path / "f16").exists()
    monkeypatch.setattr(weights, "download", lambda *a, **kw: pytest.fail("looked up on the hub"))
    for bad in ("float16", mx.float16, "fp32", None):
        with pytest.raises(UserError, match=f"^dtype must be one of float32, bfloat16, got {re.escape(repr(bad))}$"):
            load_model("gpt2", bad)


def test_a_load_holds_its_weights_and_one_tensor_of_the_file_at_most(tmp_path):
    """A bfloat16 load held every float32 tensor of the file, their bfloat16 copies and the NaN check's temporaries at
    once: 1100 MB for 355 MB of bfloat16 weights, more than the float32 load's peak."""
    save_model(GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=4, n_head=4, n_embd=256), seed=1), tmp_path / "m")
    largest = 50257 * 256 * 4  # wte, in float32 as saved: with its cast's NaN check, 1.5x it beside the weights
    for dtype in ("float32", "bfloat16"):
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        model = load_model(tmp_path / "m", dtype)
        held = sum(w.nbytes for _, w in model.parameters_flat())
        assert mx.get_peak_memory() - before <= held + 1.5 * largest, dtype
        del model


def test_padded_vocab_exports_cropped_and_matches(tmp_path):
    model = GPT(GPTConfig(**{**SMALL.to_dict(), "vocab_size": 50304}), seed=4)
    save_model(model, tmp_path / "ckpt")  # this project's checkpoint keeps the padding
    assert load_model(tmp_path / "ckpt").config.vocab_size == 50304
    export_hf(load_model(tmp_path / "ckpt"), tmp_path / "out")
    assert read_tensors(tmp_path / "out")["wte.weight"].shape == (50257, 32)
    idx = np.random.default_rng(1).integers(0, 50257, size=(1, 32))
    ours = np.array(model(mx.array(idx)))[..., :50257]
    np.testing.assert_allclose(hf_logits(tmp_path / "out", idx), ours, rtol=0, atol=2e-5)


def test_a_vocab_smaller_than_gpt2s_tokenizer_is_not_exported(tmp_path):
    """Its export wrote GPT-2's tokenizer beside too few rows: transformers' pipeline failed with an IndexError."""
    with pytest.raises(UserError, match="cannot export as Hugging Face GPT-2: vocab_size 1000 has no rows for all "
                                        "50257 tokens"):
        export_hf(GPT(GPTConfig(**{**SMALL.to_dict(), "vocab_size": 1000})), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_model_with_tokens_beyond_gpt2s_is_said_to_lose_them(tmp_path):
    """Its rows 50257.. are tokens, not this project's padding: export dropped them and sample never drew them,
    without a word."""
    from conftest import save_hf_gpt2

    save_hf_gpt2(tmp_path / "more", n_positions=32, vocab_size=50260)
    proc = run_cli("export", str(tmp_path / "more"), str(tmp_path / "out"), check=True)
    assert f"warning: {tmp_path / 'more'}: 3 tokens beyond GPT-2's 50257: nanogpt-mlx uses GPT-2's tokenizer, so " \
           "sample never draws them and export drops them" in proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 50257
    save_model(GPT(GPTConfig(**{**SMALL.to_dict(), "vocab_size": 50304})), tmp_path / "ckpt")  # padding: no tokens
    assert "warning" not in run_cli("export", str(tmp_path / "ckpt"), str(tmp_path / "out2"), check=True).stderr


def test_export_names_only_the_switches_that_change_the_exported_model(tmp_path):
    """init sets the starting weights only, rope_base acts only with rope: neither is named, and a model differing
    from GPT-2 only in rope_base is GPT-2."""
    model = GPT(GPTConfig(**{**SMALL.to_dict(), "rope_base": 500.0}), seed=3)
    export_hf(model, tmp_path / "base")
    idx = np.random.default_rng(0).integers(0, 50257, size=(1, 32))
    np.testing.assert_allclose(hf_logits(tmp_path / "base", idx), np.array(model(mx.array(idx))), rtol=0, atol=2e-5)
    speedrun = GPTConfig(**{**SMALL.to_dict(), "rope": True, "init": "speedrun", "tie_embeddings": False})
    with pytest.raises(UserError, match=r"has switches GPT-2 does not have \(rope=True\) and its own lm_head "
                                        r"\(tie_embeddings=False\)"):
        export_hf(GPT(speedrun), tmp_path / "out")


def test_native_checkpoint_round_trip(tmp_path):
    model = GPT(SMALL, seed=5)
    save_model(model, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["format"] == "nanogpt-mlx"
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == SMALL
    for k, a, b in paired_params(model, loaded):
        assert mx.array_equal(a, b).item(), k


def same_weights(a: GPT, b: GPT) -> bool:
    return all(mx.array_equal(x, y).item() for _, x, y in paired_params(a, b))


def test_save_model_keeps_a_runs_model_its_checkpoints_and_other_files(tmp_path):
    """save_model overwrote anything: a run's checkpoint (save_model(m, "out/run/ckpt-000004")), the run's model
    (save_model(m, "out/run")), other files' directory, where export_hf refuses them. It saves over a model it
    saved, and into a non-empty directory with force=True (never a run or checkpoint)."""
    from nanogpt_mlx import checkpoint

    model, other = GPT(SMALL, seed=0), GPT(SMALL, seed=1)
    run = tmp_path / "run"
    ckpt = checkpoint.write(run, 4, model, {}, {"step": 4})
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for target, said in ((run, "is a training run (it holds ckpt-000004)"),
                         (ckpt, "is a training run's checkpoint (trainer.json)")):
        for forced in ({}, {"force": True}):
            with pytest.raises(UserError, match=f"^{re.escape(f'{target}: {said}')},[^\n]*; save to another "
                                                "directory$"):
                save_model(other, target, **forced)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files
    hf = tmp_path / "hf"  # another format's model, another's files
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (hf / "model.safetensors").write_bytes(b"theirs")
    with pytest.raises(UserError, match=f"^{re.escape(str(hf))}: directory is not empty .* pass force=True"):
        save_model(other, hf)
    assert (hf / "model.safetensors").read_bytes() == b"theirs"
    (hf / "notes.txt").write_text("mine")
    save_model(other, hf, force=True)
    assert same_weights(load_model(hf), other) and (hf / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError, match="force must be True or False, got 'no'"):
        save_model(other, tmp_path / "new", force="no")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        save_model(other, tmp_path / "file")
    saved, empty = tmp_path / "saved", tmp_path / "empty"  # over its own model, into an empty directory: no force
    empty.mkdir()
    save_model(model, saved)
    for target in (saved, empty):
        save_model(other, target)
        assert same_weights(load_model(target), other) and sorted(p.name for p in target.iterdir()) == \
            ["config.json", "model.safetensors"]


def test_a_model_directory_under_home_is_expanded(tmp_path, monkeypatch):
    """save_model to `~/ckpt` wrote ./~/ckpt, and load_local read from there."""
    from nanogpt_mlx.weights import load_local

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    save_model(GPT(SMALL, seed=5), "~/ckpt")
    assert (tmp_path / "home" / "ckpt" / "model.safetensors").is_file() and not (tmp_path / "~").exists()
    assert load_local("~/ckpt").config == load_model("~/ckpt").config == SMALL


def cache_repo(cache, repo_id: str, files: dict[str, bytes], no_exist: tuple[str, ...] = ()) -> None:
    """`files` (name -> content) as huggingface_hub keeps a download of the hub repo `repo_id` in its cache `cache`,
    with the files `no_exist` recorded as missing from the repo (as a download that the hub answered 404 leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    for name in no_exist:
        (repo / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
        (repo / ".no_exist" / commit / name).touch()


def test_hub_id_loads_from_the_huggingface_cache(tiny_hf_dir, tmp_path, monkeypatch):
    """A hub id already in the cache loads with HF_HUB_OFFLINE=1 (a cache laid out as huggingface_hub does)."""
    from huggingface_hub import constants

    cache_repo(tmp_path / "hub", "someone/tiny-gpt2",
               {name: (tiny_hf_dir / name).read_bytes() for name in ("config.json", "model.safetensors")})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = load_model("someone/tiny-gpt2")
    assert model.config.n_embd == 64
    assert mx.array_equal(model.wte.weight, load_model(tiny_hf_dir).wte.weight).item()


def test_a_sharded_hub_model_loads_from_the_cache_and_the_hub(tiny_hf_dir, tmp_path, monkeypatch):
    """A hub repo with model.safetensors.index.json and shards in place of model.safetensors: download asked for
    model.safetensors only ("not in the Hugging Face cache" offline; online, a 404)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import EntryNotFoundError
    from transformers import GPT2LMHeadModel

    from nanogpt_mlx import hub as hub_mod

    sharded = tmp_path / "sharded"
    GPT2LMHeadModel.from_pretrained(tiny_hf_dir).save_pretrained(sharded, max_shard_size="200KB")
    files = sorted(p.name for p in sharded.iterdir() if p.name != "generation_config.json")
    assert "model.safetensors" not in files and len(files) > 3
    expected = load_model(tiny_hf_dir).wte.weight
    cache_repo(tmp_path / "hub", "me/sharded", {name: (sharded / name).read_bytes() for name in files})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert mx.array_equal(load_model("me/sharded").wte.weight, expected).item()

    fetched = []

    def hub(repo_id, filename, local_files_only=False, **kwargs):  # a hub that has `sharded`'s files, none cached
        if local_files_only or filename not in files:
            raise EntryNotFoundError(filename)
        fetched.append(filename)
        return str(sharded / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setattr(hub_mod, "check_hub_reachable", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert mx.array_equal(load_model("me/sharded").wte.weight, expected).item()
    assert fetched[:2] == ["config.json", "model.safetensors.index.json"] and sorted(fetched) == files


def test_a_hub_repo_with_only_pickled_weights_is_said_to_be_so(tiny_hf_dir, tmp_path, monkeypatch):
    """A repo of config.json and pytorch_model.bin (older fine-tunes') was refused as one that does not exist
    ("could not be downloaded from the Hugging Face hub (404 ...)"), and from the cache offline as one not in it."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import EntryNotFoundError

    from nanogpt_mlx import hub as hub_mod

    config = (tiny_hf_dir / "config.json").read_bytes()
    fetched = []

    def hub(repo_id, filename, local_files_only=False, **kwargs):  # a hub with old/gpt2's two files, none cached
        if local_files_only or repo_id != "old/gpt2" or filename != "config.json":
            raise EntryNotFoundError(filename)  # (the pickle is never asked for)
        fetched.append(filename)
        (tmp_path / "config.json").write_bytes(config)
        return str(tmp_path / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setattr(hub_mod, "check_hub_reachable", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    no_safetensors = (r"^'old/gpt2': the hub repo has no safetensors weights \(no model.safetensors or "
                      r"model.safetensors.index.json\); pickled ones \(pytorch_model.bin\) are not loaded, as they "
                      r"can run code: convert them with transformers' "
                      r"GPT2LMHeadModel.from_pretrained\('old/gpt2'\).save_pretrained\(DIR\), which writes "
                      r"model.safetensors, and pass DIR$")
    with pytest.raises(UserError, match=no_safetensors):
        load_model("old/gpt2")
    assert fetched == ["config.json"]
    with pytest.raises(UserError, match="'nobody/gpt2' is not a local directory and could not be downloaded"):
        load_model("nobody/gpt2")  # no config.json: no such repo, as before

    # offline, from the cache: as a download that the hub answered so leaves it, or as a whole snapshot downloaded
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(tmp_path / "hub", "old/gpt2", {"config.json": config},
               no_exist=("model.safetensors", "model.safetensors.index.json"))
    cache_repo(tmp_path / "hub", "old/gpt2-snapshot", {"config.json": config, "pytorch_model.bin": b"not loaded"})
    cached = (r"no safetensors weights \(none in the Hugging Face cache, and HF_HUB_OFFLINE is set\); pickled ones "
              r"\(pytorch_model.bin\) are not loaded")
    for repo_id in ("old/gpt2", "old/gpt2-snapshot"):
        with pytest.raises(UserError, match=f"^'{repo_id}': the hub repo has {cached}.*, and pass DIR$"):
            load_model(repo_id)
    cache_repo(tmp_path / "hub", "old/gpt2-config", {"config.json": config})  # its weights may be on the hub still
    with pytest.raises(UserError, match="'old/gpt2-config' is not a local directory and not in the Hugging Face cache"):
        load_model("old/gpt2-config")
    assert_one_line_error(run_cli("sample", "--model", "old/gpt2", env={"HF_HUB_CACHE": str(tmp_path / "hub")}),
                          "the hub repo has no safetensors weights")


def test_unknown_hub_id_offline_fails_fast_with_one_clear_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_model("nobody/no-such-model")
    msg = str(e.value)
    assert "not a local directory" in msg and "HF_HUB_OFFLINE" in msg and "local directory with config.json" in msg


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`user/model` may be a hub id; a path of more parts (or starting with . / ~) is a local directory only."""
    import nanogpt_mlx.weights as weights

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(weights, "download", lambda *a, **kw: pytest.fail("looked up on the hub"))  # (its import)
    for name in ("runs/x/ckpt", "./gpt2", "~/no-such-model-dir"):
        with pytest.raises(UserError, match="no such directory"):
            load_model(name)


def copy_hf_dir(src, dst):
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_bad_directories_are_user_errors(tiny_hf_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no such directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)

    corrupt = copy_hf_dir(tiny_hf_dir, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_model(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_model(corrupt)

    def fail(path):  # MLX's errors may have no message: an IndexError here took its first line
        raise RuntimeError("")

    monkeypatch.setattr(mx, "load", fail)
    with pytest.raises(UserError, match=r"model.safetensors: cannot read safetensors \(RuntimeError\)$"):
        load_model(tiny_hf_dir)
    monkeypatch.undo()

    mismatch = copy_hf_dir(tiny_hf_dir, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    with pytest.raises(UserError, match=r"do not match config.json \(n_embd 128 in config.json, 64 in model.safetensors"):
        load_model(mismatch)
    (mismatch / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(UserError, match=r"n_layer 3 in config.json, 2 in model.safetensors"):
        load_model(mismatch)
    (mismatch / "config.json").write_text(json.dumps(config))
    tensors = read_tensors(mismatch)
    del tensors["transformer.h.1.attn.c_attn.bias"]
    from safetensors.numpy import save_file

    save_file(tensors, str(mismatch / "model.safetensors"))
    with pytest.raises(UserError, match=r"\(missing 1: h.1.attn.c_attn.bias\)$"):
        load_model(mismatch)
    fewer = copy_hf_dir(mismatch, tmp_path / "fewer")  # a long list: its count and first three names
    save_file({k: v for k, v in tensors.items() if ".h.1.mlp." not in k}, str(fewer / "model.safetensors"))
    with pytest.raises(UserError, match=r"\(missing 5: h.1.attn.c_attn.bias, h.1.mlp.c_fc.bias, "
                                        r"h.1.mlp.c_fc.weight \.\.\.\)$"):
        load_model(fewer)
    (mismatch / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(UserError, match="not GPT-2's tanh GELU"):
        load_model(mismatch)

    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text(json.dumps(config))
    (pickle_only / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="only pytorch_model.bin found; pickle files are not loaded"):
        load_model(pickle_only)
    (pickle_only / "pytorch_model.bin").rename(pickle_only / "pytorch_model-00001-of-00002.bin")  # save_pretrained's
    (pickle_only / "pytorch_model-00002-of-00002.bin").write_bytes(b"not loaded")  # said "model.safetensors: not found"
    with pytest.raises(UserError, match=r"only pytorch_model-00001-of-00002.bin \.\.\. found; pickle files are not"):
        load_model(pickle_only)


@pytest.mark.parametrize("field, value, needle", [
    ("vocab_size", 100_000_000_000, "vocab_size must be in 1..2^31-1, got 100000000000"),  # beyond MLX's shapes
    ("vocab_size", 100_000_000, "vocab_size 100000000 in config.json, 50257 in model.safetensors"),
    ("n_layer", 100_000_000, "n_layer 100000000 in config.json, 2 in model.safetensors"),
    ("n_positions", 4096, "block_size 4096 in config.json, 128 in model.safetensors"),
    ("n_embd", 64.5, "n_embd must be an integer, got 64.5"),
    ("n_embd", None, "n_embd must be an integer, got None"),  # was a TypeError in the n_inner check
    ("n_embd", {}, "n_embd must be an integer, got {}"),
    ("n_head", "2", "n_head must be an integer, got '2'"),
    ("n_layer", True, "n_layer must be an integer, got True"),
])
def test_config_is_checked_against_the_weights_header_first(tiny_hf_dir, tmp_path, field, value, needle):
    """Absurd sizes fail at once, before a model of that size is built; non-integers are not truncated."""
    import time

    bad = copy_hf_dir(tiny_hf_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, field: value}))
    start = time.perf_counter()
    with pytest.raises(UserError, match=re.escape(needle)):
        load_model(bad)
    assert time.perf_counter() - start < 1


def test_native_config_sizes_must_be_integers(tmp_path):
    save_model(GPT(SMALL, seed=0), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"]["n_embd"] = 32.5
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"n_embd must be an integer, got 32.5"):
        load_model(tmp_path / "ckpt")
    config["model"]["n_embd"], config["model"]["n_layer"] = 32, 100_000_000
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"n_layer 100000000 in config.json, 2 in model.safetensors"):
        load_model(tmp_path / "ckpt")


def test_truncated_weights_are_found_from_the_header(tiny_hf_dir, tmp_path):
    bad = copy_hf_dir(tiny_hf_dir, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserError, match=r"cannot read safetensors \(truncated"):
        load_model(bad)


@pytest.mark.parametrize("header, needle", [
    ({"wte.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "not enough values to unpack"),  # IndexError
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # a RecursionError's traceback
])
def test_a_malformed_safetensors_header_is_one_line(tiny_hf_dir, tmp_path, header, needle):
    bad = copy_hf_dir(tiny_hf_dir, tmp_path / "bad")
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    (bad / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + bytes(8))
    with pytest.raises(UserError, match=rf"model.safetensors: cannot read safetensors \(bad header: {needle}"):
        load_model(bad)


def test_sharded_safetensors_load_as_one_file(tiny_hf_dir, tmp_path):
    """save_pretrained(max_shard_size=...) writes model-0000i-of-0000n.safetensors and an index."""
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tiny_hf_dir).save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    whole, sharded = load_model(tiny_hf_dir), load_model(tmp_path / "sharded")
    for k, a, b in paired_params(whole, sharded):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)
    next((tmp_path / "sharded").glob("model-*-of-*.safetensors")).unlink()
    with pytest.raises(UserError, match="model.safetensors.index.json: names shards that are not there"):
        load_model(tmp_path / "sharded")


def test_variants_gpt2_does_not_have_are_refused_by_name(tiny_hf_dir, tmp_path):
    bad = copy_hf_dir(tiny_hf_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    with pytest.raises(UserError, match=r"n_inner=64 is not supported \(GPT-2's MLP is 4 \* n_embd = 256 wide\)"):
        load_model(bad)
    (bad / "config.json").write_text(json.dumps({**config, "n_inner": 256}))  # 4 * n_embd, written out
    load_model(bad)


def test_sizes_that_make_no_model_and_an_empty_shard_index_name_the_file(tiny_hf_dir, tmp_path):
    """n_head 3 of n_embd 64 said "model config: ..." without the file (Hugging Face's config.json or a checkpoint's);
    an index without shards, that shards "are not there: none"."""
    bad = copy_hf_dir(tiny_hf_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "n_head": 3}))
    with pytest.raises(UserError, match=rf"^{re.escape(str(bad))}/config.json: n_embd 64 is not divisible by n_head "
                                        r"3$"):
        load_model(bad)
    save_model(load_model(tiny_hf_dir), tmp_path / "native")
    native = json.loads((tmp_path / "native" / "config.json").read_text())
    native["model"]["n_head"] = 3
    (tmp_path / "native" / "config.json").write_text(json.dumps(native))
    with pytest.raises(UserError, match=r"native/config.json: not a valid nanogpt-mlx model config \(n_embd 64 is not "
                                        r"divisible by n_head 3\)$"):
        load_model(tmp_path / "native")
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(UserError, match=r"model.safetensors.index.json: names no shards \(its weight_map is empty\)$"):
        load_model(bad)


def test_an_untied_lm_head_loads_as_transformers_reads_it(tmp_path):
    """A GPT-2 saved with tie_word_embeddings=false (its own lm_head) was refused; transformers loads it. Export
    still refuses it: mlx-lm's gpt2 would read wte as its head."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from nanogpt_mlx.export import export_hf

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, tie_word_embeddings=False))
    with torch.no_grad():
        hf.lm_head.weight.normal_(0, 0.5)  # unlike wte
    hf.save_pretrained(tmp_path / "untied")
    model = load_model(tmp_path / "untied")
    ids = [[15496, 11, 314, 1101, 257, 3303, 2746, 11]]
    ref = hf.eval()(torch.tensor(ids)).logits.detach().numpy()
    ours = np.array(model(mx.array(ids)))
    assert not model.config.tie_embeddings and np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
    with pytest.raises(UserError, match=r"the model has its own lm_head \(tie_embeddings=False\), which mlx-lm's "
                                        r"gpt2 ignores for wte; sample and eval read it as it is"):
        export_hf(model, tmp_path / "export")  # not "switches GPT-2 does not have", nor train --init-from, refused:
    with pytest.raises(UserError, match="not the build-nanogpt recipe's .*; no recipe trains such a model"):
        recipes.BUILD_NANOGPT.check_model(model.config, "untied")
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": "no"}))
    with pytest.raises(UserError, match="tie_word_embeddings must be true or false, got 'no'"):
        load_model(tmp_path / "untied")


def test_other_heads_and_a_tied_models_own_lm_head_are_said_to_be_left_out(tiny_hf_dir, tmp_path, capsys):
    """A GPT2DoubleHeadsModel's multiple_choice_head was refused ("weights do not match config.json"), a tied model's
    lm_head.weight unlike wte dropped without a word (transformers uses it, untied), and "gelu_fast", GPT-2's GELU
    under another name, refused."""
    from safetensors.numpy import save_file

    m = copy_hf_dir(tiny_hf_dir, tmp_path / "m")
    tensors = read_tensors(m)
    wte = tensors["transformer.wte.weight"]
    head = {"multiple_choice_head.summary.weight": np.ones((1, 64), np.float32),
            "multiple_choice_head.summary.bias": np.zeros(1, np.float32)}
    save_file({**tensors, **head, "lm_head.weight": wte}, str(m / "model.safetensors"))  # a tied head, saved
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "activation_function": "gelu_fast"}))
    capsys.readouterr()
    loaded, original = load_model(m), load_model(tiny_hf_dir)
    assert capsys.readouterr().err == f"nanogpt-mlx: warning: {m}: multiple_choice_head ignored: a head for another " \
                                      "task than GPT-2's language model\n"
    for k, a, b in paired_params(loaded, original):
        assert mx.array_equal(a, b).item(), k
    save_file({**tensors, "lm_head.weight": wte + 1}, str(m / "model.safetensors"))
    load_model(m)
    assert capsys.readouterr().err == f"nanogpt-mlx: warning: {m}: lm_head.weight, unlike wte.weight, ignored: " \
                                      "config.json ties them (tie_word_embeddings); set it to false to use that head\n"
    save_file({**tensors, "other.weight": wte}, str(m / "model.safetensors"))  # no head we know of: not a GPT-2
    with pytest.raises(UserError, match=r"\(unexpected 1: other.weight\)$"):
        load_model(m)


@pytest.mark.parametrize("change, needle", [
    ({"attn_window": 8}, "switches this version of nanogpt-mlx does not know: attn_window"),
    ({"value_embeds": 0.9}, "config.json: not a valid .* model config \\(value_embeds must be an integer, got 0.9\\)"),
    ({"value_embeds": 1.0}, "value_embeds must be an integer, got 1.0"),  # as a size would be (_int_sizes)
    ({"rope": "no"}, "rope must be true or false, got 'no'"),
])
def test_a_model_config_from_another_version_is_refused(tmp_path, change, needle):
    save_model(GPT(SMALL, seed=0), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model"].update(change)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=needle):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("env, needle", [
    ({"HTTPS_PROXY": "http://proxy:abc"}, "cannot use the proxy http://proxy:abc"),
    ({"HTTPS_PROXY": "http://[::1"}, "Invalid IPv6 URL"),
    ({"HTTPS_PROXY": "http://"}, "(no host)"),
    ({"HF_ENDPOINT": "http://localhost:99999"}, "HF_ENDPOINT='http://localhost:99999' is not a URL"),
])
def test_malformed_proxy_or_endpoint_is_one_line(env, needle, tmp_path):
    proc = run_cli("sample", "--model", "nobody/no-such-model",
                   env={"HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path), "NO_PROXY": "", "no_proxy": "", **env})
    assert_one_line_error(proc, needle)


def test_weights_that_are_no_floats_or_an_index_naming_no_file_are_refused(tmp_path):
    """An int32 copy of the weights loaded as (nearly) all zeros and sampled gibberish with status 0; a number in a
    sharded model's index was a TypeError traceback."""
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8))
    save_model(model, tmp_path / "m")
    arrays = mx.load(str(tmp_path / "m" / "model.safetensors"))
    mx.save_safetensors(str(tmp_path / "m" / "model.safetensors"), {k: (a * 100).astype(mx.int32)
                                                                    for k, a in arrays.items()})
    with pytest.raises(UserError, match=r"is int32, not floating point"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "model.safetensors.index.json").write_text('{"weight_map": {"wte.weight": 5}}')
    with pytest.raises(UserError, match="not a safetensors index"):
        load_model(tmp_path / "m")
    save_model(model, tmp_path / "elsewhere")  # a shard outside the model's directory: it was read
    for name in (str(tmp_path / "elsewhere" / "model.safetensors"), "../elsewhere/model.safetensors"):
        (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": name}}))
        with pytest.raises(UserError, match=f"not a safetensors index \\({re.escape(repr(name))} is not in the "
                                            "model's directory\\)$"):
            load_model(tmp_path / "m")


def test_a_float64_model_loads_as_transformers_reads_it(tiny_hf_dir, tmp_path):
    """save_pretrained of a float64 GPT-2 writes F64 tensors, which MLX cannot read: "cannot read safetensors
    ([safetensor] unsupported dtype F64)". They load cast to float32, and export as the model they are."""
    import torch
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tiny_hf_dir).to(torch.float64).save_pretrained(tmp_path / "f64")
    assert {a.dtype for a in read_tensors(tmp_path / "f64").values()} == {np.dtype(np.float64)}
    model = load_model(tmp_path / "f64")
    assert {w.dtype for _, w in model.parameters_flat()} == {mx.float32}
    idx = np.random.default_rng(0).integers(0, 50257, size=(2, 16))
    np.testing.assert_allclose(np.array(model(mx.array(idx))), hf_logits(tmp_path / "f64", idx), rtol=0, atol=2e-5)
    export_hf(model, tmp_path / "out")
    np.testing.assert_allclose(hf_logits(tmp_path / "out", idx), hf_logits(tmp_path / "f64", idx), rtol=0, atol=2e-5)

    tensors = read_tensors(tmp_path / "f64")  # a value float32 cannot hold would be inf: "a damaged model"
    tensors["transformer.h.0.mlp.c_fc.weight"][1, 2] = 1e300
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp_path / "f64" / "model.safetensors"))
    with pytest.raises(UserError, match=r"model.safetensors: transformer.h.0.mlp.c_fc.weight holds values beyond "
                                        r"float32's range$"):
        load_model(tmp_path / "f64")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused(tmp_path, value):
    """A NaN weight sampled only "!!!!" and evaluated to a NaN loss, with status 0."""
    save_model(GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8)), tmp_path / "m")
    arrays = mx.load(str(tmp_path / "m" / "model.safetensors"))
    arrays["h.0.mlp.c_fc.weight"][3, 2] = value
    mx.save_safetensors(str(tmp_path / "m" / "model.safetensors"), arrays)
    assert_one_line_error(run_cli("sample", "--model", str(tmp_path / "m")),
                          f"{tmp_path / 'm'}: h.0.mlp.c_fc.weight holds NaN/inf: a damaged model")


def test_a_weight_beyond_bfloat16s_range_is_said_so(tmp_path):
    """float32's largest values round to inf in bfloat16: "a damaged model" alone sent the user to a sound file."""
    save_model(GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8)), tmp_path / "m")
    arrays = mx.load(str(tmp_path / "m" / "model.safetensors"))
    arrays["h.0.attn.c_proj.bias"][1] = 3.4e38
    mx.save_safetensors(str(tmp_path / "m" / "model.safetensors"), arrays)
    assert load_model(tmp_path / "m").h[0].attn.c_proj.bias[1].item() == pytest.approx(3.4e38)
    with pytest.raises(UserError, match=r"h.0.attn.c_proj.bias holds NaN/inf: a damaged model, or values beyond "
                                        r"bfloat16's range$"):
        load_model(tmp_path / "m", "bfloat16")


def test_paths_that_are_not_utf8_are_refused_as_such(tiny_hf_dir, tmp_path):
    """MLX raised std::bad_cast for them: "cannot read safetensors" (a damaged file) when loading, "free space" (a
    full disk) when a checkpoint was saved."""
    import os
    import shutil

    from nanogpt_mlx import checkpoint

    odd = tmp_path / os.fsdecode(b"m\xff")  # a name os.fsdecode gives with a surrogate
    shutil.copytree(tiny_hf_dir, odd)
    model = load_model(tiny_hf_dir)
    for call in (lambda: load_model(odd), lambda: save_model(model, odd / "ckpt"),
                 lambda: export_hf(model, odd / "hf"), lambda: checkpoint.write(odd, 1, model, {}, {}),
                 lambda: checkpoint.read_model(odd)):
        with pytest.raises(UserError, match=f"^MLX can only open UTF-8 paths: {re.escape(str(tmp_path))}/m\ufffd"):
            call()


def test_python_arguments_of_the_wrong_type_are_one_line(tmp_path):
    """load_model(None), load_local(123), checkpoint.read_model(None) and export_hf(model, None) were TypeErrors,
    export_hf("dir", ...) and save_model(None, ...) AttributeErrors; force="no" forced."""
    from nanogpt_mlx import checkpoint
    from nanogpt_mlx.weights import load_local

    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(UserError, match="the model must be a hub id or a directory .*, got None"):
        load_model(None)
    with pytest.raises(UserError, match="^the model directory must be a str or path, got 123$"):
        load_local(123)
    with pytest.raises(UserError, match="^the checkpoint directory must be a str or path, got None$"):
        checkpoint.read_model(None)
    with pytest.raises(UserError, match="the export directory must be a str or path, got None"):
        export_hf(model, None)
    with pytest.raises(UserError, match="^the model directory must be a str or path, got None$"):
        save_model(model, None)
    for wrong in ("dir", None):
        needed = re.escape(f"a GPT model is needed (load one with weights.load_model), got {wrong!r}")
        with pytest.raises(UserError, match=f"^{needed}$"):
            export_hf(wrong, tmp_path / "out")
        with pytest.raises(UserError, match="^a GPT model is needed"):
            save_model(wrong, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="force must be True or False, got 'no'"):
        export_hf(model, tmp_path, force="no")


@pytest.mark.skipif(not device.PROFILE.cpu_backend, reason="bfloat16 is slow on MLX's CPU backend only")
def test_loading_in_a_slow_dtype_is_said_once_in_python(tiny_hf_dir, capsys, monkeypatch):
    """The CLI alone said it (a notebook's load_model(M, 'bfloat16') on a CPU was silent), and a Trainer said it
    as a warning, every time."""
    monkeypatch.setattr(console, "_said", set())
    load_model(tiny_hf_dir)
    assert "slow" not in capsys.readouterr().err
    load_model(tiny_hf_dir, "bfloat16", computes=False)  # (an export's)
    assert "slow" not in capsys.readouterr().err
    note = ["nanogpt-mlx: note: bfloat16 is slow on MLX's CPU backend (float32 is faster there)"]
    for dtype in (mx.bfloat16, "bfloat16"):
        monkeypatch.setattr(console, "_said", set())
        load_model(tiny_hf_dir, dtype)
        load_model(tiny_hf_dir, dtype)
        assert [line for line in capsys.readouterr().err.splitlines() if "slow" in line] == note
