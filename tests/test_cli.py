"""`nanogpt-mlx info | sample | export` as a user runs them, and their one-line errors."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_main

from nanogpt_mlx import device
from nanogpt_mlx.cli import main
from nanogpt_mlx.weights import load_model

PROMPT = "Hello, I'm a language model,"


def test_info():
    out = run_cli("info", check=True).stdout
    fields = ["mlx ", "profile ", "device ", "dtype ", "memory ", f"{device.PROFILE.dtype} gemm "]
    fields += ["blas ", "gemv shim "] if device.PROFILE.cpu_backend else []  # a BLAS of its own: MLX's CPU backend
    for field in fields:
        assert any(line.startswith(field) for line in out.splitlines()), (field, out)
    assert "GiB" in out and "GFLOP/s" in out and f"profile      {device.PROFILE.name}" in out


def test_info_with_a_forced_gpu_profile():
    out = run_cli("info", check=True, env={"NANOGPT_MLX_PROFILE": "cuda"}).stdout
    assert "profile      cuda" in out and "bfloat16 gemm" in out and "blas " not in out
    from nanogpt_mlx import cuda

    assert "loss chunk   4096 rows" in out
    assert ("loss kernel  cuda.py" if cuda.available() else "loss kernel  MLX ops (no NVIDIA GPU") in out
    assert "step threads 1: " in out  # not "1 (n_embd <= 512), else 1"
    assert "attention    cuDNN's fused kernel both ways" in out and "plain ops 128 queries" in out and "mlp backward recomputes" in out
    out = run_cli("info", check=True, env={"NANOGPT_MLX_PROFILE": "metal"}).stdout
    assert "attention    MLX's forward; the backward recomputes" in out


def test_python_dash_m_and_mlx_launch_run_the_cli():
    """`python -m nanogpt_mlx` is the command (run_cli uses it too), and so is each rank of `mlx.launch -m nanogpt_mlx`."""
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "nanogpt_mlx", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert help_text.startswith("usage: nanogpt-mlx")
    launch = Path(sys.executable).with_name("mlx.launch")
    proc = subprocess.run([str(launch), "--python", sys.executable, "--backend", "ring", "-n", "2", "--",
                           "-m", "nanogpt_mlx", "info"], capture_output=True, text=True, timeout=120)
    assert sum(line.startswith("platform ") for line in proc.stdout.splitlines()) == 2, proc.stdout + proc.stderr


def test_train_help_explains_every_field():
    """`train --help` gives each TrainConfig flag its meaning and each preset's default, grouped by value."""
    from dataclasses import fields

    from nanogpt_mlx.arguments import preset_defaults
    from nanogpt_mlx.cli import build_parser
    from nanogpt_mlx.config import PRESETS, TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {option: action.help for action in train._actions for option in action.option_strings}
    for f in fields(TrainConfig):
        assert len(f.metadata["help"]) > 10, f.name  # a sentence, not a placeholder
        expected = f"{f.metadata['help']} ({preset_defaults(f.name, PRESETS)})".replace("%", "%%")
        assert helps["--" + f.name.replace("_", "-")] == expected
    text = " ".join(train.format_help().split())
    assert preset_defaults("seed", PRESETS) == "default: 1337"
    assert preset_defaults("min_lr", PRESETS) == "default: unset"
    assert preset_defaults("n_layer", PRESETS) == ("gpt2-124m, finetune-shakespeare, speedrun-124m: 12; shakespeare, "
                                                   "shakespeare-speedrun: 4")
    assert "25% above" in text  # a literal percent sign survives argparse's formatting


def test_every_option_of_every_command_has_help():
    import argparse

    from nanogpt_mlx.cli import build_parser

    def missing(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from missing(sub, f"{path} {name}")
            elif not action.help:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(missing(build_parser(), "nanogpt-mlx")) == []


def test_readme_api_table_names_exist():
    """Every name in the README's Python API column is importable, and the table has the API's entry points."""
    import importlib
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = readme[readme.index("| job | command | Python API |"):].split("\n\n")[0].splitlines()[2:]
    names = {m for row in rows for m in re.findall(r"`(?:nanogpt_mlx\.)?(\w+)\.(\w+)", row.split("|")[3])}
    for module, name in names:
        if module == "nanogpt_mlx":  # a module named whole
            importlib.import_module(f"nanogpt_mlx.{name}")
        else:
            assert hasattr(importlib.import_module(f"nanogpt_mlx.{module}"), name), (module, name)
    for needed in [("sample", "SampleConfig"), ("evaluate", "load_hellaswag"), ("export", "export_hf"),
                   ("weights", "load_model"), ("config", "TrainConfig"), ("train", "Trainer"),
                   ("prepare", "PrepareConfig")]:
        assert needed in names, needed
    assert 'sources.shakespeare(path="input.txt")' in readme


def test_sample_prints_samples_like_build_nanogpt(tiny_hf_dir):
    args = ("sample", "--model", str(tiny_hf_dir), "--num-samples", "3", "--max-new-tokens", "8", "--seed", "42",
            "--no-stop")
    proc = run_cli(*args, check=True)
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("> " + PROMPT) and len(line) > len(PROMPT) + 2 for line in lines)
    assert len(set(lines)) > 1  # different samples
    assert run_cli(*args, check=True).stdout == proc.stdout  # the seed fixes them
    assert run_cli(*args[:-2], "43", "--no-stop", check=True).stdout != proc.stdout


def test_top_k_0_draws_among_all_tokens(tiny_hf_dir, capsys, monkeypatch):
    import nanogpt_mlx.sample as sample

    seen = []
    monkeypatch.setattr(sample, "sample_texts", lambda model, prompt, cfg, n: seen.append(cfg.top_k) or ["x"] * n)
    for k in ("0", "7"):
        run_main(capsys, "sample", "--model", str(tiny_hf_dir), "--num-samples", "2", "--top-k", k)
    assert seen == [None, 7]


def test_every_sampling_option_reaches_the_sample_config(tiny_hf_dir, capsys, monkeypatch):
    """--temperature and --top-p were only tested to refuse bad values: dropped, every test still passed."""
    import nanogpt_mlx.sample as sample

    seen = []
    monkeypatch.setattr(sample, "sample_texts", lambda model, prompt, cfg, n: seen.append((prompt, cfg, n)) or [""] * n)
    run_main(capsys, "sample", "--model", str(tiny_hf_dir), "--num-samples", "2", "--prompt", "Hi", "--temperature",
             "0.7", "--top-p", "0.9", "--top-k", "5", "--seed", "3", "--no-stop", "--crop", "--max-new-tokens", "4")
    run_main(capsys, "sample", "--model", str(tiny_hf_dir), "--num-samples", "3", "--greedy", "--temperature", "0")
    assert seen == [("Hi", sample.SampleConfig(max_new_tokens=4, temperature=0.7, top_k=5, top_p=0.9, seed=3,
                                               stop_at_eot=False, crop=True), 2),
                    ("Hello, I'm a language model,", sample.SampleConfig(temperature=0.0, greedy=True), 3)]


def test_version(capsys):
    import mlx.core as mx

    from nanogpt_mlx import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"nanogpt-mlx {__version__} (mlx {mx.__version__})\n"


def test_one_sample_is_streamed_and_greedy_is_deterministic(tiny_hf_dir):
    args = ("sample", "--model", str(tiny_hf_dir), "--num-samples", "1", "--max-new-tokens", "6", "--greedy",
            "--prompt", "The meaning of life is")
    first = run_cli(*args, check=True).stdout
    assert first.startswith("> The meaning of life is") and first.count("\n") == 1
    assert run_cli(*args, check=True).stdout == first


def test_export_writes_a_loadable_hugging_face_directory(tiny_hf_dir, tmp_path):
    proc = run_cli("export", str(tiny_hf_dir), str(tmp_path / "out"), check=True)
    assert "config.json" in proc.stdout
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"
    assert load_model(tmp_path / "out").config == load_model(tiny_hf_dir).config


def test_own_checkpoint_samples_and_exports_cropped(tmp_path):
    from nanogpt_mlx import GPT, GPTConfig
    from nanogpt_mlx.weights import save_model

    config = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)  # padded vocab
    save_model(GPT(config, seed=0), tmp_path / "ckpt")
    out = run_cli("sample", "--model", str(tmp_path / "ckpt"), "--num-samples", "2", "--max-new-tokens", "5",
                  "--seed", "1", check=True).stdout
    assert len(out.splitlines()) == 2 and out.startswith("> " + PROMPT)
    run_cli("export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), check=True)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 50257


@pytest.mark.skipif(sys.platform != "linux" or not device.PROFILE.cpu_backend,
                    reason="MLX's CPU backend takes a BLAS on Linux only")
def test_the_bundled_blas_is_said_once(tiny_hf_dir):
    env = {"NANOGPT_MLX_BLAS": "bundled"}
    proc = run_cli("sample", "--model", str(tiny_hf_dir), "--num-samples", "2", "--max-new-tokens", "3", env=env,
                   check=True)
    assert [line for line in proc.stderr.splitlines() if "BLAS" in line] == [
        "nanogpt-mlx: note: MLX's bundled BLAS, as NANOGPT_MLX_BLAS asks"]
    info = run_cli("info", env=env, check=True).stdout
    assert "blas         bundled\n" in info and "note         MLX's bundled BLAS, as NANOGPT_MLX_BLAS asks\n" in info


def test_prompt_too_long_needs_crop(tiny_hf_dir):
    long = " word" * 120  # 120 tokens + 30 new > 128
    base = ("sample", "--model", str(tiny_hf_dir), "--prompt", long, "--num-samples", "1", "--greedy")
    proc = run_cli(*base)
    assert_one_line_error(proc, "exceeds the model's context of 128", "--crop")
    assert proc.stdout == ""  # not even the "> " of a streamed sample
    assert run_cli(*base, "--crop", check=True).stdout.startswith("> ")


@pytest.mark.parametrize("args, needles", [
    (("--max-new-tokens", "0"), ("--max-new-tokens", "must be >= 1")),
    (("--max-new-tokens", "-5"), ("--max-new-tokens", "must be >= 1")),
    (("--top-k", "-1"), ("--top-k", "must be >= 0")),
    (("--temperature", "-1"), ("--temperature", "must be > 0")),
    (("--temperature", "nan"), ("--temperature", "must be > 0")),
    (("--top-p", "1.5"), ("--top-p", "must be in (0, 1]")),
])
def test_bad_sampling_arguments(tiny_hf_dir, args, needles):
    assert_one_line_error(run_cli("sample", "--model", str(tiny_hf_dir), *args), *needles, status=2)


def test_temperature_0_is_the_argmax_of_greedy(tiny_hf_dir, capsys):
    """--greedy's help says the temperature does nothing then, but --temperature 0 was refused with it."""
    base = ("sample", "--model", str(tiny_hf_dir), "--num-samples", "1", "--max-new-tokens", "3")
    assert_one_line_error(run_main(capsys, *base, "--temperature", "0"), "--temperature 0", "--greedy")
    assert run_main(capsys, *base, "--temperature", "0", "--greedy").stdout == \
        run_main(capsys, *base, "--greedy").stdout


@pytest.mark.parametrize("args", [
    ("sample", "--num-s", "2"),
    ("train", "--max-st", "5"),
    ("eval", "loss", "--data", "x", "--seq", "8"),
    ("export", "a", "b", "--for"),
])
def test_options_are_never_abbreviated(args):
    assert_one_line_error(run_cli(*args), "unrecognized arguments", args[-1] if args[-1].startswith("--") else args[-2],
                          status=2)


@pytest.mark.parametrize("args, said", [
    (("--model", "out/run", "sample"), "nanogpt-mlx: error: --model is an option of a COMMAND: it goes after one "
                                       "(nanogpt-mlx COMMAND ... --model ...)"),
    (("--max-steps=2", "train"), "nanogpt-mlx: error: --max-steps is an option of a COMMAND"),
    (("prepare", "--out", "d", "shakespeare"), "nanogpt-mlx prepare: error: --out is an option of a SOURCE"),
    (("eval", "--model", "out/run", "loss"), "nanogpt-mlx eval: error: --model is an option of a TASK"),
    (("--seed", "1"), "nanogpt-mlx: error: --seed is an option of a COMMAND"),
    # no SOURCE at all (it was "--out comes before the SOURCE"), or --out's value a SOURCE's name
    (("prepare", "--inspect", "d", "--out", "o"), "nanogpt-mlx prepare: error: --out is an option of a SOURCE: it "
                                                  "goes after one (nanogpt-mlx prepare SOURCE ... --out ...)"),
    (("prepare", "--inspect", "d", "--out", "shakespeare"), "nanogpt-mlx prepare: error: --out is an option of a "
                                                            "SOURCE"),
    (("prepare", "--inspect", "shakespeare", "--out", "o"), "nanogpt-mlx prepare: error: --out is an option of a "
                                                            "SOURCE"),  # (a directory named as a SOURCE inspected)
    (("--bogus", "sample"), "nanogpt-mlx: error: unrecognized arguments: --bogus"),
    (("prepare", "-x"), "nanogpt-mlx prepare: error: unrecognized arguments: -x"),
])
def test_an_option_of_a_command_given_before_one_is_said_so(args, said):
    """argparse took the option's value for the command: "argument COMMAND: invalid choice: 'out/run'"."""
    assert_one_line_error(run_cli(*args), said, status=2)


def test_prepare_sources_name_themselves_and_inspect_takes_no_source(tmp_path, capsys):
    """A source's errors and usage began with the prepare command's whole usage line; --inspect with a SOURCE
    inspected and wrote nothing; a bad setting was refused only after Tiny Shakespeare's download."""
    with pytest.raises(SystemExit, match="2"):
        main(["prepare", "files", "x"])
    assert capsys.readouterr().err == "nanogpt-mlx prepare files: error: the following arguments are required: --out\n"
    with pytest.raises(SystemExit):
        main(["prepare", "shakespeare", "--help"])
    assert capsys.readouterr().out.startswith("usage: nanogpt-mlx prepare shakespeare [-h] --out OUT")
    proc = run_main(capsys, "prepare", "--inspect", str(tmp_path), "files", "a.txt", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "--inspect DIR cannot be combined with a SOURCE (files)")
    proc = run_main(capsys, "prepare", "shakespeare", "--url", "http://127.0.0.1:9/x", "--out", str(tmp_path / "o"),
                    "--name", ".hidden")
    assert_one_line_error(proc, "name '.hidden': shards are files")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [("--inspect", "DIR", "shakespeare"), ("--inspect", "DIR", "files", "a.txt"),
                                  ("shakespeare", "--inspect", "DIR"), ("files", "a.txt", "--inspect=DIR")])
def test_inspect_with_a_source_says_so_without_out(capsys, args):
    """Without --out, argparse asked the SOURCE for its --out (or, after it, called --inspect unrecognized)."""
    assert_one_line_error(run_main(capsys, "prepare", *args), "--inspect DIR cannot be combined with a SOURCE")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_help_that_cannot_be_written_is_a_failure():
    """argparse dropped the write error: `--help > /dev/full` exited 0 with nothing written."""
    for args in (["--help"], ["sample", "--help"]):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", *args], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
        assert proc.returncode == 1 and "No space left on device" in proc.stderr


@pytest.mark.parametrize("args", [["info"], ["--help"]], ids=["info", "help"])
def test_output_into_a_closed_pipe_is_a_quiet_success(args):
    """As piped into `head`, which exits before reading: not a failure, and nothing said."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_stdout_on_a_full_disk_is_named(tiny_hf_dir, tmp_path):
    """A write error on stdout named no file ("No space left on device"), as if the command had failed: export's
    files were all written."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", "export", str(tiny_hf_dir), str(tmp_path / "out")],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert_one_line_error(proc, "stdout: cannot write (No space left on device)")
    assert proc.returncode == 1 and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_closed_stdout_is_named_as_a_full_one(tiny_hf_dir, tmp_path):
    """`export ... >&-`: what the command printed went to /dev/null (put there so that no file opened later takes
    descriptor 1) with status 0; now writing it fails, as in C (`ls >&-`), after export's files were written."""
    proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", "export", str(tiny_hf_dir), str(tmp_path / "out")],
                          stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert_one_line_error(proc, "stdout: cannot write (it was closed when the command started)")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_no_parser_allows_abbreviations():
    import argparse

    from nanogpt_mlx.cli import build_parser

    def parsers(p):
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    found = list(parsers(build_parser()))
    assert len(found) > 10 and not any(p.allow_abbrev for p in found)


def copy_hf_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_bad_models(tiny_hf_dir, tmp_path):
    assert_one_line_error(run_cli("sample", "--model", str(tmp_path / "nope")), "nope", "no such directory")
    assert_one_line_error(run_cli("export", str(tmp_path / "nope"), str(tmp_path / "out")), "no such directory")

    corrupt = copy_hf_dir(tiny_hf_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes((tiny_hf_dir / "model.safetensors").read_bytes()[:5000])
    assert_one_line_error(run_cli("sample", "--model", str(corrupt)), "model.safetensors", "cannot read safetensors")

    mismatch = copy_hf_dir(tiny_hf_dir, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "n_embd": 96}))
    assert_one_line_error(run_cli("export", str(mismatch), str(tmp_path / "out")), "mismatch",
                          "n_embd 96 in config.json, 64 in model.safetensors")
    assert not (tmp_path / "out").exists()

    assert_one_line_error(run_cli("sample", "--model", "nobody/no-such-model"),
                          "nobody/no-such-model", "HF_HUB_OFFLINE", "local directory")


@pytest.mark.parametrize("args", [
    ("sample", "--model", "nosuchuser/nosuchmodel"),
    ("sample",),
    ("export", "gpt2", "OUT"),
    ("eval", "loss", "--model", "gpt2", "--data", "DATA"),
])
def test_unreachable_hub_fails_within_seconds(tmp_path, args):
    """Online mode, nothing cached, the hub unreachable (a closed port on 127.0.0.1): one line, no retries."""
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0",
           "no_proxy": "127.0.0.1"}
    args = [str(tmp_path / a) if a in ("OUT", "DATA") else a for a in args]
    if "eval" in args:  # its data is checked first
        (tmp_path / "DATA").mkdir()
        np.save(tmp_path / "DATA" / "toy_val_000000.npy", np.zeros(300, np.uint16))
    start = time.perf_counter()
    proc = run_cli(*args, env=env)
    seconds = time.perf_counter() - start
    assert_one_line_error(proc, "not in the Hugging Face cache", f"cannot reach the Hugging Face hub at "
                          f"http://127.0.0.1:{port}", "pass a local directory")
    print(f"{' '.join(args[:2])}: failed in {seconds:.1f} s")
    assert seconds < 10
    assert not (tmp_path / "OUT").exists()


# ------------------------------------------------------------------------------ hub download
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tiny_hf_dir, monkeypatch):
    """Serve tiny_hf_dir as the hub repo `someone/tiny` on 127.0.0.1, the way huggingface_hub expects."""
    requests: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def _send_headers(self) -> bytes | None:
            requests.append(f"{self.command} {self.path}")
            parts = self.path.split("?")[0].strip("/").split("/")  # someone/tiny/resolve/main/FILE
            file = tiny_hf_dir / parts[-1]
            if len(parts) != 5 or parts[:3] != ["someone", "tiny", "resolve"] or not file.is_file():
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                return None
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return data

        def do_HEAD(self):
            self._send_headers()

        def do_GET(self):
            data = self._send_headers()
            if data is not None:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_hub_download_is_cached(fake_hub, tiny_hf_dir, tmp_path):
    url, requests = fake_hub
    env = {"HF_ENDPOINT": url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "0", "no_proxy": "127.0.0.1"}
    args = ("sample", "--model", "someone/tiny", "--num-samples", "1", "--max-new-tokens", "4", "--greedy")
    online = run_cli(*args, env=env, check=True).stdout
    assert any("resolve/main/model.safetensors" in r for r in requests)
    snapshot = tmp_path / "cache" / "models--someone--tiny" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_hf_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    requests.clear()
    offline = run_cli(*args, env={**env, "HF_HUB_OFFLINE": "1"}, check=True).stdout  # from the cache
    assert offline == online and requests == []
    assert_one_line_error(run_cli("sample", "--model", "someone/missing", env=env),
                          "someone/missing", "could not be downloaded", "local directory")


def test_ctrl_c_while_the_parser_imports_commands_is_one_line(monkeypatch, capsys):
    """Building the parser imports every command's module: Ctrl-C then was a traceback."""
    from nanogpt_mlx import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "nanogpt-mlx: interrupted\n"


@pytest.mark.skipif(not device.PROFILE.cpu_backend, reason="kernels compiled by a C++ compiler: MLX's CPU backend's")
def test_a_kernel_that_mlx_cannot_compile_is_one_line(capsys, monkeypatch):
    """A full disk where MLX's CPU backend writes its kernels' sources: a 16-line traceback from inside MLX."""
    from nanogpt_mlx import cli

    def full_disk(args):
        raise RuntimeError("[Compile::eval_cpu] Failed to compile function Add_f32 with error code 1: ...\n"
                           "fatal error: error closing /cache/kernels/cc.s: No space left on device")

    monkeypatch.setattr(cli, "cmd_info", full_disk)
    assert_one_line_error(run_main(capsys, "info"), "MLX could not compile a kernel", "No space left on device")
    monkeypatch.setattr(cli, "cmd_info", lambda args: (_ for _ in ()).throw(RuntimeError("another MLX error")))
    with pytest.raises(RuntimeError, match="another MLX error"):  # not taken for a compiler's
        run_main(capsys, "info")


def test_a_streamed_sample_ends_its_line_when_generating_fails(tiny_hf_dir, capsys, monkeypatch):
    import nanogpt_mlx.sample as sample
    from nanogpt_mlx.errors import UserError

    def failing(model, prompt, cfg):
        yield "Hello"
        yield " world"
        raise UserError("MLX could not compile a kernel (a full disk?)")

    monkeypatch.setattr(sample, "stream_text", failing)
    proc = run_main(capsys, "sample", "--model", str(tiny_hf_dir), "--num-samples", "1")
    assert proc.stdout == "> Hello world\n"
    assert_one_line_error(proc, "could not compile")


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_sigterm_stops_eval_and_sample_as_ctrl_c_does(command, tiny_hf_dir, tmp_path, capsys, monkeypatch):
    """They had no handler for SIGTERM (kill, a scheduler's timeout): they ended with no line, status 143."""
    import signal

    from nanogpt_mlx import evaluate, sample

    def terminated(*_args, **_kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(evaluate, "load_hellaswag", terminated)
    monkeypatch.setattr(sample, "sample_texts", terminated)
    monkeypatch.setattr(sample, "stream_text", terminated)
    args = {"eval": ["eval", "hellaswag", "--model", str(tiny_hf_dir), "--data", str(tmp_path / "x.jsonl")],
            "sample": ["sample", "--model", str(tiny_hf_dir), "--max-new-tokens", "2"]}[command]
    def unhandled(*_args):  # what the default action would do, without ending the test run
        raise AssertionError("SIGTERM reached the handler from before the command")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        proc = run_main(capsys, *args)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert proc.returncode == 128 + signal.SIGTERM and proc.stderr.strip().splitlines() == ["nanogpt-mlx: interrupted"]
