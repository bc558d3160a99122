"""Dataset preparation: shards, determinism across workers, resume, sources, errors (all offline)."""

from __future__ import annotations

import errno
import functools
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, run_cli

from nanogpt_mlx import prepare as prep
from nanogpt_mlx import shards, sources
from nanogpt_mlx.files import HOST_TAG, sha256_file
from nanogpt_mlx.locks import LOCK_FILE
from nanogpt_mlx.data import list_shards, load_shard
from nanogpt_mlx.errors import UserError
from nanogpt_mlx.tokenizer import EOT, get_tokenizer

EOT_TEXT = "<|endoftext|>"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "Hello", "world", "naïve", "café", "日本語", "🙂", "42", "3.14",
         "don't", "it's", "  ", "\n", "\n\n", "\t", ",", ".", "!", "--"]


def make_docs(n: int, seed: int = 0, words: int = 40) -> list[str]:
    """Varied documents: unicode, digits, contractions, runs of spaces and newlines at any position."""
    rng = np.random.default_rng(seed)
    return ["".join(WORDS[i] + (" " if rng.random() < 0.7 else "")
                    for i in rng.integers(0, len(WORDS), rng.integers(1, words))) + f" doc{k}"
            for k in range(n)]


def expected_tokens(docs: list[str]) -> np.ndarray:
    enc = get_tokenizer()
    return np.array([t for d in docs for t in (EOT, *enc.encode_ordinary(d))], dtype=np.uint16)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 10, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(docs))), field: docs, "score": [1.5] * len(docs)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def shard_tokens(out: Path) -> np.ndarray:
    """All tokens in manifest order (val first)."""
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])


def dir_bytes(out: Path) -> dict[str, bytes]:
    """The files prepare wrote (not its lock, which names the process that held it)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != LOCK_FILE}


def cfg(**kw) -> prep.PrepareConfig:
    return prep.PrepareConfig(**{"workers": 1, "shard_size": 500, "part_bytes": 512, "progress": False, **kw})


@pytest.fixture
def mixed(tmp_path) -> tuple[list[Path], list[str]]:
    """A jsonl (several parts), a parquet (several row groups) and a directory of txt files."""
    docs = make_docs(120)
    docs[7] = f"a document that mentions {EOT_TEXT} as plain text"
    (tmp_path / "in").mkdir()
    jsonl = write_jsonl(tmp_path / "in" / "a.jsonl", docs[:80])
    parquet = write_parquet(tmp_path / "in" / "b.parquet", docs[80:110])
    txt_dir = tmp_path / "in" / "c"
    txt_dir.mkdir()
    for i, d in enumerate(docs[110:]):
        (txt_dir / f"{i:02d}.txt").write_text(d)
    return [jsonl, parquet, txt_dir], docs


# --------------------------------------------------------------------------------- tokenizing
def test_encode_docs_equals_encode_ordinary_per_document():
    docs = make_docs(200, seed=1) + ["trailing space ", " leading", "\n\nnewlines\n\n", "x" * 5000]
    assert np.array_equal(prep.encode_docs(docs), expected_tokens(docs))
    with_eot_text = docs[:5] + [f"x{EOT_TEXT}y", EOT_TEXT]  # the EOT string as text is not EOT
    assert np.array_equal(prep.encode_docs(with_eot_text), expected_tokens(with_eot_text))
    assert prep.encode_docs([]).dtype == np.uint16
    halves = ["half an emoji \ud83d", "\udc80 low", "a pair \ud83d\ude42 whole", "plain"]  # JSON's lone escapes
    assert np.array_equal(prep.encode_docs(halves), expected_tokens(halves))


def test_round_trip_jsonl_parquet_txt(tmp_path, mixed):
    paths, docs = mixed
    with open(paths[0], "a") as f:  # nulls are skipped, as --help says
        f.write('{"id": 80, "text": null}\n')
    write_parquet(paths[1], docs[80:95] + [None] + docs[95:110])
    out = tmp_path / "out"
    summary = prep.prepare(sources.local_files(paths), out, cfg())
    tokens = shard_tokens(out)
    assert np.array_equal(tokens, expected_tokens(docs))
    assert get_tokenizer().decode(tokens.tolist()) == "".join(EOT_TEXT + d for d in docs)

    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == ["data_val_000000.npy"] + [f"data_train_{i:06d}.npy"
                                                                      for i in range(1, len(shards))]
    assert all(s["tokens"] == 500 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 500
    assert sum(s["documents"] for s in shards) == len(docs) == manifest["totals"]["documents"]
    for s in shards:
        assert sha256_file(out / s["file"]) == s["sha256"]
        assert np.load(out / s["file"]).dtype == np.uint16
    assert manifest["complete"] and summary.new_tokens == len(tokens)
    assert repr(summary) == f"Summary({summary})" and "sha256" not in repr(summary)  # (a notebook cell shows it)
    # what training reads
    assert list_shards(out, "val") == [out / "data_val_000000.npy"]
    assert len(list_shards(out, "train")) == len(shards) - 1
    assert load_shard(list_shards(out, "train")[0], vocab_size=50257).size == 500


def test_blank_line_paragraphs_and_skipped_empty_documents(tmp_path):
    (tmp_path / "p.txt").write_text("First para\nline two\n\n\n  \nSecond para\r\n\r\nThird\n")
    (tmp_path / "empty.txt").write_text("  \n")
    source = sources.local_files([tmp_path / "*.txt"], split_on_blank_lines=True)
    prep.prepare(source, tmp_path / "out", cfg())
    assert np.array_equal(shard_tokens(tmp_path / "out"),
                          expected_tokens(["First para\nline two", "Second para", "Third"]))


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_large_txt_is_cut_into_parts_with_its_tokens_unchanged(tmp_path, shuffle):
    """A .txt was one part, whatever its size: one worker tokenized it (no faster with more), a Ctrl-C waited for
    all of it, and a re-run started it over. It is cut into parts now, where GPT-2's pre-tokenizer splits anyway:
    the tokens (one EOT, one document) and the shards are the whole file's, the parts in order even when shuffled."""
    from nanogpt_mlx.documents import plan_parts

    text = "\ufeff" + "\r\n".join(make_docs(300, seed=5))  # (a BOM, CRLF lines, unicode, runs of spaces)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    source = sources.local_files([tmp_path / "big.txt"])
    parts = plan_parts(source.units[0], tmp_path / "big.txt", 512)
    assert len(parts) > 20 and [p.continues for p in parts] == [False] + [True] * (len(parts) - 1)
    assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]
    out = tmp_path / "out"
    prep.prepare(source, out, cfg(workers=2, shuffle_docs=shuffle, seed=3 if shuffle else 0))
    assert np.array_equal(shard_tokens(out), expected_tokens([text.removeprefix("\ufeff")]))
    assert json.loads((out / "manifest.json").read_text())["totals"]["documents"] == 1


def test_a_large_txt_split_on_blank_lines_is_cut_between_its_documents(tmp_path):
    docs = make_docs(300, seed=6)
    seps = ["\n\n", "\r\n\r\n", "\n \t\n\n", "\n\n   ", "\n\u00a0\n"]  # (the last: Unicode whitespace)
    text = "".join(d + seps[i % len(seps)] for i, d in enumerate(docs))
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    source = sources.local_files([tmp_path / "p.txt"], split_on_blank_lines=True)
    from nanogpt_mlx.documents import plan_parts

    assert len(plan_parts(source.units[0], tmp_path / "p.txt", 512)) > 20
    prep.prepare(source, tmp_path / "out", cfg())
    whole = [d.strip("\r\n") for d in re.split(r"\n\s*\n", text) if d.strip()]  # (what one part gave)
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens(whole))


def test_a_run_of_blank_lines_is_searched_for_a_cut_in_linear_time(tmp_path):
    """The search for a cut between paragraphs backtracked through a run of blank lines that no ASCII text follows
    (the file's end, a Cyrillic paragraph): 20,000 newlines took seconds, a megabyte of them minutes."""
    from nanogpt_mlx.documents import plan_parts

    (tmp_path / "p.txt").write_text("A paragraph.\n\n" * 200 + "\n" * 20_000 + "Абзац.\n" + " \n" * 20_000)
    source = sources.local_files([tmp_path / "p.txt"], split_on_blank_lines=True)
    start = time.perf_counter()
    parts = plan_parts(source.units[0], tmp_path / "p.txt", 512)
    assert time.perf_counter() - start < 0.5 and len(parts) == 6


def test_a_txt_without_a_place_to_cut_stays_one_part(tmp_path):
    from nanogpt_mlx.documents import plan_parts

    (tmp_path / "cjk.txt").write_text("日本語の文章。" * 2000)
    source = sources.local_files([tmp_path / "cjk.txt"])
    assert len(plan_parts(source.units[0], tmp_path / "cjk.txt", 512)) == 1


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_and_two_workers_give_identical_bytes(tmp_path, mixed, shuffle):
    paths, docs = mixed
    outs = []
    for workers in (1, 2):
        outs.append(tmp_path / f"w{workers}")
        prep.prepare(sources.local_files(paths), outs[-1],
                     cfg(workers=workers, shuffle_docs=shuffle, seed=3 if shuffle else 0))
    assert dir_bytes(outs[0]) == dir_bytes(outs[1])
    tokens = shard_tokens(outs[0])
    if shuffle:  # the same documents, in another order
        assert not np.array_equal(tokens, expected_tokens(docs))
        assert sorted(get_tokenizer().decode(tokens.tolist()).split(EOT_TEXT)[1:]) == sorted(
            "".join(EOT_TEXT + d for d in docs).split(EOT_TEXT)[1:])
        # a file's parts in a permutation drawn from (seed, file): the jsonl alone opens with a document of the
        # part that the permutation puts first; another seed, another order
        from nanogpt_mlx.documents import plan_parts

        jsonl = sources.local_files(paths[:1])
        parts = plan_parts(jsonl.units[0], paths[0], cfg().part_bytes)
        first = parts[np.random.default_rng([3, 0]).permutation(len(parts))[0]]
        with open(paths[0], "rb") as f:
            f.seek(first.start)
            in_first = [json.loads(line)["text"] for line in f.read(first.stop - first.start).splitlines()]
        opening = []
        for seed in (3, 4):
            prep.prepare(jsonl, tmp_path / f"seed{seed}", cfg(shuffle_docs=True, seed=seed))
            opening.append(get_tokenizer().decode(shard_tokens(tmp_path / f"seed{seed}").tolist()).split(EOT_TEXT)[1])
        assert len(parts) > 2 and opening[0] in in_first and opening[1] != opening[0]
    else:
        assert np.array_equal(tokens, expected_tokens(docs))


def test_shuffle_docs_orders_the_documents_and_the_files_by_the_seed(tmp_path):
    """A file of one part (the part order moves nothing) and files of one part each: no test shuffled either, so
    documents left in their file's order, and files left in theirs, passed the suite."""
    def documents(out: Path) -> list[str]:
        return get_tokenizer().decode(shard_tokens(out).tolist()).split(EOT_TEXT)[1:]

    docs = make_docs(20, seed=5)
    one = sources.local_files([write_jsonl(tmp_path / "one.jsonl", docs)])
    for name in ("a", "b"):
        prep.prepare(one, tmp_path / name, cfg(shuffle_docs=True, seed=3, part_bytes=1 << 20))
    assert documents(tmp_path / "a") != docs and sorted(documents(tmp_path / "a")) == sorted(docs)
    assert dir_bytes(tmp_path / "a") == dir_bytes(tmp_path / "b")  # the same seed, the same bytes

    (tmp_path / "in").mkdir()
    files = [write_jsonl(tmp_path / "in" / f"{f}.jsonl", [f"file {f} document {d}" for d in range(3)])
             for f in range(4)]
    opening = set()
    for seed in range(4):
        prep.prepare(sources.local_files(files), tmp_path / f"seed{seed}", cfg(shuffle_docs=True, seed=seed))
        opening.add(documents(tmp_path / f"seed{seed}")[0].split()[1])
    assert len(opening) > 1  # the first document is of another file for another seed


def test_spawn_start_method(tmp_path):
    """Worker processes started with spawn (macOS/Windows default) give the same shards."""
    docs = make_docs(60, seed=2)
    jsonl = write_jsonl(tmp_path / "a.jsonl", docs)
    script = tmp_path / "run.py"
    script.write_text(
        "import multiprocessing, sys\n"
        "from nanogpt_mlx.prepare import PrepareConfig, prepare\nfrom nanogpt_mlx.sources import local_files\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.set_start_method('spawn')\n"
        "    prepare(local_files([sys.argv[1]]), sys.argv[2],\n"
        "            PrepareConfig(workers=2, shard_size=300, part_bytes=256, progress=False))\n")
    subprocess.run([sys.executable, str(script), str(jsonl), str(tmp_path / "spawn")], check=True, timeout=300)
    prep.prepare(sources.local_files([jsonl]), tmp_path / "one", cfg(shard_size=300, part_bytes=256))
    assert dir_bytes(tmp_path / "spawn") == dir_bytes(tmp_path / "one")


# ------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("lost", [True, False])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, mixed, monkeypatch, lost):
    """`lost`: the shard after the damaged one is gone too; kept, it is no start to resume from (with it kept, the
    shards after the first damaged one were kept as well, and the suite passed)."""
    paths, _ = mixed
    prep.prepare(sources.local_files(paths), tmp_path / "ref", cfg())
    out = tmp_path / "out"
    save, calls = np.save, []

    def crash_on_fourth_shard(*args, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of a shard write
        save(*args, **kw)

    monkeypatch.setattr(np, "save", crash_on_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(sources.local_files(paths), out, cfg(workers=2))
    monkeypatch.setattr(np, "save", save)
    assert sorted(p.name for p in out.glob("*.npy")) == ["data_train_000001.npy", "data_train_000002.npy",
                                                         "data_val_000000.npy"]
    # written after every shard: indenting it (Python code, not json's C encoder) made thousands of small shards take
    # minutes; indented once complete (dir_bytes below)
    assert (out / "manifest.json").read_text().count("\n") == 1
    # a harder crash: a temp file left behind, a completed shard damaged, and perhaps the next one lost
    (out / f".data_train_000003.tmp{HOST_TAG}-4242.npy").write_bytes(b"truncated")
    if lost:
        (out / "data_train_000002.npy").unlink()
    damaged = (out / "data_train_000001.npy").read_bytes()  # same size, other bytes: found by its sha256
    (out / "data_train_000001.npy").write_bytes(damaged[:-2] + bytes(b ^ 1 for b in damaged[-2:]))
    kept = (out / "data_val_000000.npy").stat().st_mtime_ns

    summary = prep.prepare(sources.local_files(paths), out, cfg(workers=2))
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref")
    assert (out / "data_val_000000.npy").stat().st_mtime_ns == kept  # verified, not rewritten
    assert summary.new_tokens < shard_tokens(out).size

    again = prep.prepare(sources.local_files(paths), out, cfg())
    assert again.new_tokens == 0 and "already complete" in str(again)
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref")
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("val", "train"):
        assert manifest["totals"][f"{split}_tokens"] == sum(np.load(out / s["file"]).size
                                                          for s in manifest["shards"] if s["split"] == split)


def test_kill_9_leaves_no_truncated_shard_and_resumes(tmp_path):
    docs = make_docs(3000, seed=4, words=120)
    jsonl = write_jsonl(tmp_path / "big.jsonl", docs)
    args = ["prepare", "files", str(jsonl), "--shard-size", "1000", "--workers", "2"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_mlx.cli", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed; make the input bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    recorded = {s["file"]: s for s in manifest["shards"]}
    for shard in out.glob("[!.]*.npy"):  # every visible shard is whole
        tokens = np.load(shard)
        if shard.name in recorded:
            assert sha256_file(shard) == recorded[shard.name]["sha256"]
        else:  # renamed into place just before the manifest update
            assert tokens.size == 1000

    run_cli(*args, "--out", str(out), check=True)
    prep.prepare(sources.local_files([jsonl]), tmp_path / "ref", cfg(shard_size=1000, part_bytes=2 << 20))
    assert dir_bytes(out) == dir_bytes(tmp_path / "ref")


# ------------------------------------------------------------------------------------ sources
@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """Serve a directory on 127.0.0.1 (a free port) for the test's duration."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy set in the environment must not see these requests
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shakespeare_download_cache_and_90_10_split(tmp_path, http_server):
    root, base = http_server
    text = "".join(f"CITIZEN {i}:\nSpeak, speak. We are resolved {i} times.\n\n" for i in range(300))
    (root / "input.txt").write_text(text)
    source = sources.shakespeare(url=f"{base}/input.txt", cache_dir=tmp_path / "cache")
    prep.prepare(source, tmp_path / "out", cfg(shard_size=100_000))
    cut = int(len(text) * 0.9)
    val, train = (np.load(tmp_path / "out" / f) for f in ("shakespeare_val_000000.npy", "shakespeare_train_000001.npy"))
    assert np.array_equal(val, expected_tokens([text[cut:]]))
    assert np.array_equal(train, expected_tokens([text[:cut]]))

    (root / "input.txt").unlink()  # served from the cache from now on
    again = sources.shakespeare(url=f"{base}/input.txt", cache_dir=tmp_path / "cache")
    assert again.units[0].key == source.units[0].key
    with pytest.raises(UserError, match=r"could not download .*missing.txt.*--path FILE \(Python: sources.shakespeare\(path=FILE\)\)"):
        sources.shakespeare(url=f"{base}/missing.txt", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [source.units[0].fetch(tmp_path)]  # no partial file


def test_a_shakespeare_cache_under_home_is_expanded(tmp_path, http_server, monkeypatch):
    """cache_dir `~/cache` was ./~/cache."""
    root, base = http_server
    (root / "input.txt").write_text("CITIZEN:\nSpeak, speak.\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    source = sources.shakespeare(url=f"{base}/input.txt", cache_dir="~/cache")
    assert source.units[0].fetch(tmp_path).parent == tmp_path / "home" / "cache" and not (tmp_path / "~").exists()


def test_shakespeare_local_path_val_shards_first(tmp_path):
    text = "To be, or not to be, that is the question.\n" * 200
    (tmp_path / "s.txt").write_text(text)
    prep.prepare(sources.shakespeare(path=tmp_path / "s.txt"), tmp_path / "out", cfg(shard_size=400))
    val = [p.name for p in list_shards(tmp_path / "out", "val")]
    train = [p.name for p in list_shards(tmp_path / "out", "train")]
    assert val == ["shakespeare_val_000000.npy"] and train[0] == "shakespeare_train_000001.npy"
    cut = int(len(text) * 0.9)
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens([text[cut:], text[:cut]]))


def test_shakespeare_has_nothing_to_shuffle(tmp_path):
    """--shuffle-docs --seed 3 only wrote train as shard 0 and val as shard 1: one text has no documents to shuffle."""
    (tmp_path / "s.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    with pytest.raises(UserError, match=r"shuffle_docs: .*s.txt is one text split by position, with no documents"):
        prep.prepare(sources.shakespeare(path=tmp_path / "s.txt"), tmp_path / "out", cfg(shuffle_docs=True, seed=3))
    assert not (tmp_path / "out").exists()
    assert_one_line_error(run_cli("prepare", "shakespeare", "--path", str(tmp_path / "s.txt"), "--shuffle-docs",
                                  "--out", str(tmp_path / "out")), "unrecognized arguments: --shuffle-docs",
                          status=2)


def fineweb_mirror(root: Path) -> list[str]:
    docs = make_docs(90, seed=5)
    for i in range(3):
        write_parquet(root / "sample" / "10BT" / f"{i:03d}_00000.parquet", docs[30 * i : 30 * (i + 1)], 7)
    return docs


def test_fineweb_edu_from_local_mirror(tmp_path):
    docs = fineweb_mirror(tmp_path / "mirror")
    summary = prep.prepare(sources.fineweb_edu(local_dir=tmp_path / "mirror"), tmp_path / "out", cfg(workers=2))
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens(docs))
    assert (tmp_path / "out" / "edufineweb_val_000000.npy").is_file()
    assert len(list((tmp_path / "mirror" / "sample" / "10BT").iterdir())) == 3  # local files are kept
    assert summary.manifest["units"][0].startswith("sample/10BT/000_00000.parquet (")


def test_fineweb_edu_samples_and_crawls_name_the_hubs_folders():
    """HuggingFaceFW/fineweb-edu keeps its samples under sample/ and its crawls under data/."""
    assert sources._fineweb_folder("sample-100BT") == "sample/100BT"
    assert sources._fineweb_folder("CC-MAIN-2024-10") == "data/CC-MAIN-2024-10"
    with pytest.raises(UserError, match="unknown fineweb-edu sample 'sample-10'"):
        sources._fineweb_folder("sample-10")


def test_cli_prepare_hands_its_options_to_the_sources(tmp_path, monkeypatch, capsys):
    from conftest import run_main

    seen = {}

    def record(name):
        def source(*args, **kw):
            seen[name] = kw
            raise UserError("recorded")
        return source

    monkeypatch.setattr(sources, "shakespeare", record("shakespeare"))
    monkeypatch.setattr(sources, "local_files", record("files"))
    run_main(capsys, "prepare", "shakespeare", "--url", "http://example.invalid/x.txt", "--out", str(tmp_path / "o"))
    run_main(capsys, "prepare", "files", "a.txt", "--split-on-blank-lines", "--text-field", "body", "--out",
             str(tmp_path / "o"))
    assert seen["shakespeare"]["url"] == "http://example.invalid/x.txt"
    assert (seen["files"]["split_on_blank_lines"], seen["files"]["text_field"]) == (True, "body")


@pytest.mark.parametrize("workers", [1, 2])
def test_fineweb_edu_from_hub_one_file_at_a_time(tmp_path, monkeypatch, workers):
    """The hub path (listing, download into scratch, delete after use) against a fake hub. With tokenizer processes,
    parts are tokenized ahead of their use: the third file was downloaded while the first's parts were in flight
    (three files on disk, where the docs said two)."""
    import huggingface_hub

    mirror = tmp_path / "mirror"
    docs = fineweb_mirror(mirror)
    files = sorted(mirror.rglob("*.parquet"))
    on_disk = []

    def fake_download(repo_id, filename, repo_type, revision, local_dir):
        assert (repo_id, repo_type, revision) == ("HuggingFaceFW/fineweb-edu", "dataset", "abc123")
        on_disk.append(len(list(Path(local_dir).rglob("*.parquet"))))
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((mirror / filename).read_bytes())
        return str(dest)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo, revision, timeout: SimpleNamespace(sha="abc123"))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", lambda self, repo, folder, revision, repo_type: [
        SimpleNamespace(path=str(f.relative_to(mirror)), size=f.stat().st_size) for f in files])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)

    monkeypatch.setattr(prep.device, "cores", lambda: 2)  # (on a machine of one core too)
    summary = prep.prepare(sources.fineweb_edu(), tmp_path / "out", cfg(workers=workers))
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens(docs))
    assert on_disk == [0, 1, 1]  # bounded disk: the file before the one tokenized is gone when the next downloads
    assert not (tmp_path / "out" / prep.SCRATCH).exists()
    assert summary.manifest["origin"] == {"revision": "abc123"}
    # the same files from a local mirror continue/verify the same run
    local = prep.prepare(sources.fineweb_edu(local_dir=mirror), tmp_path / "out", cfg())
    assert local.new_tokens == 0


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, content, needles", [
    ("bad.jsonl", '{"content": "no text field"}\n', ["bad.jsonl", "line 1", "'text'", "--text-field"]),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', ["bad.jsonl", "line 2", "not valid JSON"]),
    # two values on one line and one cut over two: read as three records when the part was parsed as one array
    ("two.jsonl", '{"text": "a"}\n{"text": "b"},{"text": "c"}\n{"text": "d", "x": [{"y": 1}\n{"z": 2}]}\n',
     ["two.jsonl", "line 2", "not valid JSON (Extra data"]),
    ("bad.txt", b"caf\xe9 latin-1", ["bad.txt", "not UTF-8"]),
    ("bad.parquet", b"PAR1 not really parquet", ["bad.parquet", "cannot read parquet"]),
    ("latin1.parquet", None, ["latin1.parquet", "column 'text' is not UTF-8 text"]),
    ("empty.jsonl", "\n\n", ["empty.jsonl", "no documents"]),
    ("data.csv", "a,b\n", ["data.csv", "unsupported file type"]),
])
def test_bad_input_names_the_file(tmp_path, name, content, needles):
    path = tmp_path / name
    if content is None:  # a string column holding Latin-1 bytes, as writers other than Arrow can store
        pq.write_table(pa.table({"text": pa.array([b"caf\xe9"], pa.binary()).cast(pa.string(), safe=False)}), path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as e:
        prep.prepare(sources.local_files([path]), tmp_path / "out", cfg(workers=2))
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_a_failed_run_removes_the_directory_it_made_for_nothing(tmp_path):
    """An empty source left OUT behind, holding a manifest of no shards and the lock; a directory that was there
    before is kept."""
    (tmp_path / "empty.txt").write_text("")
    src = sources.local_files([tmp_path / "empty.txt"])
    (tmp_path / "there").mkdir()
    for out in (tmp_path / "out", tmp_path / "there"):
        with pytest.raises(UserError, match="no documents"):
            prep.prepare(src, out, cfg())
    assert not (tmp_path / "out").exists() and (tmp_path / "there").is_dir()


def test_a_lock_that_cannot_be_written_removes_the_directory_it_made(tmp_path, monkeypatch):
    """On a full disk the lock's "cannot write" left the new OUT behind, holding an empty .lock; a directory that was
    there before is kept."""
    import io

    from nanogpt_mlx import locks

    class Full(io.StringIO):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode):
        Path(path).touch()  # the file is made, its line cannot be written
        return Full()

    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    src = sources.shakespeare(path=text)
    monkeypatch.setattr(locks, "open", full_open, raising=False)
    monkeypatch.setattr(locks.fcntl, "lockf", lambda f, how: None)
    (tmp_path / "there").mkdir()
    for out in (tmp_path / "full" / "sh2", tmp_path / "there"):
        with pytest.raises(UserError, match=re.escape(f"{out / LOCK_FILE}: cannot write (No space left on device)")):
            prep.prepare(src, out, cfg())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "input.txt", "there"]
    assert not (tmp_path / "full" / "sh2").exists() and (tmp_path / "there").is_dir()


def test_a_fifo_is_not_a_regular_file(tmp_path):
    """A FIFO (mkfifo) or a device said "no such file or directory"."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(UserError, match="pipe.jsonl: not a regular file"):
        sources.local_files([tmp_path / "pipe.jsonl"])
    with pytest.raises(UserError, match="gone.jsonl: no such file or directory"):
        sources.local_files([tmp_path / "gone.jsonl"])


def test_a_read_error_without_errno_is_one_line(tmp_path, monkeypatch):
    """An OSError with no errno gave its whole message, over several lines, where files.cannot gives one."""
    from nanogpt_mlx.documents import Part, read_docs

    def fail(*args, **kwargs):
        raise OSError("I/O failed\ndetails")

    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.setattr("builtins.open", fail)
    with pytest.raises(UserError, match=r"a.txt: cannot read \(I/O failed\)$"):
        read_docs(Part(str(tmp_path / "a.txt"), "txt", 0, 4))
    with pytest.raises(UserError, match=r"b.jsonl: cannot read \(I/O failed\)$"):
        read_docs(Part(str(tmp_path / "b.jsonl"), "jsonl", 0, 14))


def test_a_utf8_bom_is_no_text(tmp_path):
    """A .txt's BOM became 3 tokens, where a .jsonl's was skipped."""
    docs = make_docs(2, seed=4)
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + docs[0].encode())
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": docs[1]}).encode() + b"\n")
    prep.prepare(sources.local_files([tmp_path / "a.txt", tmp_path / "b.jsonl"]), tmp_path / "out", cfg())
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens(docs))


def test_a_file_named_twice_is_read_once(tmp_path, monkeypatch):
    """Spelled otherwise too: relative, through "..", or by a link to it."""
    docs = make_docs(5, seed=9)
    (tmp_path / "d").mkdir()
    path = write_jsonl(tmp_path / "d" / "a.jsonl", docs)
    (tmp_path / "link.jsonl").symlink_to(path)
    monkeypatch.chdir(tmp_path)
    source = sources.local_files([path, path, tmp_path / "d", str(tmp_path / "d" / "*.jsonl"), "d/a.jsonl",
                                  "d/../d/a.jsonl", "link.jsonl"])
    assert len(source.units) == 1
    prep.prepare(source, tmp_path / "out", cfg())
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens(docs))


def test_parquet_without_the_text_column(tmp_path):
    path = write_parquet(tmp_path / "x.parquet", ["a", "b"], field="body")
    with pytest.raises(UserError, match=r"x.parquet: no column 'text' \(columns: id, body, score\)"):
        prep.prepare(sources.local_files([path]), tmp_path / "out", cfg())
    prep.prepare(sources.local_files([path], text_field="body"), tmp_path / "out", cfg())


def test_parquet_text_of_any_string_encoding(tmp_path):
    """A dictionary-encoded column (a pandas category) or a string_view one was "holds dictionary<...>, not text"."""
    docs = make_docs(6, seed=8)
    columns = {"dict": pa.array(docs[:2] + [None]).dictionary_encode(),
               "large_dict": pa.array(docs[2:4], pa.large_string()).dictionary_encode(),
               "view": pa.array(docs[4:], pa.string_view())}
    for name, column in columns.items():
        pq.write_table(pa.table({"text": column}), tmp_path / f"{name}.parquet")
    assert pq.read_schema(tmp_path / "dict.parquet").field("text").type == pa.dictionary(pa.int32(), pa.string())
    paths = [tmp_path / f"{name}.parquet" for name in columns]
    prep.prepare(sources.local_files(paths), tmp_path / "out", cfg())
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens(docs))
    pq.write_table(pa.table({"text": pa.array([b"a", b"b"]).dictionary_encode()}), tmp_path / "bytes.parquet")
    with pytest.raises(UserError, match=r"bytes.parquet: column 'text' holds dictionary<values=binary.*not text"):
        prep.prepare(sources.local_files([tmp_path / "bytes.parquet"]), tmp_path / "out2", cfg())


def test_other_settings_do_not_mix_with_existing_shards(tmp_path, mixed):
    """The refusal names what differs: both values cut at 80 characters hid the differing setting or file."""
    paths, _ = mixed
    prep.prepare(sources.local_files(paths), tmp_path / "out", cfg())
    with pytest.raises(UserError, match=r"with other settings \(shard_size 500 there, 501 now\); use another --out "
                                        r"\(Python: out\), or the same options to resume"):
        prep.prepare(sources.local_files(paths), tmp_path / "out", cfg(shard_size=501))
    prep.prepare(sources.local_files(paths), tmp_path / "shuffled", cfg(shuffle_docs=True, seed=3))
    with pytest.raises(UserError, match=r"\(seed 3 there, 4 now\)"):
        prep.prepare(sources.local_files(paths), tmp_path / "shuffled", cfg(shuffle_docs=True, seed=4))
    key = lambda path: f"{path.resolve()} ({path.stat().st_size} bytes)"  # noqa: E731
    with pytest.raises(UserError, match=re.escape(f"input files (or other versions of them) ({key(paths[1])} there, "
                                                  "not now); use another --out (Python: out), or delete the "
                                                  "directory")):
        prep.prepare(sources.local_files([paths[0], paths[2]]), tmp_path / "out", cfg())
    with pytest.raises(UserError, match=re.escape("(the same files in another order)")):
        prep.prepare(sources.local_files(paths[::-1]), tmp_path / "out", cfg())


def test_cli_errors_are_one_line(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", ["x"], field="body")
    assert_one_line_error(run_cli("prepare", "files", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")),
                          "bad.jsonl", "line 1", "--text-field")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("prepare", "files", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")),
                          "empty", "empty source")
    assert_one_line_error(run_cli("prepare", "fineweb-edu", "--out", str(tmp_path / "o3")),
                          "HF_HUB_OFFLINE", "--local-dir")


def test_cli_prepare_and_inspect(tmp_path):
    docs = make_docs(100, seed=6)
    write_jsonl(tmp_path / "a.jsonl", docs)
    out = tmp_path / "out"
    proc = run_cli("prepare", "files", str(tmp_path / "a.jsonl"), "--out", str(out), "--shard-size", "400",
                   "--workers", "2", "--name", "mine", check=True)
    assert "1 val" in proc.stdout and "documents" in proc.stdout and "M tokens/s" in proc.stdout
    assert np.array_equal(shard_tokens(out), expected_tokens(docs))
    info = run_cli("prepare", "--inspect", str(out), check=True).stdout
    first_train = list_shards(out, "train")[0]
    assert re.search(r"val\s+1 shard, 400 tokens", info)  # not "1 shards"
    assert re.search(rf"train\s+{len(list_shards(out, 'train'))} shards", info)
    assert re.search(r"documents\s+100\n", info)
    assert get_tokenizer().decode(np.load(first_train)[:64].tolist()) in info


def test_inspect_names_a_missing_or_file_path_and_shards_missing_from_the_manifest(tmp_path, capsys):
    """--inspect said "no shards" for a mistyped directory or a file, and nothing of a listed shard deleted."""
    with pytest.raises(UserError, match="nowhere: data directory not found"):
        shards.describe(tmp_path / "nowhere")
    write_jsonl(tmp_path / "a.jsonl", make_docs(60))
    with pytest.raises(UserError, match="a.jsonl: a file, not a directory of token shards"):
        shards.describe(tmp_path / "a.jsonl")
    out = tmp_path / "out"
    prep.prepare(sources.local_files([tmp_path / "a.jsonl"]), out, cfg(shard_size=400))
    gone = list_shards(out, "train")[1]
    gone.unlink()
    capsys.readouterr()
    assert re.search(rf"train\s+{len(list_shards(out, 'train'))} shards", shards.describe(out))
    assert f"train shards that manifest.json lists are missing: {gone.name}" in capsys.readouterr().err
    for shard in out.glob("*.npy"):  # a manifest alone: one line, not a warning for each split's listed shards first
        shard.unlink()
    assert_one_line_error(run_cli("prepare", "--inspect", str(out)), "no shards (*_val_*.npy, *_train_*.npy)")


def test_names_and_seeds_that_would_lose_shards_are_refused(tmp_path):
    """A NAME with '/' wrote shards into a subdirectory, a leading '.' hid them from every reader: prepare
    reported success and train found nothing. A prefix holding `_train_` no longer makes its val shard train."""
    for name in ("a/b", ".hidden", "", "a\x00b"):  # (a NUL byte: os' ValueError "embedded null byte")
        with pytest.raises(UserError, match=f"name {re.escape(repr(name))}: shards are files NAME_val_000000.npy, .* "
                                            "in the output directory: a NAME has no"):
            prep.PrepareConfig(name=name)
    with pytest.raises(UserError, match="seed must be >= 0, got -1"):
        prep.PrepareConfig(seed=-1)
    # a seed without --shuffle-docs was ignored (the manifest said null)
    with pytest.raises(UserError, match=r"^seed orders shuffle_docs \(seed=3 without shuffle_docs=True\); pass both"):
        prep.PrepareConfig(seed=3)
    write_jsonl(tmp_path / "a.jsonl", make_docs(40, seed=2))
    assert_one_line_error(run_cli("prepare", "files", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o"),
                                  "--shuffle-docs", "--seed", "-1"), "seed must be >= 0")
    for seed in ("0", "3"):
        assert_one_line_error(run_cli("prepare", "files", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o"),
                                      "--seed", seed), "--seed orders --shuffle-docs; pass both or neither")
    assert not (tmp_path / "o").exists()
    out = tmp_path / "web"
    prep.prepare(sources.local_files([tmp_path / "a.jsonl"]), out, cfg(name="web_train_v2"))
    assert [p.name for p in list_shards(out, "val")] == ["web_train_v2_val_000000.npy"]
    assert "web_train_v2_val_000000.npy" not in [p.name for p in list_shards(out, "train")]


def test_an_out_path_with_a_nul_byte_is_one_line(tmp_path):
    """os' ValueError, "embedded null byte", was a traceback."""
    src = sources.local_files([write_jsonl(tmp_path / "a.jsonl", make_docs(5))])
    bad = str(tmp_path / "o\x00ut")
    with pytest.raises(UserError, match=r"^the shard directory '.*o\\x00ut' holds a NUL byte, which no file name can$"):
        prep.prepare(src, bad, cfg())
    with pytest.raises(UserError, match="holds a NUL byte"):
        shards.describe(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_an_existing_file_named_like_a_pattern_is_read(tmp_path):
    docs = make_docs(5, seed=4)
    path = write_jsonl(tmp_path / "a[1].jsonl", docs)
    prep.prepare(sources.local_files([path]), tmp_path / "out", cfg())
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens(docs))
    assert len(sources.local_files([str(tmp_path / "a?1?.jsonl")]).units) == 1  # a pattern, as no such file exists


def test_inspect_and_resume_beside_foreign_files(tmp_path):
    """Shards of other token ids are listed, not decoded; a manifest.json prepare did not write is no crash."""
    data = tmp_path / "d"
    data.mkdir()
    np.save(data / "x_val_000000.npy", np.array([1, 2, 3], np.uint16))
    np.save(data / "x_train_000001.npy", np.array([60000, 1, 2], np.uint16))
    (data / "manifest.json").write_text(json.dumps({"complete": True}))
    info = shards.describe(data)
    assert "beyond GPT-2's 50257, not decoded" in info and "60000 1 2" in info and "not one that prepare writes" in info
    for damaged in ({}, {"shards": [{"file": "x"}]}, {"source": {}, "shards": [{"file": "x", "documents": "3"}]}):
        (data / "manifest.json").write_text(json.dumps({"format": shards.FORMAT, **damaged}))  # a KeyError, a TypeError
        assert "manifest.json is damaged" in shards.describe(data)
    # not JSON: it refused to say anything of the shards ("manifest.json: unreadable (...)"); and a RecursionError's
    # traceback, also in train
    for text, why in (('{"format": "nanogpt-mlx-shards", "comp', "Unterminated string"),
                      ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        (data / "manifest.json").write_text(text)
        info = shards.describe(data)
        assert f"manifest.json is damaged ({why}" in info and "): ignored" in info
        assert "  val        1 shard" in info and "60000 1 2" in info
    (data / "manifest.json").unlink()
    assert "manifest" not in shards.describe(data)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.json").write_text("[1, 2]")
    write_jsonl(tmp_path / "a.jsonl", make_docs(5))
    with pytest.raises(UserError, match="not a manifest that prepare writes; choose an empty directory"):
        prep.prepare(sources.local_files([tmp_path / "a.jsonl"]), tmp_path / "o", cfg())


def test_sizes_that_cannot_work_are_refused(tmp_path, capsys):
    """A shard is a buffer in memory (1e20 tokens: numpy's ValueError), and 100,000 workers were 100,000 processes."""
    for bad in ({"shard_size": 2**31 + 1}, {"shard_size": 0}, {"workers": 0}, {"part_bytes": 0}):
        with pytest.raises(UserError, match="must be"):
            prep.PrepareConfig(**bad)
    write_jsonl(tmp_path / "a.jsonl", make_docs(40, seed=2))
    assert_one_line_error(run_cli("prepare", "files", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o"),
                                  "--shard-size", str(10**20)), "shard_size must be in [1, 2^31]")
    prep.prepare(sources.local_files([tmp_path / "a.jsonl"]), tmp_path / "w", cfg(workers=prep.device.cores() + 1))
    assert f"{prep.device.cores() + 1} workers asked for, {prep.device.cores()} used" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, needle", [
    ("shard_size", 1.5, "an integer"), ("shard_size", True, "an integer"), ("shard_size", "100", "an integer"),
    ("workers", 1.5, "an integer"), ("seed", 1.5, "an integer"), ("shuffle_docs", 1, "true or false"),
    ("name", 5, "a string")])
def test_a_setting_of_another_type_is_refused_before_any_work(field, value, needle, tmp_path):
    """As TrainConfig's: a 1.5 or "100" was a deep traceback after an incomplete manifest was written."""
    write_jsonl(tmp_path / "a.jsonl", make_docs(4, seed=2))
    with pytest.raises(UserError, match=f"^{field} must be {needle}, got {re.escape(repr(value))}$"):
        prep.prepare(sources.local_files([tmp_path / "a.jsonl"]), tmp_path / "o", cfg(**{field: value}))
    assert not (tmp_path / "o").exists()


def test_python_arguments_of_the_wrong_type_are_one_line(tmp_path):
    """A path for the source, a number for the config or n_tokens: AttributeErrors (units, shuffle_docs) and a
    TypeError in NumPy's memmap."""
    text = write_jsonl(tmp_path / "a.jsonl", make_docs(4, seed=2))
    with pytest.raises(UserError, match=re.escape("source must be a Source (sources.local_files(paths), "
                                                  f"sources.shakespeare(), sources.fineweb_edu()), got {str(text)!r}")):
        prep.prepare(str(text), tmp_path / "o")
    with pytest.raises(UserError, match="^config must be a PrepareConfig, got 1000$"):
        prep.prepare(sources.local_files([text]), tmp_path / "o", 1000)
    assert not (tmp_path / "o").exists()
    prep.prepare(sources.local_files([text]), tmp_path / "o", cfg())
    for n_tokens in ("5", 2.5):
        with pytest.raises(UserError, match=f"^n_tokens must be an integer, got {re.escape(repr(n_tokens))}$"):
            shards.describe(tmp_path / "o", n_tokens=n_tokens)


@pytest.mark.parametrize("paths", [3, None, [Path("a.txt"), 3]])
def test_local_files_refuses_what_is_no_path(paths):
    """3 was read as a file named "3"; None and [path, 3] were TypeErrors."""
    with pytest.raises(UserError, match=re.escape(f"paths must be a path or a list of paths, got {paths!r}")):
        sources.local_files(paths)


@pytest.mark.parametrize("damage", [lambda m: m["shards"][0].pop("sha256"), lambda m: m["shards"][0].update(end=5),
                                    lambda m: m["shards"][0].update(file="../elsewhere.npy"),
                                    lambda m: m["shards"][0].update(tokens="801"),
                                    lambda m: m.update(stamps=[m["stamps"][0] + 0.5])])  # ValueError in the hint
def test_a_damaged_manifest_of_the_right_format_is_one_line(tmp_path, damage):
    write_jsonl(tmp_path / "a.jsonl", make_docs(40, seed=2))
    src = sources.local_files([tmp_path / "a.jsonl"])
    prep.prepare(src, tmp_path / "o", cfg())
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    damage(manifest)
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json: damaged"):
        prep.prepare(src, tmp_path / "o", cfg())


def test_an_empty_name_and_hidden_directories_add_no_files(tmp_path, monkeypatch):
    """'' was the working directory (an unset variable tokenized all of it); files under a hidden directory
    (.venv, .ipynb_checkpoints, an old .download) were read, which the '**' pattern skips."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", make_docs(3))
    with pytest.raises(UserError, match="'' names no file"):
        sources.local_files([""])
    (tmp_path / "d" / ".hid").mkdir(parents=True)
    (tmp_path / "d" / "sub").mkdir()
    write_jsonl(tmp_path / "d" / "seen.jsonl", make_docs(2))
    write_jsonl(tmp_path / "d" / "sub" / "nested.jsonl", make_docs(2))  # a directory's files at any depth
    write_jsonl(tmp_path / "d" / ".hid" / "hidden.jsonl", make_docs(2))
    keys = [u.key for u in sources.local_files([tmp_path / "d"]).units]
    assert len(keys) == 2 and "seen.jsonl" in keys[0] and "nested.jsonl" in keys[1]
    assert [u.key for u in sources.local_files(str(tmp_path / "d")).units] == keys  # one path, not its characters
    assert [u.key for u in sources.local_files([str(tmp_path / "d" / "**" / "*.jsonl")]).units] == keys


def test_symlinked_folders_are_entered_by_neither_a_search_nor_a_pattern(tmp_path):
    """glob's ** followed symlinked folders: two links to their own folder made its paths multiply without end (it
    never finished, its memory growing), while a directory's search did not enter them."""
    (tmp_path / "lp" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "lp" / "a.jsonl", make_docs(2))
    write_jsonl(tmp_path / "lp" / "sub" / "b.jsonl", make_docs(2))
    for name in ("x", "y"):
        (tmp_path / "lp" / name).symlink_to(".")
    (tmp_path / "elsewhere").mkdir()
    write_jsonl(tmp_path / "elsewhere" / "c.jsonl", make_docs(2))
    (tmp_path / "lp" / "sub" / "link").symlink_to(tmp_path / "elsewhere")
    start = time.monotonic()
    (tmp_path / "lp" / "direct").symlink_to(tmp_path / "elsewhere")  # a link right under the pattern's root
    keys = [u.key for u in sources.local_files([tmp_path / "lp"]).units]
    assert [u.key for u in sources.local_files([str(tmp_path / "lp" / "**" / "*.jsonl")]).units] == keys
    # a trailing ** matched the linked folders as files, and they were searched
    assert [u.key for u in sources.local_files([str(tmp_path / "lp" / "**")]).units] == keys
    assert time.monotonic() - start < 5
    assert len(keys) == 2 and "a.jsonl" in keys[0] and "b.jsonl" in keys[1]
    # a linked folder named outright, or by a pattern's *, is searched
    assert "c.jsonl" in sources.local_files([tmp_path / "lp" / "sub" / "link"]).units[0].key
    assert "c.jsonl" in sources.local_files([str(tmp_path / "lp" / "sub" / "l*")]).units[0].key


def test_a_pattern_skips_what_a_directory_skips(tmp_path):
    """d/* stopped at d/pic.png ("unsupported file type") or a dangling link ("no such file or directory"), which
    `files d` skips; a file named outright is still refused. As a directory, a wildcard skips hidden files (macOS's
    ._a.txt beside a copied a.txt), unless its pattern starts with "."."""
    d = tmp_path / "d"
    d.mkdir()
    write_jsonl(d / "a.jsonl", make_docs(2))
    write_jsonl(d / ".x.jsonl", make_docs(2, seed=1))
    (d / "._a.txt").write_bytes(b"\x00\x05\x16\x07 Mac OS X")
    (d / "pic.png").write_bytes(b"\x89PNG")
    (d / "readme.md").write_text("# notes")
    (d / "dangling.txt").symlink_to(tmp_path / "nowhere")
    os.mkfifo(d / "pipe.txt")
    keys = [u.key for u in sources.local_files([d]).units]
    assert len(keys) == 1 and [u.key for u in sources.local_files([str(d / "*")]).units] == keys
    hidden = [u.key for u in sources.local_files([str(d / ".*.jsonl")]).units]
    assert len(hidden) == 1 and hidden[0].startswith(f"{(d / '.x.jsonl').resolve()} (")
    for name, needle in [("pic.png", "unsupported file type"), ("dangling.txt", "no such file or directory"),
                         ("pipe.txt", "not a regular file")]:
        with pytest.raises(UserError, match=f"{name}: {needle}"):
            sources.local_files([d / name])
    with pytest.raises(UserError, match="no .txt, .jsonl or .parquet files"):
        sources.local_files([str(d / "*.[mp][dn]*")])


def test_suffixes_match_in_any_case(tmp_path):
    """A directory's C.TXT was skipped without a word, while naming it said "unsupported file type"."""
    docs = make_docs(3, seed=6)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "C.TXT").write_text(docs[0])
    write_jsonl(tmp_path / "d" / "b.JSONL", docs[1:2])
    write_parquet(tmp_path / "d" / "a.Parquet", docs[2:])
    kinds = [u.kind for u in sources.local_files([tmp_path / "d"]).units]
    assert kinds == ["parquet", "jsonl", "txt"]
    assert [u.kind for u in sources.local_files([tmp_path / "d" / "sub" / "C.TXT"]).units] == ["txt"]
    prep.prepare(sources.local_files([tmp_path / "d"]), tmp_path / "out", cfg())
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected_tokens([docs[2], docs[1], docs[0]]))


def test_an_input_edited_in_place_is_not_resumed(tmp_path):
    """The same size, other text: the kept shards and the resumed offsets would mix the two versions."""
    docs = make_docs(60, seed=5)
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    prep.prepare(sources.local_files([path]), tmp_path / "o", cfg())
    text = path.read_text()
    before = path.stat().st_mtime_ns
    path.write_text(text.replace("cat", "dog"))  # as long as before
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a second later, on a file system with coarse times too
    with pytest.raises(UserError, match=r"a.jsonl .* was modified after .* shards were made from it .*; use another "
                                        r"--out \(Python: out\), or delete"):
        prep.prepare(sources.local_files([path]), tmp_path / "o", cfg())


def test_a_touched_input_says_how_to_resume(tmp_path):
    """A copy or a touch changes only the time: the message's `touch -d` gives it back, and the run resumes."""
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(60, seed=5))
    prep.prepare(sources.local_files([path]), tmp_path / "o", cfg())
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before + 10**9, before + 10**9))
    with pytest.raises(UserError, match="was modified after") as e:
        prep.prepare(sources.local_files([path]), tmp_path / "o", cfg())
    command = re.search(r"`(touch -d @[0-9.]+)` on it resumes", str(e.value)).group(1)
    subprocess.run([*command.split(), str(path)], check=True)
    assert path.stat().st_mtime_ns == before
    assert prep.prepare(sources.local_files([path]), tmp_path / "o", cfg()).new_tokens == 0


def test_other_input_files_are_named_as_such(tmp_path):
    """Tiny Shakespeare's identity is its sha256: an edited copy said "other units ... the same options to resume"."""
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    prep.prepare(sources.shakespeare(path=text), tmp_path / "o", cfg())
    text.write_text(text.read_text().replace("Before", "BEFORE"))
    with pytest.raises(UserError, match=r"made from other input files .*; use another --out \(Python: out\), or "
                                        r"delete"):
        prep.prepare(sources.shakespeare(path=text), tmp_path / "o", cfg())


def test_a_shard_written_but_not_yet_listed_is_removed(tmp_path):
    """A kill between a shard's rename and the manifest's update left it; other settings then kept it beside their
    own shards, and readers took it for data."""
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(60, seed=6))
    out = tmp_path / "o"
    prep.prepare(sources.local_files([path]), out, cfg())
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(shards=[], complete=False)  # as if killed before the first shard was recorded
    (out / "manifest.json").write_text(json.dumps(manifest))
    np.save(out / "mine_train_000000.npy", np.array([1, 2, 3], np.uint16))  # not prepare's: kept
    prep.prepare(sources.local_files([path]), out, cfg(name="other"))
    assert {p.name.split("_")[0] for p in out.glob("*.npy")} == {"other", "mine"}


def test_a_users_hidden_files_stay_and_a_refused_directory_keeps_all(tmp_path):
    """A user's `.draft.tmp42.md` was taken for a killed writer's temporary and deleted, even from a directory then
    refused: only prepare's own temporaries go, and only from a directory it takes."""
    path = write_jsonl(tmp_path / "a.jsonl", make_docs(60, seed=6))
    refused = tmp_path / "refused"
    refused.mkdir()
    np.save(refused / "mine.npy", np.array([1, 2, 3], np.uint16))
    stale = f".data_val_000000.tmp{HOST_TAG}-4242.npy"  # what prepare itself leaves when killed
    for name in (".draft.tmp42.md", stale):
        (refused / name).write_text("precious")
    before = dir_bytes(refused)
    with pytest.raises(UserError, match="holds .npy files but no manifest.json"):
        prep.prepare(sources.local_files([path]), refused, cfg())
    assert dir_bytes(refused) == before
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in (".notes.tmp2024.txt", stale):
        (fresh / name).write_text("x")
    prep.prepare(sources.local_files([path]), fresh, cfg())
    assert (fresh / ".notes.tmp2024.txt").read_text() == "x" and not (fresh / stale).exists()


def test_shakespeare_path_mistakes_are_named(tmp_path):
    with pytest.raises(UserError, match="a directory, not Tiny Shakespeare's text"):
        sources.shakespeare(path=tmp_path)
    with pytest.raises(UserError, match="no such file: Tiny Shakespeare's text"):
        sources.shakespeare(path=tmp_path / "nope.txt")
    os.mkfifo(tmp_path / "pipe.txt")  # these were "no such file" (and a FIFO must not be opened: it would block)
    for special in (tmp_path / "pipe.txt", Path(os.devnull)):
        with pytest.raises(UserError, match=f"^{re.escape(str(special))}: not a regular file: Tiny Shakespeare's"):
            sources.shakespeare(path=special)
    with pytest.raises(UserError, match="not both"):  # the URL was ignored
        sources.shakespeare(path=tmp_path / "input.txt", url="http://127.0.0.1:9/input.txt")
    with pytest.raises(UserError, match="--local-dir .* or --revision .*, not both"):  # the revision was ignored
        sources.fineweb_edu(local_dir=tmp_path, revision="abc")


def test_an_empty_shard_directory_is_refused(tmp_path, monkeypatch):
    """'' is the working directory to Path: an unset variable wrote shards into it."""
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    with pytest.raises(UserError, match="unset variable"):
        prep.prepare(sources.shakespeare(path=text), "", cfg())
    assert_one_line_error(run_cli("prepare", "--inspect", ""), "unset variable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]


def signalled_prepare(tmp_path: Path, ready, *signums: int, after: float = 0.0,
                      extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """`prepare files` of ~90 MB of text with 2 workers (tokenizing takes longer than these tests wait: ~3 s here,
    the file's parts side by side), sent `signums` 0.05 s apart `after` seconds after ready(OUT) holds: (exit status,
    stderr)."""
    line = "First Citizen:\nBefore we proceed any further, hear me speak, and let us kill him.\n\n"
    (tmp_path / "big.txt").write_text(line * 1_200_000)
    proc = subprocess.Popen([sys.executable, "-m", "nanogpt_mlx", "prepare", "files", str(tmp_path / "big.txt"),
                             "--out", str(tmp_path / "o"), "--workers", "2", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # not nohup's
    deadline = time.time() + 60
    while not ready(tmp_path / "o"):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    time.sleep(after)
    try:
        for signum in signums:
            proc.send_signal(signum)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, err
    finally:
        proc.kill()


def test_a_second_ctrl_c_while_the_workers_stop_ends_prepare(tmp_path):
    """The second Ctrl-C broke into the pool's shutdown: the workers waited for work and the exit for them, forever."""
    def planned(out: Path) -> bool:  # the manifest is written once the work is planned, before the pool
        return (out / "manifest.json").exists()

    status, err = signalled_prepare(tmp_path, planned, signal.SIGINT, signal.SIGINT, after=0.5)
    # on a loaded machine the first can come before a part is in flight, the workers then stop at once, and the second
    # as Python exits (its handler gone): ended by it, silently, which a shell reports as 130 too
    assert status in (130, -signal.SIGINT) and "Traceback" not in err, err


@pytest.mark.parametrize("where", ["the pool's first task", "the progress bar"])
def test_a_ctrl_c_before_the_first_part_stops_the_workers(tmp_path, monkeypatch, where):
    """A Ctrl-C while the pool started (its first task waits for every worker's start) or before the loop (tqdm's
    import and bar) left the workers to Python's exit, whose join a second Ctrl-C broke: a traceback, or a hang of
    the exit, seen on a loaded machine (test_a_second_ctrl_c_while_the_workers_stop_ends_prepare)."""
    import multiprocessing

    import tqdm

    def interrupt(real):
        def interrupted(*args, **kw):
            real(*args, **kw)
            raise KeyboardInterrupt
        return interrupted

    if where == "the pool's first task":
        monkeypatch.setattr(prep.cf.ProcessPoolExecutor, "submit", interrupt(prep.cf.ProcessPoolExecutor.submit))
    else:
        monkeypatch.setattr(tqdm.tqdm, "__init__", interrupt(tqdm.tqdm.__init__))
    monkeypatch.setattr(prep.device, "cores", lambda: 2)  # (on a machine of one core too)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(sources.local_files([write_jsonl(tmp_path / "a.jsonl", make_docs(20))]), tmp_path / "o",
                     cfg(workers=2))
    assert multiprocessing.active_children() == []  # shut down, not left to the exit


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_prepare_as_ctrl_c_does(tmp_path, signum):
    """SIGTERM (kill, a scheduler) or SIGHUP (a closed terminal) ended prepare where it stood: its shard in the
    writing stayed as a hidden temporary file."""
    def writing(out: Path) -> bool:
        return any(".tmp" in p.name for p in out.glob("*"))

    status, err = signalled_prepare(tmp_path, writing, signum, extra=("--shard-size", "1000000"))
    assert status == 128 + signum and "Traceback" not in err, err
    assert err.strip().splitlines() == ["nanogpt-mlx: interrupted"]  # the workers' "stopping" note on stdout
    out = tmp_path / "o"  # (gone where the stop came before its first shard: the run had made it)
    assert not out.exists() or not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_a_source_smaller_than_one_shard_is_split_90_10(tmp_path):
    """build-nanogpt's shard 0 is val: a corpus under one shard (100M tokens by default) was all val, and `train`
    then found no train shard. Its first tenth, to the next document's start, is val now; the rest train."""
    docs = make_docs(60)
    prep.prepare(sources.local_files([write_jsonl(tmp_path / "docs.jsonl", docs)]), tmp_path / "out",
                 cfg(shard_size=10_000))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    val, train = manifest["shards"]
    assert (val["split"], train["split"]) == ("val", "train") and manifest["complete"]
    expected = expected_tokens(docs)
    assert np.array_equal(shard_tokens(tmp_path / "out"), expected) and len(expected) < 10_000
    tenth = len(expected) // 10  # val ends where the first document after the first tenth starts
    assert val["tokens"] == tenth + np.flatnonzero(expected[tenth:] == EOT)[0] < 2 * tenth
    assert np.load(tmp_path / "out" / train["file"])[0] == EOT  # a document's start
    assert val["documents"] + train["documents"] == 60
    # a source of exactly one shard's tokens (it was written as val when the buffer filled), and one long document
    # then a short one (the cut went on to the next document's start: 6 tokens were left to train on)
    for name, texts, size in [("exact", docs, len(expected)), ("long", [" ".join(docs), "end"], 10_000)]:
        prep.prepare(sources.local_files([write_jsonl(tmp_path / f"{name}.jsonl", texts)]), tmp_path / name,
                     cfg(shard_size=size))
        val, train = json.loads((tmp_path / name / "manifest.json").read_text())["shards"]
        total = val["tokens"] + train["tokens"]
        assert (val["split"], train["split"]) == ("val", "train") and total // 10 <= val["tokens"] < total // 5


@pytest.mark.parametrize("lost", ["train", "val"])
def test_a_lost_shard_of_a_small_sources_pair_is_made_again(tmp_path, capsys, lost):
    """Both records of a source of at most one shard end None: with its train shard deleted, the intact val shard
    looked like a finished run, and the re-run said "already complete", warned of no train tokens and wrote the
    manifest without the train shard (lost for good)."""
    src = sources.local_files([write_jsonl(tmp_path / "docs.jsonl", make_docs(60))])
    out = tmp_path / "out"
    prep.prepare(src, out, cfg(shard_size=10_000))
    before = dir_bytes(out)
    val, train = (next(out.glob(f"*_{split}_*.npy")) for split in ("val", "train"))
    if lost == "train":
        train.unlink()
    else:
        val.write_bytes(val.read_bytes()[:-4])
    capsys.readouterr()
    again = prep.prepare(src, out, cfg(shard_size=10_000))
    assert again.new_tokens and dir_bytes(out) == before
    assert [s["split"] for s in again.manifest["shards"]] == ["val", "train"]
    assert "no train tokens" not in capsys.readouterr().err


def test_a_split_left_empty_is_warned_of(tmp_path, capsys):
    """Two short documents gave "1 shards (1 val, 0 train)", a text whose last tenth is blank no val tokens, and
    prepare said nothing (train then failed to find the split)."""
    src = sources.local_files([write_jsonl(tmp_path / "two.jsonl", ["Hi.", "Bye."])])
    for _ in range(2):  # and when it is re-run
        summary = prep.prepare(src, tmp_path / "short", cfg())
        assert summary.manifest["totals"]["train_tokens"] == 0
        assert "short: no train tokens, nothing to train on" in capsys.readouterr().err
        assert "short: 1 shard (1 val, 0 train)" in str(summary)  # not "1 shards"
    one = prep.prepare(sources.local_files([write_jsonl(tmp_path / "one.jsonl", ["Hi."])]), tmp_path / "one", cfg())
    assert "1 document;" in str(one) and "tokenized 3 tokens" in str(one)
    capsys.readouterr()
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5 + "\n" * 60)
    assert prep.prepare(sources.shakespeare(path=text), tmp_path / "blank", cfg()).manifest["totals"]["val_tokens"] == 0
    err = capsys.readouterr().err
    assert "blank: no val tokens, nothing to validate on" in err
    assert "--val-every 0 (Python: TrainConfig(val_every=0))" in err
    assert "train tokens" not in err


def test_a_train_split_dwarfed_by_val_is_warned_of(tmp_path, capsys):
    """A source one token over a shard gave "N val + 1 train tokens" without a word (found only by train)."""
    docs = make_docs(60)
    total = len(expected_tokens(docs))
    src = sources.local_files([write_jsonl(tmp_path / "docs.jsonl", docs)])
    for _ in range(2):  # and when it is re-run
        totals = prep.prepare(src, tmp_path / "thin", cfg(shard_size=total - 1)).manifest["totals"]
        assert (totals["val_tokens"], totals["train_tokens"]) == (total - 1, 1)
        err = capsys.readouterr().err
        assert f"thin: 1 train token, under a tenth of its {total - 1:,} val tokens (shard 0 is val)" in err
        assert f"a smaller --shard-size (Python: shard_size), e.g. {total // 10}" in err
    prep.prepare(src, tmp_path / "split", cfg(shard_size=total // 10))  # the advice taken: nine tenths train
    prep.prepare(src, tmp_path / "small", cfg(shard_size=total))  # a source of one shard: split 90/10
    assert "warning" not in capsys.readouterr().err


def test_a_shard_missing_from_a_prepared_directory_is_warned_of(tmp_path, capsys):
    """A partial copy, or a deleted shard, trained and evaluated on less data without a word: manifest.json lists
    every shard and its length, but only its "complete" was read."""
    from nanogpt_mlx.data import DataLoader

    prep.prepare(sources.local_files([write_jsonl(tmp_path / "docs.jsonl", make_docs(60))]), tmp_path / "out",
                 cfg(shard_size=400))
    trains = sorted((tmp_path / "out").glob("*_train_*.npy"))
    assert len(trains) >= 3
    capsys.readouterr()
    DataLoader(tmp_path / "out", "train", 2, 8)
    assert capsys.readouterr().err == ""  # as prepared
    trains[1].unlink()
    np.save(trains[2], np.load(trains[2])[:-5])
    DataLoader(tmp_path / "out", "train", 2, 8)
    err = capsys.readouterr().err
    assert f"train shards that manifest.json lists are missing: {trains[1].name}; of another length: " \
           f"{trains[2].name} (" in err and "re-run the same prepare command" in err


def test_a_manifests_counts_that_differ_from_its_shards_are_corrected_on_resume(tmp_path, capsys):
    """The loader's warning says to re-run prepare to restore shards of another length than manifest.json lists;
    where the record, not the shard, was wrong, the re-run said "already complete" and kept it and its totals."""
    out = tmp_path / "out"
    src = sources.local_files([write_jsonl(tmp_path / "docs.jsonl", make_docs(60))])
    done = prep.prepare(src, out, cfg(shard_size=400)).manifest
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][1].update(tokens=manifest["shards"][1]["tokens"] + 5, documents=0)
    manifest["totals"]["train_tokens"] += 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    again = prep.prepare(src, out, cfg(shard_size=400))
    assert again.new_tokens == 0 and again.manifest == done
    assert json.loads((out / "manifest.json").read_text()) == done
    assert f"corrected the token and document counts it gave for {done['shards'][1]['file']}" in \
        capsys.readouterr().err


@pytest.mark.parametrize("call, needle", [
    (lambda: sources.fineweb_edu(sample=10), "the fineweb-edu sample must be a name such as sample-10BT, got 10"),
    (lambda: sources.local_files([]), "no files named (paths is empty)"),  # it said ": no .txt, ..."
    (lambda: sources.local_files("x.txt", text_field=5), "text_field must name a field, got 5"),
    (lambda: sources.local_files("x.txt", split_on_blank_lines="no"), "split_on_blank_lines must be True or False"),
])
def test_the_sources_refuse_arguments_of_the_wrong_kind(call, needle):
    """A TypeError's traceback, an empty label, or a value taken as something else ("no" as true)."""
    with pytest.raises(UserError, match=re.escape(needle)):
        call()


def test_split_on_blank_lines_takes_a_numpy_bool(tmp_path):
    """check_bool refused np.True_; the source's info (the manifest's JSON) holds it as Python's."""
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert json.dumps(sources.local_files(tmp_path / "a.txt", split_on_blank_lines=np.True_).info) == \
        json.dumps(sources.local_files(tmp_path / "a.txt", split_on_blank_lines=True).info)
