"""Token shards as train, eval and prepare --inspect read them: broken shards are one line, unfinished data warns."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from test_train import VOCAB, cli_config, token_stream, write_shards

from nanogpt_mlx import UserError
from nanogpt_mlx.data import DataLoader, load_shard
from nanogpt_mlx.files import sha256_file


@pytest.mark.parametrize("command", ["train", "eval", "inspect"])
def test_empty_shard_is_one_line(command, tiny_hf_dir, tmp_path):
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    for shard in data.glob("*.npy"):
        shard.write_bytes(b"")  # what a full disk or a crash before the first write leaves
    args = {"train": cli_config(data, tmp_path / "run", "--max-steps", "1"),
            "eval": ["eval", "loss", "--model", str(tiny_hf_dir), "--data", str(data)],
            "inspect": ["prepare", "--inspect", str(data)]}[command]
    assert_one_line_error(run_cli(*args), "_000000.npy" if command != "train" else ".npy", "cannot read shard",
                          "empty or cut off")


def test_negative_token_ids_are_refused(tmp_path):
    train = token_stream(3000, 1).astype(np.int32)
    train[1234] = -5
    data = tmp_path / "d"
    data.mkdir()
    np.save(data / "toy_val_000000.npy", token_stream(2000, 2).astype(np.int32))
    np.save(data / "toy_train_000001.npy", train)
    with pytest.raises(UserError, match="toy_train_000001.npy: negative token id -5"):
        load_shard(data / "toy_train_000001.npy", vocab_size=VOCAB)
    assert_one_line_error(run_cli(*cli_config(data, tmp_path / "run", "--max-steps", "1")), "negative token id -5")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_token_id_of_vocab_size_is_refused(tmp_path):
    """Ids run from 0 to vocab_size - 1: vocab_size itself is past the embedding's last row."""
    shard = tmp_path / "toy_train_000001.npy"
    np.save(shard, np.array([0, VOCAB - 1, 5], dtype=np.uint16))
    assert load_shard(shard, vocab_size=VOCAB).max() == VOCAB - 1
    np.save(shard, np.array([0, VOCAB, 5], dtype=np.uint16))
    with pytest.raises(UserError, match=f"toy_train_000001.npy: token id {VOCAB} >= the model's vocab_size {VOCAB}"):
        load_shard(shard, vocab_size=VOCAB)


def test_a_token_id_past_int32_is_refused_without_a_vocab(tmp_path):
    """A DataLoader of no vocab_size (one's own loop) cut a uint32 shard's 2^31 to int32's -2^31."""
    np.save(tmp_path / "x_train_000000.npy", np.arange(1000, dtype=np.uint32) + 2**31 - 500)
    with pytest.raises(UserError, match=r"x_train_000000.npy: token id 2147484147 is past what a batch holds \(int32"):
        DataLoader(tmp_path, "train", 2, 8).next_batch()
    np.save(tmp_path / "x_train_000000.npy", np.arange(1000, dtype=np.int64) + 2**31 - 1000)
    assert DataLoader(tmp_path, "train", 2, 8).next_batch()[0].max().item() < 2**31  # (below it: taken)


def test_hidden_files_are_not_shards(tmp_path):
    """A hidden `._NAME_train_INDEX.npy` (what macOS writes beside a file on a foreign disk) is no shard."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    (data / "._toy_train_000001.npy").write_bytes(b"\0" * 4096)
    assert [p.name for p in DataLoader(data, "train", 4, 32).shards] == ["toy_train_000001.npy"]


@pytest.mark.parametrize("complete", [False, True, None])
def test_unfinished_data_is_used_with_a_warning(tmp_path, capsys, complete):
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    if complete is not None:  # None: shards without a manifest (made by build-nanogpt's fineweb.py)
        (data / "manifest.json").write_text(json.dumps({"format": "nanogpt-mlx-shards", "complete": complete}))
    DataLoader(data, "train", 4, 32)
    DataLoader(data, "val", 4, 32)
    err = capsys.readouterr().err
    if complete is False:
        assert err.count("warning") == 1 and "has not finished" in err and "re-run the same prepare" in err
    else:
        assert err == ""


def test_shards_shorter_than_a_batch_are_skipped_at_start(tmp_path, capsys):
    """prepare's last shard can be shorter than one batch: skipped with a warning when the loader starts, not
    an error when a run reaches it; no shard long enough is one line."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1), token_stream(129, 2), token_stream(50, 3)],
                        token_stream(2000, 4))  # shard 2 is exactly one batch
    loader = DataLoader(data, "train", 4, 32)
    assert [p.name for p in loader.shards] == ["toy_train_000001.npy", "toy_train_000002.npy"]
    err = capsys.readouterr().err
    assert "skipping 1 train shard(s) shorter than one batch of B*T*ranks+1 = 129 tokens" in err
    assert "toy_train_000003.npy (50 tokens)" in err
    batches = [loader.next_batch()[0] for _ in range(30)]  # 23 batches in shard 1, 1 in shard 2, then shard 1
    np.testing.assert_array_equal(batches[24], batches[0])
    # all 3 named, with no " ..." (that says there are more)
    with pytest.raises(UserError, match=r"no train shard holds one batch: 3 train shard\(s\) shorter than one "
                                        r"batch of B\*T\*ranks\+1 = 3201 tokens: toy_train_000001.npy \(3000 "
                                        r"tokens\), toy_train_000002.npy \(129 tokens\), toy_train_000003.npy "
                                        r"\(50 tokens\); one of B\*T\*ranks <= 2999 tokens fits \(a smaller batch "
                                        r"size or sequence length\)$"):
        DataLoader(data, "train", 4, 800)
    with pytest.raises(UserError, match=r"toy_train_000001.npy \(1 tokens\)$"):  # no batch fits one token
        DataLoader(write_shards(tmp_path / "e", [token_stream(1, 1)], token_stream(2000, 4)), "train", 1, 1)


@pytest.mark.parametrize("change, needle", [
    ({"B": 2}, "batch_size 4 (this run: 2)"),
    ({"T": 16}, "seq_len 32 (this run: 16)"),
    ({"shuffle": True}, "batches: shuffle False (this run: True); resume"),  # no seed: it orders only a shuffle
    ({"data": "other"}, "data of 2 shard(s) of 6,000 tokens (this run: 1 shard(s) of 3,000 tokens)"),
])
def test_a_saved_position_is_refused_by_a_loader_reading_other_batches(change, needle, tmp_path):
    """A position counts batches of B*T*ranks in the shards as they were: read with others it would crash or
    silently re-read or skip data."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
    write_shards(tmp_path / "other", [token_stream(3000, 1)], token_stream(2000, 3))
    loader = DataLoader(data, "train", 4, 32)
    for _ in range(30):
        loader.next_batch()
    saved = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    kw = {"B": 4, "T": 32, "shuffle": False, **change}
    other = DataLoader(tmp_path / kw.pop("data", "d"), "train", kw["B"], kw["T"], shuffle=kw["shuffle"])
    with pytest.raises(UserError, match=re.escape(needle)):
        other.load_state_dict(saved)


def test_a_saved_position_follows_its_shards_to_another_directory(tmp_path):
    data = write_shards(tmp_path / "d", [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
    loader = DataLoader(data, "train", 4, 32, shuffle=True, seed=5)
    for _ in range(30):
        loader.next_batch()
    saved = json.loads(json.dumps(loader.state_dict()))
    moved = DataLoader(shutil.copytree(data, tmp_path / "moved"), "train", 4, 32, shuffle=True, seed=5)
    moved.load_state_dict(saved)
    np.testing.assert_array_equal(moved.next_batch()[0], loader.next_batch()[0])
    del saved["layout"]  # a checkpoint from before the layout was saved: taken as it is
    moved.load_state_dict(saved)


def test_an_unshuffled_position_is_taken_whatever_the_seed(tmp_path):
    """A seed orders only a shuffle: without one, a position saved with seed 0 is read with seed 5."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
    loader = DataLoader(data, "train", 4, 32, seed=0)
    for _ in range(30):
        loader.next_batch()
    other = DataLoader(data, "train", 4, 32, seed=5)
    other.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    np.testing.assert_array_equal(other.next_batch()[0], loader.next_batch()[0])


def test_a_saved_position_is_refused_by_shards_of_other_content(tmp_path):
    """A dataset prepared again (shuffled with another seed) has shards of the same names and lengths: the sha256
    that its manifest records tells them apart."""
    def dataset(name: str, seed: int) -> Path:
        data = write_shards(tmp_path / name, [token_stream(3000, seed), token_stream(3000, seed + 1)],
                            token_stream(2000, 3))
        shards = [{"file": p.name, "split": p.name.split("_")[1], "tokens": len(np.load(p)), "sha256": sha256_file(p)}
                  for p in sorted(data.glob("*.npy"))]
        (data / "manifest.json").write_text(json.dumps({"format": "nanogpt-mlx-shards", "complete": True,
                                                        "shards": shards}))
        return data

    data, again = dataset("d", 1), dataset("again", 5)
    loader = DataLoader(data, "train", 4, 32)
    for _ in range(30):
        loader.next_batch()
    saved = json.loads(json.dumps(loader.state_dict()))
    with pytest.raises(UserError, match=r"data of other content: toy_train_000001.npy, toy_train_000002.npy "
                                        r"\(sha256 in manifest.json; prepared again\?\)"):
        DataLoader(again, "train", 4, 32).load_state_dict(saved)
    moved = DataLoader(shutil.copytree(data, tmp_path / "moved"), "train", 4, 32)
    moved.load_state_dict(saved)  # the same shards elsewhere
    np.testing.assert_array_equal(moved.next_batch()[0], loader.next_batch()[0])
    (again / "manifest.json").unlink()  # shards from elsewhere: what they hold is not known
    DataLoader(again, "train", 4, 32).load_state_dict(saved)


def test_shuffle_permutes_each_shards_windows_anew_each_epoch(tmp_path):
    """--shuffle reads a shard's B x T windows in a permutation drawn from (seed, epoch, shard): every window once
    a pass, another order each epoch, the same order for the same seed."""
    windows, BT = 10, 4 * 32
    data = write_shards(tmp_path / "d", [np.arange(windows * BT + 1)], token_stream(2000, 3))

    def starts(seed: int, shuffle: bool = True) -> list[list[int]]:
        loader = DataLoader(data, "train", 4, 32, shuffle=shuffle, seed=seed)
        return [[int(loader.next_batch()[0][0, 0]) // BT for _ in range(windows)] for _epoch in range(2)]

    assert starts(5, shuffle=False) == [list(range(windows))] * 2
    epochs = starts(5)
    assert epochs == [np.random.default_rng([5, epoch, 0]).permutation(windows).tolist() for epoch in (0, 1)]
    assert sorted(epochs[0]) == list(range(windows)) and epochs[0] != list(range(windows)) and epochs[0] != epochs[1]
    assert starts(5) == epochs and starts(6) != epochs


def test_each_shard_is_checked_once(tmp_path, monkeypatch):
    """Reading all of a shard for its largest token id at each validation's reset cost a pass over the val shard."""
    import nanogpt_mlx.data as data

    checked = []
    monkeypatch.setattr(data, "load_shard", lambda path, vocab_size=None: checked.append(path.name)
                        or data.open_shard(path))
    loader = DataLoader(write_shards(tmp_path / "d", [token_stream(600, 1), token_stream(600, 2)],
                                     token_stream(500, 0)), "train", 2, 32, vocab_size=VOCAB)
    for _ in range(3):
        loader.reset()
        for _ in range(2 * loader.within_one_pass(10**6)):  # two passes over both shards
            loader.next_batch()
    assert sorted(checked) == ["toy_train_000001.npy", "toy_train_000002.npy"]


def test_a_file_for_the_data_directory_is_named_as_such(tmp_path):
    (tmp_path / "input.txt").write_text("text")
    with pytest.raises(UserError, match="input.txt: a file, not a directory of token shards"):
        DataLoader(tmp_path / "input.txt", "train", 1, 8)


def test_a_zip_or_timedelta_shard_is_one_line(tmp_path):
    """An .npz archive under a shard's name was an AttributeError traceback; timedelta64 passed as integers."""
    from nanogpt_mlx.data import open_shard

    np.savez(tmp_path / "a.npz", x=np.arange(10, dtype=np.uint16))
    (tmp_path / "a.npz").rename(tmp_path / "x_val_000000.npy")
    with pytest.raises(UserError, match=r"not a \.npy array \(an \.npz archive\?\)"):
        open_shard(tmp_path / "x_val_000000.npy")
    np.save(tmp_path / "t.npy", np.arange(10).astype("timedelta64[s]"))
    with pytest.raises(UserError, match="expected a 1-D integer array, got timedelta64"):
        open_shard(tmp_path / "t.npy")


@pytest.mark.parametrize("B, T, rank, world, needle", [
    (2, 32, 2, 2, "rank 2 of world 2: expected 0 <= rank < world"),  # read rank 0's batches
    (2, 32, -1, 2, "rank -1 of world 2"),
    (2, 32, 0, 0, "rank 0 of world 0"),  # ZeroDivisionError
    (0, 32, 0, 1, "B must be >= 1, got 0"),  # ZeroDivisionError
    (2, -1, 0, 1, "T must be >= 1, got -1"),  # IndexError
    (2.5, 32, 0, 1, "B must be an integer, got 2.5"),  # TypeError
    (2, "32", 0, 1, "T must be an integer, got '32'"),
    (2, 32, True, 2, "rank must be an integer, got True"),
])
def test_a_batch_shape_that_cannot_be_read_is_refused(B, T, rank, world, needle, tmp_path):
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    with pytest.raises(UserError, match=re.escape(needle)):
        DataLoader(data, "train", B, T, rank, world)


def test_a_split_is_a_name_and_the_data_directory_is_named(tmp_path, monkeypatch):
    """A split of '*' read the val and train shards as one; '' for the directory read the working directory's."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    for split in ("*", "[tv]*", "", "val_0"):
        with pytest.raises(UserError, match="split must be a name such as val or train"):
            DataLoader(data, split, 2, 32)
    monkeypatch.chdir(data)
    with pytest.raises(UserError, match="the data directory is '' .* name a directory"):
        DataLoader("", "train", 2, 32)


@pytest.mark.parametrize("bad", [{"B": 2.5}, {"T": 16.0}, {"batches": 2.5}, {"batches": True}])
def test_eval_loss_refuses_counts_that_are_not_integers(bad, tmp_path):
    """They were TypeErrors (a float B or T deep in the loader, batches in range())."""
    from nanogpt_mlx import GPT, GPTConfig
    from nanogpt_mlx.evaluate import eval_loss

    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    model = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=1, n_head=1, n_embd=16))
    name = next(iter(bad))
    with pytest.raises(UserError, match=rf"{name} must be an integer, got {bad[name]!r}"):
        eval_loss(model, data, **{"batches": 2, "B": 2, "T": 16, **bad}, progress=False)


def test_a_headerless_shard_is_named_as_such(tmp_path):
    """Raw tokens (tofile) under a .npy name gave NumPy's advice about pickled data and allow_pickle."""
    from nanogpt_mlx.data import open_shard

    np.arange(100, dtype=np.uint16).tofile(tmp_path / "x_val_000000.npy")
    with pytest.raises(UserError, match=r"x_val_000000.npy: cannot read shard \(not a NumPy .npy file: no .npy "
                                        r"header; raw tokens\? save them with np.save\)$"):
        open_shard(tmp_path / "x_val_000000.npy")


def test_a_shard_of_a_damaged_header_or_a_fifo_is_one_line(tmp_path):
    """NumPy parses a .npy header's dict as Python: a damaged one raised tokenize's TokenError, a traceback. A FIFO
    named like a shard waited forever for a writer."""
    from nanogpt_mlx.data import open_shard

    np.save(tmp_path / "x_val_000000.npy", np.arange(100, dtype=np.uint16))
    data = bytearray((tmp_path / "x_val_000000.npy").read_bytes())
    data[data.index(b"}")] = ord(" ")  # an unclosed dict
    (tmp_path / "x_val_000000.npy").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"x_val_000000.npy: cannot read shard \(a damaged .npy header\)$"):
        open_shard(tmp_path / "x_val_000000.npy")
    os.mkfifo(tmp_path / "x_val_000001.npy")
    with pytest.raises(UserError, match=r"x_val_000001.npy: cannot read shard \(not a regular file\)$"):
        open_shard(tmp_path / "x_val_000001.npy")


@pytest.mark.parametrize("header, after", [("'<u2'", "'|u1'"), ("'<u2'", "'<u4'"), ("(100,)", "(99,) ")])
def test_a_header_that_does_not_fit_its_data_is_refused(tmp_path, header, after):
    """A shard whose header said uint8 for its uint16 tokens (or a shorter length) read the first half of its bytes
    as tokens and trained on them; a wider one was NumPy's "mmap length is greater than file size"."""
    from nanogpt_mlx.data import open_shard

    path = tmp_path / "x_val_000000.npy"
    np.save(path, np.arange(100, dtype=np.uint16))
    data = path.read_bytes()
    assert len(header) == len(after) and data.count(header.encode()) == 1
    path.write_bytes(data.replace(header.encode(), after.encode()))
    said = "its .npy header says" if after != "'<u4'" else "cut off, or a damaged .npy header: it says more"
    with pytest.raises(UserError, match=rf"x_val_000000.npy: cannot read shard \({said} "):
        open_shard(path)
    np.save(path, np.arange(100, dtype=np.uint16))
    assert len(open_shard(path)) == 100
    with open(path, "ab") as f:  # a second array after the first
        np.save(f, np.arange(3, dtype=np.uint16))
    with pytest.raises(UserError, match=r"x_val_000000.npy: cannot read shard \(its .npy header says uint16 \(100,\), "
                                        r"200 bytes, but 334 bytes follow it: a damaged header, or a file written to "
                                        r"after its array\)$"):
        open_shard(path)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_rank_reads_build_nanogpts_windows(world, tmp_path):
    """build-nanogpt's DataLoaderLite, written out: rank r's k-th batch of a shard is the window at
    B*T*(k*world + r), and a shard holds (n - 1) // (B*T*world) global batches (rank 0's count, which DataLoader
    gives every rank; a window needs the token after it as its last target, so a shard of exactly m*B*T*world
    tokens holds m - 1), then the next shard, wrapping."""
    B, T = 2, 8
    BTW = B * T * world
    lengths = [3 * BTW, 3 * BTW + 1, 2 * BTW + 5]  # an exact multiple, one token more, a remainder
    shards = [np.arange(n) + 1000 * i for i, n in enumerate(lengths)]
    data = write_shards(tmp_path / "d", shards, token_stream(2000, 3), name="t")
    for rank in range(world):
        expected = [s[B * T * (k * world + rank):][:B * T + 1] for s in shards for k in range((len(s) - 1) // BTW)]
        assert len(expected) == 2 + 3 + 2
        loader = DataLoader(data, "train", B, T, rank, world, vocab_size=4000)
        for window in expected + expected[:2]:  # one pass, then the first shard again
            x, y = loader.next_batch()
            np.testing.assert_array_equal(x.reshape(-1), window[:-1])
            np.testing.assert_array_equal(y.reshape(-1), window[1:])


def test_shuffle_draws_each_shards_order_from_its_own_seed(tmp_path):
    """Two shards of the same length are read in different orders: the permutation is drawn from (seed, epoch,
    shard), not the same for every shard."""
    windows, BT = 10, 4 * 32
    data = write_shards(tmp_path / "d", [np.arange(windows * BT + 1), np.arange(windows * BT + 1) + 2000],
                        token_stream(2000, 3))
    loader = DataLoader(data, "train", 4, 32, shuffle=True, seed=5)
    starts = [[(int(loader.next_batch()[0][0, 0]) - 2000 * shard) // BT for _ in range(windows)] for shard in (0, 1)]
    assert starts == [np.random.default_rng([5, 0, shard]).permutation(windows).tolist() for shard in (0, 1)]
    assert starts[0] != starts[1]


def test_a_saved_position_in_a_later_epoch_resumes_its_shuffle(tmp_path):
    """A position past the first pass continues that epoch's order: the epoch is restored with the shard and step
    (a loader back in epoch 0 would read the first pass's permutation again)."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
    loader = DataLoader(data, "train", 4, 32, shuffle=True, seed=5)
    one_pass = loader.within_one_pass(10**6)
    for _ in range(one_pass + 5):
        loader.next_batch()
    saved = json.loads(json.dumps(loader.state_dict()))
    assert saved["epoch"] == 1
    resumed = DataLoader(data, "train", 4, 32, shuffle=True, seed=5)
    resumed.load_state_dict(saved)
    for _ in range(one_pass):
        np.testing.assert_array_equal(resumed.next_batch()[0], loader.next_batch()[0])
    assert resumed.state_dict() == loader.state_dict()


def test_numpy_integers_make_a_position_json_can_save(tmp_path):
    """check_int takes NumPy's integers: kept as such, they made a loader whose position a checkpoint cannot write."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    loader = DataLoader(data, "train", np.int64(4), np.int64(32), rank=np.int64(0), world=np.int64(1))
    assert json.loads(json.dumps(loader.state_dict())) == DataLoader(data, "train", 4, 32).state_dict()


@pytest.mark.parametrize("bad, needle", [
    ({"shuffle": "no"}, "shuffle must be True or False, got 'no'"),  # shuffled
    ({"shuffle": 1}, "shuffle must be True or False, got 1"),
    ({"shuffle": True, "seed": -1}, "seed must be an integer in [0, 2^64), got -1"),  # NumPy's ValueError
    ({"shuffle": True, "seed": 1.5}, "seed must be an integer in [0, 2^64), got 1.5"),  # a TypeError
    ({"vocab_size": "512"}, "vocab_size must be an integer, got '512'"),  # a TypeError deep inside
    ({"vocab_size": 0}, "vocab_size must be >= 1, got 0"),
])
def test_a_loader_refuses_a_bad_shuffle_seed_or_vocab_size(bad, needle, tmp_path):
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    with pytest.raises(UserError, match=re.escape(needle)):
        DataLoader(data, "train", 4, 32, **bad)


def test_a_loader_takes_numpy_integers_for_seed_and_vocab_size(tmp_path):
    """As the config's fields do; kept as Python's, so that the layout a checkpoint saves goes into JSON."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    loader = DataLoader(data, "train", 4, 32, vocab_size=np.int64(VOCAB), shuffle=True, seed=np.uint64(7))
    plain = DataLoader(data, "train", 4, 32, vocab_size=VOCAB, shuffle=True, seed=7)
    assert json.loads(json.dumps(loader.state_dict())) == plain.state_dict()
    np.testing.assert_array_equal(loader.next_batch()[0], plain.next_batch()[0])


def test_a_loader_takes_a_numpy_bool_for_shuffle(tmp_path):
    """check_bool refused np.True_ (a comparison's); kept as NumPy's, it would make a layout JSON cannot write."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1)], token_stream(2000, 2))
    loader = DataLoader(data, "train", 4, 32, shuffle=np.True_, seed=7)
    plain = DataLoader(data, "train", 4, 32, shuffle=True, seed=7)
    assert json.loads(json.dumps(loader.state_dict())) == plain.state_dict()


def test_a_data_directory_under_home_is_expanded(tmp_path, monkeypatch):
    """`~/data` was read as ./~/data, for the loader and for eval_loss (a UserError: no such directory)."""
    from nanogpt_mlx import GPT, GPTConfig
    from nanogpt_mlx.evaluate import eval_loss

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    write_shards(tmp_path / "home" / "data", [token_stream(3000, 1)], token_stream(2000, 2))
    loader = DataLoader("~/data", "train", 4, 32)
    assert loader.shards == [tmp_path / "home" / "data" / "toy_train_000001.npy"]
    model = GPT(GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=1, n_head=1, n_embd=16))
    assert np.isfinite(eval_loss(model, "~/data", batches=2, B=2, T=16, progress=False))
    assert not (tmp_path / "~").exists()


def test_a_shard_rewritten_while_read_is_checked_again(tmp_path):
    """Token ids were checked once per shard: rewritten in place with ids past the vocab, a shard read again (the next
    epoch, a validation's reset) trained on out-of-bounds gathers; and one of another length gave an IndexError."""
    data = write_shards(tmp_path / "d", [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
    loader = DataLoader(data, "train", 4, 32, vocab_size=VOCAB)
    for _ in range(46):  # 23 batches a shard: the loader holds the second now
        loader.next_batch()
    bad = np.load(data / "toy_train_000001.npy")
    bad[7] = VOCAB + 5
    np.save(data / "toy_train_000001.npy", bad)
    with pytest.raises(UserError, match=f"toy_train_000001.npy: token id {VOCAB + 5} >= the model's vocab_size"):
        loader.reset()
    np.save(data / "toy_train_000001.npy", token_stream(2000, 1))
    with pytest.raises(UserError, match=r"toy_train_000001.npy: 2000 tokens, where this run counted 3000 \(replaced"):
        loader.reset()
    np.save(data / "toy_train_000001.npy", token_stream(3000, 1))
    loader.reset()  # as it was: read again


def test_a_shard_cut_short_while_read_stops_the_loader_at_that_batch(tmp_path):
    """A train shard truncated in place mid-run: its memory map read zeros past the new end (a run trained on them and
    saved them into a checkpoint), then SIGBUS. Replaced by a rename, the shard loaded is read on as it was."""
    def loader(where: Path) -> DataLoader:
        data = write_shards(where, [token_stream(3000, 1), token_stream(3000, 2)], token_stream(2000, 3))
        return DataLoader(data, "train", 4, 32, vocab_size=VOCAB)

    cut, replaced, untouched = loader(tmp_path / "a"), loader(tmp_path / "b"), loader(tmp_path / "c")
    for _ in range(3):
        cut.next_batch()
    position = cut.state_dict()
    os.truncate(cut.shards[0], 1000)
    with pytest.raises(UserError, match=rf"{cut.shards[0].name}: written to while this run read it \(\d+ bytes then, "
                                        r"1000 now\)"):
        cut.next_batch()
    assert cut.state_dict() == position

    replaced.next_batch()
    untouched.next_batch()
    np.save(tmp_path / "other.npy", token_stream(3000, 9))
    os.replace(tmp_path / "other.npy", replaced.shards[0])
    for _ in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(replaced.next_batch(), untouched.next_batch()))
