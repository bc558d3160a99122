"""Token shards as train, eval and prepare --inspect read them: broken shards are one line, unfinished data warns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from test_train import VOCAB, cli_config, token_stream, write_shards

from nanogpt_mlx import UserError
from nanogpt_mlx.data import DataLoader, load_shard


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
