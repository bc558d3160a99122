"""`export` as third-party clients read it (mlx-lm, transformers' pipeline), and where it may write."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import assert_one_line_error, paired_params, run_cli

from nanogpt_mlx.errors import UserError
from nanogpt_mlx.sample import SampleConfig, sample_texts
from nanogpt_mlx.export import EXPORT_FILES, export_hf
from nanogpt_mlx.weights import load_model

PROMPT = "ROMEO: Wherefore art thou"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(lively_hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    run_cli("export", str(lively_hf_dir), str(out), check=True)
    return out


@pytest.fixture(scope="module")
def ours(exported) -> str:
    """Our greedy continuation of PROMPT (the text `sample --greedy` prints), without the prompt."""
    text = sample_texts(load_model(exported), PROMPT, SampleConfig(max_new_tokens=NEW_TOKENS, greedy=True))[0]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT) + 20
    return text[len(PROMPT):]


def test_export_has_hub_names_tokenizer_and_generation_config(exported):
    from safetensors import safe_open

    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORT_FILES)
    with safe_open(exported / "model.safetensors", "np") as f:
        names = set(f.keys())
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.attn.c_attn.weight", "h.3.mlp.c_proj.bias"} <= names
    assert not any(k.startswith("transformer.") for k in names)  # as the hub's gpt2 names them
    with safe_open(exported / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}  # as the hub's files say; some loaders require it
    assert json.loads((exported / "generation_config.json").read_text()) == {"bos_token_id": 50256,
                                                                            "eos_token_id": 50256}
    model_config = json.loads((exported / "config.json").read_text())
    assert model_config["n_ctx"] == model_config["n_positions"] == 128
    assert model_config["dtype"] == model_config["torch_dtype"] == "float32"  # by default, as the hub's gpt2
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 128 and config["eos_token"] == "<|endoftext|>"


def test_mlx_lm_loads_the_export_and_generates_our_greedy_text(exported, ours):
    from mlx_lm import generate, load

    model, tokenizer = load(str(exported))
    assert generate(model, tokenizer, prompt=PROMPT, max_tokens=NEW_TOKENS) == ours


def test_transformers_pipeline_generates_our_greedy_text(exported, ours):
    from transformers import pipeline

    generator = pipeline("text-generation", str(exported))
    out = generator(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    assert out == PROMPT + ours


def test_export_round_trips_and_nanogpt_loads_prefixed_names_too(lively_hf_dir, exported):
    """transformers' save_pretrained writes `transformer.h.0...`, exports write `h.0...`: both load."""
    a, b = load_model(lively_hf_dir), load_model(exported)
    assert all((x == y).all().item() for _, x, y in paired_params(a, b))


def test_a_bfloat16_export_loads_as_bfloat16_and_generates_our_bfloat16_text(lively_hf_dir, ours, tmp_path):
    """`export --dtype bfloat16` (half the bytes): config.json names the dtype, so transformers 5 loads the weights
    in it, as mlx-lm does; both generate the greedy text of `sample --dtype bfloat16`, which is not the float32
    text (the computation is bfloat16's)."""
    import torch
    from mlx_lm import generate, load
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, pipeline

    out = tmp_path / "bf16"
    proc = run_cli("export", str(lively_hf_dir), str(out), "--dtype", "bfloat16", check=True)
    assert "(Hugging Face GPT-2 layout, bfloat16)" in proc.stdout
    assert "slow" not in proc.stderr  # bfloat16 stored, not computed
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    proc = run_cli("sample", "--model", str(lively_hf_dir), "--dtype", "bfloat16", "--prompt", PROMPT, "--greedy",
                   "--num-samples", "1", "--max-new-tokens", str(NEW_TOKENS), check=True)
    assert "bfloat16 is slow on MLX's CPU backend" in proc.stderr  # the CPU profile's note
    text = proc.stdout.removeprefix("> ").removesuffix("\n")[len(PROMPT):]
    assert text != ours
    model, tokenizer = load(str(out))
    assert model.model.wte.weight.dtype == mx.bfloat16
    assert generate(model, tokenizer, prompt=PROMPT, max_tokens=NEW_TOKENS) == text
    generator = pipeline("text-generation", str(out))
    assert generator(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"] == PROMPT + text


# ------------------------------------------------------------------------------- targets
def test_export_refuses_non_empty_directories_unless_forced(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("export", str(tiny_hf_dir), str(out)), "not empty", "--force")
    with pytest.raises(UserError, match=r"not empty; pass --force \(in Python force=True\)"):  # (Python's name too)
        export_hf(load_model(tiny_hf_dir), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    run_cli("export", str(tiny_hf_dir), str(out), "--force", check=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cli("export", str(tiny_hf_dir), str(empty), check=True)  # an empty directory needs no --force


def test_export_over_another_models_weights_removes_them(tiny_hf_dir, lively_hf_dir, tmp_path):
    """--force over a sharded save_pretrained kept its shards beside the export: mlx-lm, which loads every
    model*.safetensors, refused the folder ("parameters not in model")."""
    from mlx_lm import load
    from transformers import GPT2LMHeadModel

    out = tmp_path / "out"
    GPT2LMHeadModel.from_pretrained(tiny_hf_dir).save_pretrained(out, max_shard_size="5MB")
    assert (out / "model.safetensors.index.json").is_file()
    for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "notes.txt"):
        (out / name).write_bytes(b"old")
    run_cli("export", str(lively_hf_dir), str(out), "--force", check=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPORT_FILES, "notes.txt"])
    assert load_model(out).config == load_model(lively_hf_dir).config
    load(str(out))
    GPT2LMHeadModel.from_pretrained(out)


def test_export_over_another_models_tokenizer_files_removes_them(tiny_hf_dir, tmp_path):
    """--force kept an earlier model's special_tokens_map.json, added_tokens.json and chat templates: transformers'
    AutoTokenizer (and mlx-lm through it) read them with the export's tokenizer (a pad id past the vocab, a chat
    template that changed mlx-lm's prompt)."""
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    out.mkdir()
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (out / "added_tokens.json").write_text(json.dumps({"<pad>": 60000}))
    (out / "chat_template.jinja").write_text("{{ 'OLD' }}")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": "{{ 'OLD' }}"}))
    (out / "additional_chat_templates").mkdir()
    (out / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'OLD' }}")
    (out / "tokenizer.model").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    proc = run_cli("export", str(tiny_hf_dir), str(out), "--force", check=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPORT_FILES, "notes.txt"])
    # said: they were removed without a word
    assert proc.stdout.rstrip().endswith("; removed added_tokens.json, additional_chat_templates, chat_template.jinja, "
                                         "chat_template.json, special_tokens_map.json, tokenizer.model, which loaders "
                                         "would read with it"), proc.stdout
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is None and tokenizer.chat_template is None and len(tokenizer) == 50257


def test_export_never_writes_over_its_source_or_a_run(tiny_hf_dir, tmp_path):
    source = tmp_path / "src"
    export_hf(load_model(tiny_hf_dir), source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    assert_one_line_error(run_cli("export", str(source), str(source), "--force"), "is the model being exported")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before

    from nanogpt_mlx.weights import save_model

    run = tmp_path / "run"  # a training run's directory: its config.json is nanogpt-mlx's
    save_model(load_model(tiny_hf_dir), run)
    assert_one_line_error(run_cli("export", str(tiny_hf_dir), str(run), "--force"), "nanogpt-mlx checkpoint")
    assert json.loads((run / "config.json").read_text())["format"] == "nanogpt-mlx"
    # a run whose top-level config.json is gone is known by its checkpoints: --force wrote the export among them
    save_model(load_model(tiny_hf_dir), run / "ckpt-000010")
    (run / "config.json").unlink()
    with pytest.raises(UserError, match="holds a nanogpt-mlx checkpoint"):
        export_hf(load_model(tiny_hf_dir), run, force=True)
    assert not (run / "config.json").exists()


def test_export_to_a_file_is_one_line(tiny_hf_dir, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert_one_line_error(run_cli("export", str(tiny_hf_dir), str(target)), "not a directory")
    assert target.read_text() == "x"


def test_export_to_an_empty_name_is_refused(tiny_hf_dir, tmp_path):
    """Path('') is the working directory: `export SRC "$OUT"` with OUT unset wrote the model there."""
    assert_one_line_error(run_cli("export", str(tiny_hf_dir), "", cwd=tmp_path), "the export directory is ''")
    assert not any(tmp_path.iterdir())


def test_a_model_of_an_empty_name_is_refused(tiny_hf_dir, tmp_path, monkeypatch):
    """`sample --model "$MODEL"` with MODEL unset loaded the working directory, a model if one was there."""
    from nanogpt_mlx.errors import UserError

    monkeypatch.chdir(tiny_hf_dir)
    with pytest.raises(UserError, match=r"^the model is '' \(an unset variable\?\)"):
        load_model("")


def test_text_a_terminal_cannot_show_is_replaced(tiny_hf_dir):
    proc = run_cli("sample", "--model", str(tiny_hf_dir), "--prompt", "café", "--num-samples", "2",
                   "--max-new-tokens", "2", "--seed", "0", env={"PYTHONIOENCODING": "ascii"}, check=True)
    assert proc.stdout.startswith("> caf?")


def test_an_export_that_fails_midway_leaves_nothing(tiny_hf_dir, tmp_path, monkeypatch):
    """A full disk after the weights were written left a directory that looked like a model and was not one."""
    from nanogpt_mlx import export
    from nanogpt_mlx.errors import UserError

    def full_disk(out_dir, block_size):
        raise UserError(f"{out_dir}/vocab.json: cannot write (No space left on device)")

    monkeypatch.setattr(export, "write_tokenizer_files", full_disk)
    model = load_model(tiny_hf_dir)
    (tmp_path / "empty").mkdir()
    for target in ("new", "empty"):
        with pytest.raises(UserError, match="No space left") as e:
            export_hf(model, tmp_path / target)
        assert str(e.value).startswith(f"{tmp_path / target}/vocab.json")  # not a temporary directory's name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())
    monkeypatch.undo()
    inode = (tmp_path / "empty").stat().st_ino
    export_hf(model, tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(EXPORT_FILES)
    assert (tmp_path / "empty").stat().st_ino == inode  # written into, not replaced (a mount point, the cwd)


SIGNAL_MIDWAY = """
import os, signal, sys
from nanogpt_mlx import cli, export
real = export.write_tokenizer_files
def signalled(out_dir, block_size):  # the weights are written by now
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    real(out_dir, block_size)
export.write_tokenizer_files = signalled
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_midway_through_an_export_leaves_no_temporary_files(how, tiny_hf_dir, tmp_path):
    """SIGTERM (kill, `timeout`) or SIGHUP ended `export` where it stood: its half-written copy of the model stayed
    beside the target (or inside it, with --force), hidden, for good. Ctrl-C (SIGINT) leaves nothing either."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    for force in ([], ["--force"]):  # a new directory, then over the export that this leaves
        before = sorted(p.name for p in tmp_path.rglob("*"))
        proc = subprocess.run([sys.executable, "-c", SIGNAL_MIDWAY, how, "export", str(tiny_hf_dir), str(out), *force],
                              capture_output=True, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # not nohup's
        assert proc.returncode == 128 + getattr(signal, how) and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "nanogpt-mlx: interrupted"
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing new: no temporary files
        run_cli("export", str(tiny_hf_dir), str(out), *force, check=True)


def test_an_export_over_another_that_fails_midway_keeps_the_other_whole(tiny_hf_dir, lively_hf_dir, tmp_path,
                                                                       monkeypatch):
    """--force over an earlier export replaced it file by file: a Ctrl-C or a full disk midway left the new weights
    with the old config.json, a model nothing could load."""
    from nanogpt_mlx import export
    from nanogpt_mlx.errors import UserError

    out = tmp_path / "out"
    export_hf(load_model(tiny_hf_dir), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(out_dir, block_size):
        raise UserError(f"{out_dir}/vocab.json: cannot write (No space left on device)")

    monkeypatch.setattr(export, "write_tokenizer_files", full_disk)
    with pytest.raises(UserError, match=f"^{out}/vocab.json: cannot write"):
        export_hf(load_model(lively_hf_dir), out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing staged is left either
    monkeypatch.undo()
    export_hf(load_model(lively_hf_dir), out, force=True)
    assert load_model(out).config == load_model(lively_hf_dir).config


def test_an_export_over_a_directory_in_the_way_of_one_of_its_files_writes_none(tiny_hf_dir, lively_hf_dir, tmp_path):
    """--force where vocab.json was a directory replaced config.json and model.safetensors, then failed."""
    from nanogpt_mlx.errors import UserError

    out = tmp_path / "out"
    export_hf(load_model(tiny_hf_dir), out)
    (out / "vocab.json").unlink()
    (out / "vocab.json").mkdir()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=f"^{out}/vocab.json: cannot write"):
        export_hf(load_model(lively_hf_dir), out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before and (out / "vocab.json").is_dir()


def test_a_new_export_directory_is_as_readable_as_any_new_directory(tiny_hf_dir, tmp_path):
    """A private temporary directory renamed into place left exports (and checkpoints) readable by their owner only."""
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    export_hf(load_model(tiny_hf_dir), tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask


def test_export_into_the_working_directory_and_through_a_link(tiny_hf_dir, tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run_cli("export", str(tiny_hf_dir), ".", cwd=tmp_path / "here", check=True)
    run_cli("export", str(tiny_hf_dir), str(tmp_path / "link"), check=True)
    for out in ("here", "real"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == sorted(EXPORT_FILES)


def test_what_another_export_stages_is_neither_in_the_way_nor_removed(tiny_hf_dir, tmp_path):
    """A staging directory (of an export running, or killed) made an otherwise empty target "not empty"; removing it
    broke the export that was running."""
    from nanogpt_mlx.files import STAGING

    out = tmp_path / "out"
    (out / f"{STAGING}abc").mkdir(parents=True)
    (out / f"{STAGING}abc" / ".model.tmp1.safetensors").write_bytes(b"half")
    export_hf(load_model(tiny_hf_dir), out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPORT_FILES, f"{STAGING}abc"])
