"""Training when things go wrong: unwritable or full disks, damaged checkpoints, bad learning rates,
leftovers of a kill (SIGINT and SIGTERM: test_train.py). Each failure is one line on stderr and leaves no half-written files."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_main
from test_train import cli_config, tiny_config, token_stream, write_shards

from nanogpt_mlx.checkpoint import checkpoints, damaged, latest_checkpoint
from nanogpt_mlx.config import TrainConfig, get_lr, resume_config
from nanogpt_mlx.errors import UserError
from nanogpt_mlx.files import HOST_TAG
from nanogpt_mlx.locks import LOCK_FILE
from nanogpt_mlx.train import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), [token_stream(3000, 1)], token_stream(2000, 3))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """A run of 4 steps with checkpoints at steps 2 and 4 (both kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(tiny_config(data_dir, out, max_steps=4, checkpoint_every=2)).train()
    assert [p.name for p in checkpoints(out)] == ["ckpt-000002", "ckpt-000004"]
    return out


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of finished_run to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def temporaries(run: Path) -> list[str]:
    """Hidden files and directories in OUT other than the run's lock: what a failed or killed write left."""
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE)


def resume(run: Path, max_steps: int = 6, **kw) -> subprocess.CompletedProcess:
    return run_cli("train", "--resume", str(run), "--max-steps", str(max_steps), **kw)


# ------------------------------------------------------------------------- min_lr (item 5)
def test_min_lr_is_build_nanogpts_absolute_minimum(data_dir, tmp_path):
    cfg = TrainConfig(max_lr=6e-4, min_lr=1e-5, warmup_steps=10, max_steps=50)
    assert get_lr(50, cfg) == get_lr(99, cfg) == 1e-5
    assert get_lr(30, cfg) == pytest.approx(1e-5 + 0.5 * (6e-4 - 1e-5))
    to_zero = TrainConfig(max_lr=6e-4, min_lr=0.0, warmup_steps=10, max_steps=50)  # 0 is a minimum, not "unset"
    assert get_lr(50, to_zero) == 0.0 and get_lr(30, to_zero) == pytest.approx(3e-4)

    out = tmp_path / "run"
    run_cli(*cli_config(data_dir, out, "--max-steps", "1", "--min-lr", "0.0001", "--sample-every", "0"), check=True)
    saved = json.loads((checkpoints(out)[-1] / "trainer.json").read_text())["config"]
    assert (saved["min_lr"], saved["min_lr_ratio"]) == (0.0001, 0.1)  # not taken as --min-lr-ratio 0.0001
    assert_one_line_error(run_cli(*cli_config(data_dir, tmp_path / "x", "--min-lr", "1e-4", "--min-lr-ratio", "0.1")),
                          "--min-lr", "not allowed with", status=2)
    resumed = run_cli("train", "--resume", str(out), "--max-steps", "2", "--min-lr-ratio", "0.5", check=True)
    assert resumed.returncode == 0
    saved = json.loads((checkpoints(out)[-1] / "trainer.json").read_text())["config"]
    assert (saved["min_lr"], saved["min_lr_ratio"]) == (None, 0.5)  # the new ratio decides, not the old min_lr


@pytest.mark.parametrize("flag, value", [("--max-lr", "nan"), ("--max-lr", "inf"), ("--min-lr", "nan"),
                                         ("--grad-clip", "inf")])
def test_learning_rates_must_be_finite(data_dir, tmp_path, flag, value):
    proc = run_cli(*cli_config(data_dir, tmp_path / "run", "--max-steps", "1", flag, value))
    assert_one_line_error(proc, flag[2:].replace("-", "_"), "finite")
    assert not (tmp_path / "run").exists()


def test_nan_loss_without_a_checkpoint_names_none(data_dir, tmp_path):
    proc = run_cli(*cli_config(data_dir, tmp_path / "run", "--max-steps", "3", "--max-lr", "1e30",
                               "--warmup-steps", "0", "--checkpoint-every", "0"))
    assert_one_line_error(proc, "not finite", "no checkpoint was written")
    assert checkpoints(tmp_path / "run") == []


def test_an_evaluation_whose_logits_overflow_stops_without_saving(data_dir, tmp_path, monkeypatch):
    """An evaluation of NaN logits (a diverged model whose train loss was still finite) is a NaN loss: the steps
    since the last checkpoint are not saved over it, as an evaluation that fails otherwise (a download) saves them."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=6, checkpoint_every=2, val_every=3))
    real = trainer.evaluations.val_loss

    def val_loss() -> float:
        if trainer.step == 3:
            raise trainer.model.overflowed("on batch 1 of 2")
        return real()

    monkeypatch.setattr(trainer.evaluations, "val_loss", val_loss)
    with pytest.raises(UserError, match=r"^step 3: the model's logits are NaN/inf on batch 1 of 2: its activations "
                                        r"overflow \(a diverged or damaged model\); stopped without saving \(the "
                                        r"previous checkpoint ckpt-000002 is kept; resume \(--resume .*run\) once "
                                        r"its cause is found\)$"):
        trainer.train()
    assert [p.name for p in checkpoints(out)] == ["ckpt-000002"]


# ------------------------------------------------------------- unwritable disks (item 7)
def test_new_run_where_a_file_is_in_the_way(data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run_cli(*cli_config(data_dir, tmp_path / "file" / "run", "--max-steps", "1")),
                          "file", "not a directory")


@pytest.mark.parametrize("mode", ["new", "overwrite", "resume"])
def test_train_on_a_read_only_disk(mode, data_dir, run, tmp_path, read_only, capsys):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    read_only(run.parent)
    args = {"new": cli_config(data_dir, tmp_path / "new", "--max-steps", "1"),
            "overwrite": cli_config(data_dir, run, "--max-steps", "1") + ["--overwrite"],
            "resume": ["train", "--resume", str(run), "--max-steps", "6"]}[mode]
    assert_one_line_error(run_main(capsys, *args), "Read-only file system")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists()


def test_overwrite_keeps_the_checkpoints_until_the_config_is_accepted(data_dir, run, capsys):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for flag, value, needle in [("--seq-len", "64", "seq_len 64"), ("--prompt", "Hello", "outside the model's vocab")]:
        args = cli_config(data_dir, run, "--max-steps", "1", flag, value, "--sample-every", "1") + ["--overwrite"]
        assert_one_line_error(run_main(capsys, *args), needle)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_overwrite_removes_the_old_runs_model_too(data_dir, run):
    """A new run that stops before its first checkpoint must not leave `sample --model OUT` the old run's model."""
    proc = run_cli(*cli_config(data_dir, run, "--max-steps", "3", "--max-lr", "1e30", "--warmup-steps", "0",
                               "--overwrite"))
    assert_one_line_error(proc, "not finite", "no checkpoint was written")
    assert not (run / "model.safetensors").exists() and not (run / "config.json").exists()
    assert_one_line_error(run_cli("sample", "--model", str(run)), "no config.json")


def test_a_new_run_does_not_replace_an_earlier_runs_logs_without_overwrite(data_dir, tmp_path):
    """A run that ended before its first checkpoint (the OOM killer at step 4000 of 5000) leaves only its logs: the
    same command again erased them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.txt").write_text("0 train 10.9\n1 train 10.7\n")
    assert_one_line_error(run_cli(*cli_config(data_dir, out, "--max-steps", "1")),
                          "already holds a run's log.txt (no checkpoint to resume)", "--overwrite")
    assert (out / "log.txt").read_text() == "0 train 10.9\n1 train 10.7\n"
    run_cli(*cli_config(data_dir, out, "--max-steps", "1", "--overwrite"), check=True)
    assert "0 train " in (out / "log.txt").read_text() and "10.9\n" not in (out / "log.txt").read_text()


def test_a_trainer_dropped_untrained_leaves_no_run_to_replace(data_dir, tmp_path):
    """A Trainer made and dropped in a notebook leaves its logs empty: a Trainer made again there is no new run
    replacing an earlier one's logs."""
    import gc

    cfg = tiny_config(data_dir, tmp_path / "run", max_steps=1)
    Trainer(cfg)
    gc.collect()  # (a Trainer sits in reference cycles) its hold on OUT given back
    assert [(tmp_path / "run" / f).read_text() for f in ("log.txt", "log.jsonl")] == ["", ""]
    Trainer(cfg).train()


def test_a_new_run_does_not_replace_a_model_without_overwrite(data_dir, tmp_path):
    """An export, or a finished run whose checkpoints were deleted: a new run's start removed its model."""
    from nanogpt_mlx.export import export_hf
    from nanogpt_mlx.weights import load_model

    out = tmp_path / "exported"
    Trainer(tiny_config(data_dir, tmp_path / "src", max_steps=1, vocab_size=50304)).train()  # GPT-2 tokenizer's rows
    export_hf(load_model(tmp_path / "src"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(run_cli(*cli_config(data_dir, out, "--max-steps", "1")), "already holds a model",
                          "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_kill_after_the_last_checkpoint_is_renamed_still_publishes_it(run):
    """OUT/model.safetensors (what `sample --model OUT` loads) kept the step before, and no resume repaired it."""
    before, latest = checkpoints(run)
    (run / "model.safetensors").unlink()
    shutil.copyfile(before / "model.safetensors", run / "model.safetensors")  # as a kill after the rename leaves it
    Trainer(resume_config(run), resume=True)  # published as the run resumes, not at its next save
    assert (run / "model.safetensors").read_bytes() == (latest / "model.safetensors").read_bytes()
    (run / "model.safetensors").unlink()
    shutil.copyfile(before / "model.safetensors", run / "model.safetensors")
    assert Trainer(resume_config(run), resume=True).save() == latest  # the step is saved already: it is published
    assert (run / "model.safetensors").read_bytes() == (latest / "model.safetensors").read_bytes()


def test_a_save_of_a_saved_step_keeps_the_resumed_runs_settings(run):
    """Resumed with a larger max_steps and saved before a step (Ctrl-C at once, train(until=its step)): the save
    found the step's checkpoint and wrote nothing, so the next resume went back to the old max_steps."""
    latest = checkpoints(run)[-1]
    weights = {p.name: p.read_bytes() for p in latest.iterdir() if p.suffix == ".safetensors"}
    trainer = Trainer(resume_config(run, max_steps=20, max_lr=1e-2), resume=True)
    assert trainer.save() == latest
    assert (resume_config(run).max_steps, resume_config(run).max_lr) == (20, 1e-2)
    assert {p.name: p.read_bytes() for p in latest.iterdir() if p.suffix == ".safetensors"} == weights
    inode = (latest / "trainer.json").stat().st_ino
    trainer.save()  # the same settings: nothing written (a write replaces the file)
    assert (latest / "trainer.json").stat().st_ino == inode


def test_suggested_commands_quote_a_path_with_a_space(data_dir, tmp_path, capsys):
    """"continue with --resume /x/my run" split at the space when pasted into a shell."""
    import shlex

    out = tmp_path / "my run"
    quoted = shlex.quote(str(out))
    assert quoted != str(out)
    proc = run_main(capsys, *cli_config(data_dir, out, "--max-steps", "2", "--val-every", "0",
                                        "--checkpoint-every", "1"))
    assert proc.returncode == 0 and f"(nanogpt-mlx sample --model {quoted})" in proc.stdout
    assert_one_line_error(run_main(capsys, *cli_config(data_dir, out, "--max-steps", "2")), f"--resume {quoted};")
    first, last = checkpoints(out)
    assert f"(mv {shlex.quote(str(last))} {shlex.quote(f'{last}.damaged')})" in str(damaged(last, "test"))


def test_a_run_resumed_on_another_device_keeps_its_dtype(data_dir, tmp_path):
    """A GPU's run (bfloat16, the cuda profile's default) resumed on this machine went on in this device's dtype
    (float32 on a CPU), and the resume note said nothing of it: the run's dtype is saved with it now."""
    out = tmp_path / "run"
    run_cli(*cli_config(data_dir, out, "--max-steps", "2"), env={"NANOGPT_MLX_PROFILE": "cuda"}, check=True)
    proc = run_cli("train", "--resume", str(out), "--max-steps", "3", check=True)  # this machine's own profile
    assert " bfloat16 | peak" in proc.stdout and "dtype" not in proc.stdout.split("changed since:")[1], proc.stdout
    proc = run_cli("train", "--resume", str(out), "--max-steps", "4", "--dtype", "float32", check=True)
    assert " float32 | peak" in proc.stdout and "dtype 'bfloat16' -> 'float32'" in proc.stdout


def test_a_bad_shard_reached_mid_run_saves_the_steps_before_it(data_dir, tmp_path):
    """Token ids are checked as each shard is loaded (reading all shards first would take minutes at FineWeb's
    size): the run stopped with nothing saved."""
    data = tmp_path / "data"
    bad = token_stream(3000, 2)
    bad[100] = 60000
    write_shards(data, [token_stream(3000, 1), bad], token_stream(2000, 3))
    out = tmp_path / "run"
    proc = run_cli(*cli_config(data, out, "--max-steps", "40", "--vocab-size", "1000", "--checkpoint-every", "0",
                               "--sample-every", "0", "--val-every", "0"))
    # shard 1 holds 23 batches of 4 x 32 tokens, 2 a step: steps 0..10 and the first batch of 11 read it
    assert_one_line_error(proc, "toy_train_000002.npy: token id 60000", "saved", "(step 11)", f"--resume {out}")
    assert [p.name for p in checkpoints(out)] == ["ckpt-000011"]
    state = json.loads((checkpoints(out)[0] / "trainer.json").read_text())["train_loader"]
    assert (state["shard"], state["step"]) == (0, 22)  # the start of step 11, which is trained again


def test_shards_gone_mid_run_save_the_steps_before_them(tmp_path):
    """Data moved away (or its disk gone) mid-run: the rewind to the step's start read the shard again, failed
    too, and the run ended without saving, its steps lost."""
    data = write_shards(tmp_path / "data", [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data, out, max_steps=40))
    trainer.train(until=5)
    data.rename(tmp_path / "moved")
    with pytest.raises(UserError, match=r"toy_train_000002.npy: cannot read shard .*saved .*\(step 11\)"):
        trainer.train()  # shard 1 holds 23 batches, 2 a step: steps 0..10 and the first batch of 11 read it
    assert [p.name for p in checkpoints(out)] == ["ckpt-000005", "ckpt-000011"]
    state = json.loads((checkpoints(out)[-1] / "trainer.json").read_text())["train_loader"]
    assert (state["shard"], state["step"]) == (0, 22)
    (tmp_path / "moved").rename(data)
    assert trainer.train(until=13) and trainer.step == 13  # whole: it goes on


def test_a_shard_replaced_mid_run_by_a_shorter_one_saves_the_steps_before_it(tmp_path):
    """A valid shard of another length gave every rank an IndexError traceback, nothing saved."""
    data = write_shards(tmp_path / "data", [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
    trainer = Trainer(tiny_config(data, tmp_path / "run", max_steps=40))
    trainer.train(until=5)
    np.save(data / "toy_train_000002.npy", token_stream(50, 2).astype(np.uint16))
    with pytest.raises(UserError, match=r"toy_train_000002.npy: 50 tokens, where this run counted 3000 .*\(step 11\)"):
        trainer.train()
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["ckpt-000005", "ckpt-000011"]


def test_ranks_agree_on_a_shard_one_of_them_cannot_read_before_the_steps_all_reduce(data_dir, tmp_path):
    """Hosts' copies of a shard may differ: a rank that could not read its batch stopped alone, and its barrier met
    the others' gradient all-reduce (it said 'saved', rank 0 died of a lost peer, nothing saved). The step's batches
    are read first now, and a failure is part of the ranks' agreement on stopping, before any collective of it."""
    from nanogpt_mlx import distributed

    calls: list[str] = []

    class TwoRanks(distributed.Dist):  # this rank 0 of 2; its peer's values mirror its own
        def sum(self, value: float, at_least: float = 0.0) -> float:
            calls.append(f"sum {value:g}")
            return 2 * value

        def all_sum(self, x):
            return 2 * x

        def average_gradients(self, grads):
            calls.append("all-reduce")
            return grads

        def sync(self, *arrays, at_least: float = 0.0) -> None:
            mx.eval(*arrays)

    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=4, total_batch_size=512, compile=False),
                      dist=TwoRanks(world=2))  # uncompiled: each step calls average_gradients (compiled, its trace)
    assert trainer.grad_accum == 2
    real, reads = trainer.train_loader.next_batch, 0

    def unreadable_in_step_2():
        nonlocal reads
        reads += 1
        if reads == 6:  # step 2's second batch
            raise UserError("toy_train_000001.npy: cannot read shard (gone)")
        return real()

    trainer.train_loader.next_batch = unreadable_in_step_2
    with pytest.raises(UserError, match="cannot read shard .*saved .*\\(step 2\\)"):
        trainer.train()
    agreements = [c for c in calls if c in ("sum 0", "sum 3", "all-reduce")]  # (not the losses' means)
    # train()'s start (OUT claimed by rank 0), each step's stop, then step 2 stops before its own all-reduce (a stop
    # for an error: 1 + the world size, which the other ranks learn from)
    assert agreements == ["sum 0", "sum 0", "all-reduce", "sum 0", "all-reduce", "sum 3"]


def test_a_relative_data_directory_outlives_a_chdir(data_dir, tmp_path, monkeypatch):
    """A notebook's os.chdir after making a Trainer of a relative data path stopped its next shard's read."""
    monkeypatch.chdir(data_dir.parent)
    trainer = Trainer(tiny_config(Path(data_dir.name), tmp_path / "run", max_steps=14, val_every=13))
    monkeypatch.chdir(tmp_path)
    assert trainer.train()["val_loss"] > 0  # past shard 1's 23 batches, and the val split


def test_a_resume_elsewhere_of_a_relative_data_directory_says_where_it_was(data_dir, tmp_path, monkeypatch):
    """The config saves --data as given: resumed from another directory, 'data directory not found' gave no clue."""
    monkeypatch.chdir(data_dir.parent)
    out = tmp_path / "run"
    Trainer(tiny_config(Path(data_dir.name), out, max_steps=2)).train()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"{data_dir.name}: no such data directory in {tmp_path}: the checkpoint's "
                                        "config names it relative to where the run started"):
        Trainer(resume_config(out, max_steps=3), resume=True)
    # a relative --data given with the resume is no checkpoint's: it was told to pass --data, which it had
    with pytest.raises(UserError, match="^elsewhere: data directory not found"):
        Trainer(resume_config(out, max_steps=3, data="elsewhere"), resume=True)
    assert Trainer(resume_config(out, max_steps=3, data=str(data_dir)), resume=True).train()


def test_a_resume_elsewhere_of_a_relative_hellaswag_file_says_where_it_was(data_dir, tmp_path, monkeypatch):
    """As for --data: a relative --hellaswag-data resumed from another directory said only 'file not found'."""
    from test_evaluate import make_hellaswag, write_jsonl

    write_jsonl(tmp_path / "hs.jsonl", make_hellaswag(4, ctx_words=(3, 10), ending_words=(1, 8)))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, vocab_size=50304, max_steps=2, hellaswag_every=2, hellaswag_data="hs.jsonl")
    Trainer(cfg).train()
    monkeypatch.chdir(data_dir)
    with pytest.raises(UserError, match=f"^hs.jsonl: no such HellaSwag file in {data_dir}: the checkpoint's config "
                                        "names it relative to where the run started; resume from there, or pass "
                                        "--hellaswag-data FILE \\(Python: resume_config\\(out, "
                                        "hellaswag_data=FILE\\)\\)$"):
        Trainer(resume_config(out, max_steps=3), resume=True)
    assert Trainer(resume_config(out, max_steps=3, hellaswag_data=str(tmp_path / "hs.jsonl")), resume=True).train()


def test_a_failed_evaluation_leaves_the_trainer_whole(data_dir, tmp_path, monkeypatch):
    """The weights are whole between steps: an evaluation's error (a download, a moved file) saves and ends train(),
    after which the Trainer refused to go on as if it had stopped amid a step."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=4, val_every=2))
    real = trainer.val_loss

    def gone_at_step_2() -> float:
        if trainer.step == 2:
            raise UserError("val gone")
        return real()

    monkeypatch.setattr(trainer, "val_loss", gone_at_step_2)
    with pytest.raises(UserError, match="val gone"):
        trainer.train()
    assert trainer.step == 2 and [p.name for p in checkpoints(tmp_path / "run")] == ["ckpt-000002"]
    monkeypatch.setattr(trainer, "val_loss", real)
    assert trainer.train()["val_loss"] > 0 and trainer.step == 4


def another_process_can_lock(out: Path) -> bool:
    code = ("import fcntl, sys; f = open(sys.argv[1], 'a+')\ntry: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except OSError: sys.exit(1)")
    return subprocess.run([sys.executable, "-c", code, str(out / LOCK_FILE)]).returncode == 0


def test_a_trainer_dropped_untrained_gives_out_back(run, monkeypatch):
    """A Trainer holds OUT from its start (another process is refused), but one made and dropped in a notebook held
    it until the kernel ended; of two made in turn (a cell run again), the first one collected while the second was
    starting gave the lock away under it, and the second, which had found it held, never gave it back."""
    import gc

    cfg = resume_config(run, max_steps=8)
    trainer = Trainer(cfg, resume=True)
    assert_one_line_error(resume(run), "being written by another run")
    del trainer
    gc.collect()
    resume(run, check=True)
    first = Trainer(cfg, resume=True)
    del first  # not yet collected: a Trainer sits in reference cycles
    started = Trainer._compute_state
    monkeypatch.setattr(Trainer, "_compute_state", lambda self: gc.collect() or started(self))
    second = Trainer(cfg, resume=True)  # the first is collected amid its start
    assert not another_process_can_lock(run)
    del second
    gc.collect()
    assert another_process_can_lock(run)


def test_python_callers_get_their_own_refusals(run, data_dir, tmp_path):
    with pytest.raises(UserError, match="resume=True continues OUT's run and overwrite=True replaces it"):
        Trainer(resume_config(run), resume=True, overwrite=True)
    with pytest.raises(UserError, match="no val batches: .* only when val_every is set"):
        Trainer(tiny_config(data_dir, tmp_path / "x")).val_loss()


def test_a_failed_resume_leaves_the_run_to_the_next_attempt(run):
    with pytest.raises(Exception, match="batch_size 4"):
        Trainer(resume_config(run, batch_size=2, max_steps=8), resume=True)  # refused: other batches
    resume(run, check=True)  # not "being written by another run": this process gave OUT back



def test_a_refused_trainer_leaves_the_lock_another_trainer_holds(run):
    """In one process (a notebook) a second Trainer on the same OUT, refused, released the first one's lock."""
    from nanogpt_mlx.locks import LOCK_FILE

    first = Trainer(resume_config(run, max_steps=8), resume=True)
    with pytest.raises(Exception, match="batch_size 4"):
        Trainer(resume_config(run, batch_size=2, max_steps=8), resume=True)
    assert_one_line_error(resume(run), "being written by another run")  # the first one's lock holds
    assert (run / LOCK_FILE).exists() and first.step == 4


@pytest.mark.parametrize("out, needle", [(None, "must be a str or path, got None"), ("", "is '' (an unset variable?)")])
def test_resume_config_of_no_directory_is_one_line(out, needle):
    """None was a TypeError in pathlib; '' read the working directory's checkpoints."""
    with pytest.raises(UserError, match=re.escape(f"the run directory {needle}")):
        resume_config(out)


def test_a_run_and_its_data_under_home_are_expanded(data_dir, tmp_path, monkeypatch):
    """Trainer's out `~/run` was written as ./~/run, and its data `~/data` was looked for in ./~/data."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(data_dir, home / "data")
    trainer = Trainer(tiny_config("~/data", "~/run", max_steps=2))
    trainer.train()
    assert trainer.out == home / "run" and [p.name for p in checkpoints(home / "run")] == ["ckpt-000002"]
    assert not (tmp_path / "~").exists()
    # the checkpoint keeps the paths as given, and a resume from it, elsewhere, reads the same data
    saved = json.loads((checkpoints(home / "run")[-1] / "trainer.json").read_text())["config"]
    assert (saved["data"], saved["out"]) == ("~/data", "~/run")
    monkeypatch.chdir(home)
    resumed = Trainer(resume_config("~/run", max_steps=3), resume=True)
    resumed.train()
    assert resumed.step == 3 and resumed.cfg.out == str(home / "run") and not (home / "~").exists()


def test_until_takes_numpy_integers(data_dir, tmp_path):
    """As the config's fields do: np.int64(2) (a sweep's np.arange) was refused."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=4))
    assert trainer.train(until=np.int64(2))["train_loss"] > 0 and type(trainer.step) is int and trainer.step == 2
    for bad in (np.float64(3), np.True_, True, np.int64(-1)):
        with pytest.raises(UserError, match="until must be a step number"):
            trainer.train(until=bad)


def test_until_past_max_steps_is_refused(data_dir, tmp_path):
    """train(until=9) with max_steps 4 trained to 4 and returned as if at 9."""
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", max_steps=4))
    with pytest.raises(UserError, match=r"until 9 is past max_steps 4, where the LR schedule ends: resume with a "
                                        r"larger one \(Trainer\(replace\(cfg, max_steps=N\), resume=True\)\)"):
        trainer.train(until=9)
    assert trainer.step == 0 and trainer.train(until=4) and trainer.step == 4


def test_resume_config_expands_a_run_under_home(finished_run, tmp_path, monkeypatch):
    """`~/run` looked for ./~/run's checkpoints; the config it returns names the run expanded."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished_run, home / "run")
    assert resume_config("~/run", max_steps=8) == replace(resume_config(home / "run"), max_steps=8)
    assert resume_config("~/run").out == str(home / "run") and not (tmp_path / "~").exists()


def test_train_resume_under_home_locks_the_run_before_reading_it(run, tmp_path, monkeypatch, capsys):
    """`--resume=~/run` (which a shell leaves as written) locked no run before resume_config read its checkpoint,
    which a live run may replace: checkpoints() looked in ./~/run."""
    import nanogpt_mlx.config
    from nanogpt_mlx import locks

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    shutil.move(run, home / "run")
    locked = []

    def read(out, **overrides):
        locked.append((home / "run").resolve() in locks._locked)
        raise UserError("read")

    monkeypatch.setattr(nanogpt_mlx.config, "resume_config", read)
    assert_one_line_error(run_main(capsys, "train", "--resume=~/run", "--max-steps", "6"), "read")
    assert locked == [True] and (home / "run").resolve() not in locks._locked  # unlocked on the refusal



    """TrainConfig(data=Path(...)) was refused ("must be a string") where every function takes a path."""
    from dataclasses import asdict

    paths = {"data": tmp_path / "d", "out": tmp_path / "o", "init_from": Path("m"), "hellaswag_data": Path("h.jsonl")}
    cfg = TrainConfig(**paths)
    assert asdict(cfg) == {**asdict(TrainConfig()), **{k: str(v) for k, v in paths.items()}}
    assert replace(cfg, out=Path("o2")).out == "o2" and json.dumps(asdict(cfg))
    for bad in (b"o", None, 3):
        with pytest.raises(UserError, match=re.escape(f"out must be a str or path, got {bad!r}")):
            TrainConfig(out=bad)


def test_resume_refuses_options_it_would_ignore(run):
    for flag in (["--preset", "gpt2-124m"], ["--overwrite"], ["--out", str(run)]):
        assert_one_line_error(run_cli("train", "--resume", str(run), *flag), "cannot be combined with it", flag[0])


def test_resume_config_takes_the_model_fields_defaults_as_the_checkpoints(run):
    """0 and '' are the model fields' defaults (the source's vocab, a random init): a resume keeps its model, so they
    mean the checkpoint's, not a change to refuse."""
    saved = resume_config(run)
    assert resume_config(run, vocab_size=0, init_from="", max_steps=8) == replace(saved, max_steps=8)
    run_cli("train", "--resume", str(run), "--max-steps", "5", "--vocab-size", "0", check=True)
    with pytest.raises(UserError, match="TrainConfig has no field bogus"):  # as TrainConfig.preset says it
        resume_config(run, bogus=2)


def test_directories_named_with_other_digits_are_no_checkpoints(run):
    """"ckpt-²" failed a resume with int()'s ValueError; "ckpt-١" was taken as step 1, and removed as an old one."""
    for name in ("ckpt-²", "ckpt-١"):
        (run / name).mkdir()
        (run / name / "keep.txt").write_text("mine")
    assert [p.name for p in checkpoints(run)] == ["ckpt-000002", "ckpt-000004"]
    resume(run, check=True)
    assert (run / "ckpt-²" / "keep.txt").exists() and (run / "ckpt-١" / "keep.txt").exists()


def test_a_checkpoint_from_a_newer_version_is_not_called_damaged(run):
    ckpt = checkpoints(run)[-1]
    state = json.loads((ckpt / "trainer.json").read_text())
    state["config"]["attn_window"] = 8
    (ckpt / "trainer.json").write_text(json.dumps(state))
    assert_one_line_error(resume(run), "config fields this version of nanogpt-mlx does not know: attn_window")
    assert "damaged" not in resume(run).stderr
    del state["config"]["attn_window"]
    state["config"]["recipe"] = "future"  # a value this version lacks: not damage either
    (ckpt / "trainer.json").write_text(json.dumps(state))
    assert_one_line_error(resume(run), "trainer.json: unknown recipe 'future'", "a newer version wrote it?")
    assert "damaged" not in resume(run).stderr


def test_an_out_that_mlx_cannot_open_is_refused_before_training(data_dir, tmp_path):
    """MLX takes only UTF-8 paths: a run into one that is not trained, then failed its checkpoint as a full disk."""
    import os

    out = tmp_path / os.fsdecode(b"r\xff")
    with pytest.raises(UserError, match="MLX can only open UTF-8 paths"):
        Trainer(tiny_config(data_dir, out, max_steps=1))
    assert not out.exists()


def test_max_memory_beyond_any_machine_is_one_line(data_dir, tmp_path):
    """MLX's limit is a size_t of bytes: 1e12 GB overflowed it with a TypeError."""
    for value in ("1e12", "1e300"):
        proc = run_cli(*cli_config(data_dir, tmp_path / "run", "--max-steps", "1", "--max-memory", value))
        assert_one_line_error(proc, "max_memory is in GB", "beyond any machine")


# -------------------------------------------------------------------- full disk (item 8)
def test_full_disk_at_a_checkpoint(run, monkeypatch, capsys):
    """MLX reports a full disk as RuntimeError "[write] Unable to write"; each try leaves nothing behind."""
    import mlx.core as mx

    real_save = mx.save_safetensors

    def full(path, arrays, metadata=None):
        Path(path).write_bytes(b"partial")
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(60 << 20, 60 << 20, 0))
        raise RuntimeError(f"[write] Unable to write 65536 bytes to file {path}.")

    monkeypatch.setattr(mx, "save_safetensors", full)
    proc = run_main(capsys, "train", "--resume", str(run), "--max-steps", "6", "--checkpoint-every", "2")
    # the file named where it would have been, not in the save's temporary directory (gone)
    assert_one_line_error(proc, f"ckpt-000006 not saved: {run}/ckpt-000006/model.safetensors: cannot write (No "
                          "space left on device)", "ckpt-000004 is kept", f"--resume {run}")
    assert temporaries(run) == []
    # the disk still full: the next try is refused before it trains (checkpoint.check_room)
    proc = run_main(capsys, "train", "--resume", str(run), "--max-steps", "6", "--checkpoint-every", "2")
    # (not "or choose another --out": --resume takes none)
    assert_one_line_error(proc, "0.00 MB free, and a checkpoint of this run takes", "make room (a resumed run saves "
                          "in its OUT)")
    assert temporaries(run) == []
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    assert [p.name for p in checkpoints(run)] == ["ckpt-000002", "ckpt-000004"]
    run_cli("train", "--resume", str(run), "--max-steps", "6", check=True)  # space freed: it continues
    assert [p.name for p in checkpoints(run)] == ["ckpt-000004", "ckpt-000006"]


def test_full_disk_after_a_checkpoint_says_it_was_saved(run, monkeypatch, capsys):
    """The checkpoint is written, OUT's model (what sample loads) is not: the line said only "cannot write"."""
    from nanogpt_mlx import checkpoint
    from nanogpt_mlx.errors import UserError

    def full(src, dst):
        raise UserError(f"{dst}: cannot write (No space left on device)")

    monkeypatch.setattr(checkpoint, "_link_or_copy", full)
    proc = run_main(capsys, "train", "--resume", str(run), "--max-steps", "6", "--checkpoint-every", "0")
    assert_one_line_error(proc, "ckpt-000006 saved, but", "model not updated", "No space left", f"--resume {run}")
    monkeypatch.undo()
    saved = (run / "ckpt-000006" / "model.safetensors").read_bytes()
    assert (run / "model.safetensors").read_bytes() != saved
    run_cli("train", "--resume", str(run), "--max-steps", "6", check=True)  # nothing to train: it publishes
    assert (run / "model.safetensors").read_bytes() == saved


# --------------------------------------------------------------- damaged checkpoints (item 9)
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_moment(path: Path, name: str) -> None:
    import mlx.core as mx

    arrays = mx.load(str(path))
    mx.save_safetensors(str(path), {k: v for k, v in arrays.items() if not k.endswith(name)})


DAMAGE = {
    "optimizer-truncated": (lambda c: truncate(c / "optimizer.safetensors"), "optimizer.safetensors"),
    "optimizer-incomplete": (lambda c: drop_moment(c / "optimizer.safetensors", ".h.0.attn.c_attn.weight.m"),
                             "optimizer.safetensors lacks states.0.h.0.attn.c_attn.weight.m"),
    "optimizer-missing": (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    "state-malformed": (lambda c: (c / "trainer.json").write_text('{"step": 4, "wor'), "trainer.json"),
    "state-missing": (lambda c: (c / "trainer.json").unlink(), "trainer.json is missing"),
    "state-incomplete": (lambda c: (c / "trainer.json").write_text('{"step": 4}'), "trainer.json lacks"),
    "model-truncated": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "optimizer-other-model": (lambda c: reshape_moment(c / "optimizer.safetensors", ".h.0.attn.c_attn.weight.v"),
                              "optimizer.safetensors: states.0.h.0.attn.c_attn.weight.v is mlx.core.float32 of shape (192, 16), the "
                              "model needs mlx.core.float32 of (96, 32)"),
    # resumed, its first update made NaN weights, saved as the run's model with the good checkpoints rotated away
    "optimizer-nan-moment": (lambda c: set_moment(c / "optimizer.safetensors", ".h.0.attn.c_attn.weight.m", math.nan),
                             "optimizer.safetensors: states.0.h.0.attn.c_attn.weight.m holds NaN/inf"),
    "optimizer-bool-moment": (lambda c: retype_moment(c / "optimizer.safetensors", ".h.0.attn.c_attn.weight.v"),
                              "weight.v is mlx.core.bool of shape (96, 32), the model needs mlx.core.float32"),  # trained on
    "state-step-negative": (lambda c: edit_state(c, step=-2), "trainer.json: step -2"),
    "state-world-zero": (lambda c: edit_state(c, world=0), "trainer.json: step 4, world 0"),
    # resumed at step 3, the save at step 4 kept this directory as it was, with the weights of step 4
    "state-step-not-its-own": (lambda c: edit_state(c, step=3), "trainer.json: step 3 in the checkpoint of step 4"),
    "state-step-bool": (lambda c: edit_state(c, step=True), "trainer.json lacks"),  # was taken for step 1
    "state-no-loader": (lambda c: drop_state_field(c, "train_loader"), "trainer.json lacks"),  # would be a KeyError
    "state-nested-deep": (lambda c: (c / "trainer.json").write_text("[" * 100_000 + "]" * 100_000),
                          "trainer.json: nested too deeply"),  # was a RecursionError's traceback
    "state-layout-text": (lambda c: edit_layout(c, "x"), "train_loader: not a layout of batches: x"),  # tracebacks
    "state-layout-shards": (lambda c: edit_layout(c, {"B": 4, "shards": [["x", "n"]]}), "not a layout of batches"),
    "state-position-beyond": (lambda c: edit_state(c, train_loader={"shard": 0, "step": 500, "epoch": 0}),
                              "train_loader: position at batch 500 of shard 0"),
    "state-position-at-end": (lambda c: edit_state(c, train_loader={"shard": 0, "step": 23, "epoch": 0}),
                              "train_loader: position at batch 23 of shard 0"),  # holds 0..22: an IndexError later
    "state-position-malformed": (lambda c: edit_state(c, train_loader={"shard": 0, "step": "3", "epoch": 0}),
                                 "train_loader: not a position"),
}


def retype_moment(path: Path, name: str) -> None:
    """A moment stored as bool: the resume trained on with it, inexactly, and said nothing."""
    import mlx.core as mx

    arrays = mx.load(str(path))
    key = next(k for k in arrays if k.endswith(name))
    arrays[key] = arrays[key] > 0
    mx.save_safetensors(str(path), arrays)


def set_moment(path: Path, name: str, value: float) -> None:
    import mlx.core as mx

    arrays = mx.load(str(path))
    key = next(k for k in arrays if k.endswith(name))
    arrays[key] = mx.full(arrays[key].shape, value, arrays[key].dtype)
    mx.save_safetensors(str(path), arrays)


def test_weights_an_update_made_nan_are_not_saved(run):
    """A finite state that updates to NaN (a negative second moment: a damaged file, or a bug) trained a step whose
    loss, computed before the update, was finite, then saved the NaN weights as the run's model (exit 0), rotating a
    good checkpoint away."""
    found = checkpoints(run)
    step = int(found[-1].name.removeprefix("ckpt-"))
    set_moment(found[-1] / "optimizer.safetensors", ".h.0.attn.c_attn.weight.v", -1.0)
    before = {p: p.read_bytes() for p in [run / "model.safetensors", *found[-1].iterdir()]}
    assert_one_line_error(resume(run, max_steps=step + 1), f"ckpt-{step + 1:06d} not saved: h.0.attn.c_attn.weight "
                          f"holds NaN/inf; the previous checkpoint {found[-1].name} is kept; resume (--resume {run}) "
                          "once its cause is found")
    assert checkpoints(run) == found
    assert {p: p.read_bytes() for p in before} == before and temporaries(run) == []


def reshape_moment(path: Path, name: str) -> None:
    """A moment of another model's shape (another run's optimizer file): it failed inside the first update."""
    import mlx.core as mx

    arrays = mx.load(str(path))
    key = next(k for k in arrays if k.endswith(name))
    arrays[key] = arrays[key].reshape(-1, 16)
    mx.save_safetensors(str(path), arrays)


def edit_layout(ckpt: Path, layout) -> None:
    state = json.loads((ckpt / "trainer.json").read_text())
    state["train_loader"]["layout"] = layout
    (ckpt / "trainer.json").write_text(json.dumps(state))


def drop_state_field(ckpt: Path, field: str) -> None:
    state = json.loads((ckpt / "trainer.json").read_text())
    del state[field]
    (ckpt / "trainer.json").write_text(json.dumps(state))


def edit_state(ckpt: Path, **changes) -> None:
    state = json.loads((ckpt / "trainer.json").read_text())
    loader = changes.pop("train_loader", None)
    if loader is not None:
        state["train_loader"] = {**loader, "layout": state["train_loader"]["layout"]}
    (ckpt / "trainer.json").write_text(json.dumps({**state, **changes}))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_offers_the_previous_one(damage, run):
    spoil, needle = DAMAGE[damage]
    latest = checkpoints(run)[-1]
    spoil(latest)
    assert_one_line_error(resume(run), str(latest), "damaged checkpoint", needle, "ckpt-000002 is kept",
                          f"mv {latest} {latest}.damaged")
    latest.rename(f"{latest}.damaged")  # as the message says
    proc = resume(run, check=True)
    assert "steps 2..6" in proc.stdout
    assert [p.name for p in checkpoints(run)] == ["ckpt-000004", "ckpt-000006"]


def test_damaged_only_checkpoint_says_there_is_none_before(run):
    shutil.rmtree(checkpoints(run)[0])
    (checkpoints(run)[-1] / "trainer.json").write_text("{")
    assert_one_line_error(resume(run), "damaged checkpoint", "no earlier checkpoint")


def test_checkpoints_sort_by_step_past_step_999999(data_dir, tmp_path):
    """ckpt-1000000 sorts before ckpt-999999 by name: the newest must be kept and resumed from, not pruned."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out))
    for step in (999_998, 999_999, 1_000_000):
        trainer.step = step
        trainer.save()
    assert [p.name for p in checkpoints(out)] == ["ckpt-999999", "ckpt-1000000"]
    assert latest_checkpoint(out).name == "ckpt-1000000"
    (out / "ckpt-1000000" / "trainer.json").write_text("{")
    assert "previous checkpoint ckpt-999999 is kept" in str(damaged(out / "ckpt-1000000", "torn"))


@pytest.mark.parametrize("torn_txt, torn_jsonl", [("4 tra", '{"step": 4, "kind": "tra'), ("1", '{"step": 1')])
def test_torn_last_log_line_is_tolerated(run, torn_txt, torn_jsonl):
    """A crash can tear the last line of the logs; resuming drops it instead of failing on it, and the lines of
    the step after the checkpoint (4), which the resumed run logs again. A torn line whose start reads as an earlier
    step ("1" of "12 train ...") is dropped too: kept, the next line joined onto it ("14 train ...")."""
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "train", "loss": 1.0}\n' + torn_jsonl)
    with open(run / "log.txt", "a") as f:
        f.write("4 train 1.000000\n" + torn_txt)
    resume(run, check=True)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(6))
    assert [line.split()[0] for line in (run / "log.txt").read_text().splitlines()] == [str(s) for s in range(6)]


# ------------------------------------------------------------- leftovers of a kill (item 13)
def test_leftovers_of_a_kill_are_removed(run):
    """kill -9 during the model link update leaves OUT/.model.tmpHOST-PID.safetensors; during a save, a temp dir."""
    (run / f".model.tmp{HOST_TAG}-99999.safetensors").write_bytes(b"\0" * (1 << 20))
    (run / f".ckpt-000006.tmp{HOST_TAG}-99999-0a1b2c3d").mkdir()
    (run / f".ckpt-000006.tmp{HOST_TAG}-99999-0a1b2c3d" / "model.safetensors").write_bytes(b"partial")
    resume(run, max_steps=4, check=True)  # nothing left to train: it only starts and stops
    assert temporaries(run) == []
    assert [p.name for p in checkpoints(run)] == ["ckpt-000002", "ckpt-000004"]


@pytest.mark.parametrize("error", [RuntimeError("[Compile::eval_cpu] Failed to compile"), OSError(28, "full")])
def test_an_evaluation_that_fails_mid_run_saves_the_steps_before_it(error, data_dir, tmp_path, capsys):
    """A validation whose kernel cannot compile (a full disk under MLX's kernel cache), or a HellaSwag download that
    fails: the run ended with every step since the last checkpoint lost. The weights are whole then (nothing is
    queued during an evaluation), so they are saved, and the run resumes from there."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=8, val_every=3, checkpoint_every=0))
    calls = []

    def failing_val_loss():
        calls.append(trainer.step)
        if len(calls) == 2:
            raise error
        return 5.0

    trainer.val_loss = failing_val_loss
    with pytest.raises(type(error)):
        trainer.train()
    assert calls == [0, 3] and [p.name for p in checkpoints(out)] == ["ckpt-000003"]
    assert f"evaluation failed: saved {out / 'ckpt-000003'} (step 3)" in capsys.readouterr().out
    assert Trainer(tiny_config(data_dir, out, max_steps=8, val_every=3), resume=True).step == 3
    trainer = Trainer(tiny_config(data_dir, tmp_path / "fresh", max_steps=8, val_every=3))
    trainer.val_loss = lambda: (_ for _ in ()).throw(error)  # at step 0: nothing to save
    with pytest.raises(type(error)):
        trainer.train()
    assert checkpoints(tmp_path / "fresh") == []


def test_a_disk_without_room_for_a_checkpoint_is_refused_at_start(data_dir, tmp_path, monkeypatch, capsys):
    """OUT on a disk too small for one checkpoint: the run trained until its first save, then lost every step. Room
    for one but not for the KEEP + 1 that a save holds: a warning. A resumed run has KEEP of them already; a run that
    overwrites another removes that run's first, which leaves their room."""
    import nanogpt_mlx.checkpoint as ckpt_mod
    from nanogpt_mlx.errors import UserError

    out, real = tmp_path / "run", shutil.disk_usage
    Trainer(tiny_config(data_dir, tmp_path / "done", max_steps=2, checkpoint_every=1)).train()
    size = sum(f.stat().st_size for f in checkpoints(tmp_path / "done")[-1].rglob("*") if f.is_file())

    def free(n: float):
        monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=int(n)))

    free(0.9 * size)
    with pytest.raises(UserError, match=r"run: \d+\.\d\d MB free, and a checkpoint of this run takes \d+\.\d\d MB.*; "
                                        "make room or choose another --out$"):
        Trainer(tiny_config(data_dir, out, max_steps=2))
    assert not out.exists()  # a refused run makes no OUT
    free(20_004_000)  # the two read "0.02 GB": as many decimals as tell them apart
    with pytest.raises(UserError) as refused:
        ckpt_mod.check_room(out, 20_004_001, fresh=True)
    has, takes = re.search(r"([\d.]+) MB free, .* takes ([\d.]+) MB", str(refused.value)).groups()
    assert float(has) < float(takes)
    capsys.readouterr()
    for n in (1.5, 2.5):  # room for 2 is not for the 3 that a save holds
        free(n * size)
        Trainer(tiny_config(data_dir, out, max_steps=2))
        assert "saving holds up to 3 checkpoints" in capsys.readouterr().err
    Trainer(tiny_config(data_dir, tmp_path / "done", max_steps=3), resume=True)  # 2 held already: room for 1 more
    assert "saving holds" not in capsys.readouterr().err
    free(0.9 * size)  # the 2 checkpoints that overwriting removes are room
    Trainer(tiny_config(data_dir, tmp_path / "done", max_steps=2), overwrite=True)


def test_a_checkpoint_given_for_its_run_names_the_run(run):
    """--resume OUT/ckpt-N said "no checkpoint to resume from (expected OUT/ckpt-N/ckpt-NNNNNN/)"."""
    with pytest.raises(UserError, match=re.escape(f"{run}/ckpt-000002 is a checkpoint of the run in {run}: resume the "
                                                  f"run (--resume {run}; ") + ".*which continues from its latest "
                                                  "checkpoint; to continue from this one, move the later ones away"):
        latest_checkpoint(run / "ckpt-000002")
    with pytest.raises(UserError, match="which continues from it$"):
        latest_checkpoint(run / "ckpt-000004")


def test_a_file_given_for_a_run_is_said_to_be_no_directory(run):
    """--resume OUT/log.txt said "no checkpoint to resume from (expected OUT/log.txt/ckpt-NNNNNN/)"."""
    with pytest.raises(UserError, match=f"^{re.escape(str(run / 'log.txt'))}: not a directory; resume a run's "):
        latest_checkpoint(run / "log.txt")
