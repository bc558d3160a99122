"""HellaSwag scoring and eval loss: parity with a PyTorch version of build-nanogpt's scoring, bad input, download."""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import random
import re
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, run_main

from nanogpt_mlx import GPT, GPTConfig
from nanogpt_mlx.errors import UserError
from nanogpt_mlx.evaluate import (download_hellaswag, eval_loss, load_hellaswag, loader_loss, perplexity,
                                  score_hellaswag, write_records)
from nanogpt_mlx.tokenizer import encode
from nanogpt_mlx.weights import load_model

WORDS = ("the a man woman dog ball roof kitchen guitar slowly quickly then runs jumps picks up puts down "
         "water table tree climbs throws smiles camera shows talks about rope knife bowl mixes, paints. "
         "(again) won't it's 42 3.5% café naïve").split()


def make_hellaswag(n: int = 24, seed: int = 0, ctx_words: tuple[int, int] = (3, 25),
                   ending_words: tuple[int, int] = (1, 20)) -> list[dict]:
    """Examples in rowanz/hellaswag's JSONL format. Each example's endings are within +-50% of a
    length drawn from `ending_words`, so rows differ in length within and across examples."""
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    # contexts recur (as in batches that group equal context lengths), each with new endings
    contexts = [text(rng.randint(*ctx_words)) for _ in range(max(n // 3, 1))]
    examples = []
    for i in range(n):
        base = rng.randint(*ending_words)
        endings = [text(rng.randint(max(1, base // 2), base + base // 2)) for _ in range(4)]
        examples.append({"ind": i, "activity_label": "test", "ctx": rng.choice(contexts), "endings": endings,
                         "label": rng.randrange(4), "split": "val"})
    return examples


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hs") / "hellaswag_val.jsonl", make_hellaswag())


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir)


# ------------------------------------------------------------------ PyTorch reference (build-nanogpt)
def reference_scores(hf_model, examples: list[dict], device: str = "cpu") -> list[dict]:
    """build-nanogpt's hellaswag.py scoring, one example (4 padded rows) per forward, in PyTorch on `device`."""
    import torch
    import torch.nn.functional as F

    out = []
    for ex in examples:
        ctx = encode(ex["ctx"])
        ends = [encode(" " + e) for e in ex["endings"]]
        width = max(len(ctx) + len(e) for e in ends)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, e in enumerate(ends):
            tokens[i, : len(ctx) + len(e)] = torch.tensor(ctx + e)
            mask[i, len(ctx) : len(ctx) + len(e)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.no_grad():
            logits = hf_model(tokens).logits.float()  # (a bfloat16 model's: its losses in float32, as ours)
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        summed = (losses * shift_mask).sum(dim=1)
        mean = summed / shift_mask.sum(dim=1)
        out.append({"losses": summed.tolist(), "mean_losses": mean.tolist(),
                    "predicted": summed.argmin().item(), "predicted_norm": mean.argmin().item()})
    return out


def test_logits_that_overflow_are_refused(tiny_hf_dir, fixture_file, tmp_path):
    """Finite weights whose logits overflow float32 scored NaN losses: argmin picked the first ending of each, and
    `eval loss` printed "val loss nan" with status 0."""
    from nanogpt_mlx.weights import save_model

    model = load_model(tiny_hf_dir)
    model.ln_f.weight, model.wte.weight = model.ln_f.weight * 1e38, model.wte.weight * 100  # finite; the logits not
    examples = load_hellaswag(fixture_file, limit=3)
    with pytest.raises(UserError, match=r"^the model's logits are NaN/inf on HellaSwag example \d: its activations "
                                        r"overflow \(a diverged or damaged model\)$"):
        score_hellaswag(model, examples, batch_examples=8, progress=False)
    np.save(tmp_path / "toy_val_000000.npy", np.random.default_rng(1).integers(0, 50257, 300).astype(np.uint16))
    save_model(model, tmp_path / "m")
    assert_one_line_error(run_cli("eval", "loss", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "--batches",
                                  "3", "--batch-size", "2", "--seq-len", "32"),
                          "the model's logits are NaN/inf on batch 1 of 3: its activations overflow")


def test_examples_outside_the_vocab_are_refused(fixture_file, tmp_path):
    small = GPT(GPTConfig(block_size=128, vocab_size=1000, n_layer=1, n_head=2, n_embd=32), seed=0)
    with pytest.raises(UserError, match="HellaSwag example 0: token id .* is outside the model's vocab_size of 1000"):
        score_hellaswag(small, load_hellaswag(fixture_file), progress=False)
    in_an_ending = write_jsonl(tmp_path / "ending.jsonl", [{"ctx": "a", "endings": ["a", "a", "hello", "a"],
                                                              "label": 0}])  # " hello" is id 23748, "a" id 64
    with pytest.raises(UserError, match=": token id 23748"):
        score_hellaswag(small, load_hellaswag(in_an_ending), progress=False)


def test_parity_with_pytorch_reference(tiny_hf_dir, fixture_file, model):
    from transformers import GPT2LMHeadModel

    raw = [json.loads(l) for l in fixture_file.read_text().splitlines()]
    ref = reference_scores(GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval(), raw)
    res = score_hellaswag(model, load_hellaswag(fixture_file), batch_examples=5, progress=False)
    assert [r.index for r in res.records] == list(range(len(raw)))
    for rec, want in zip(res.records, ref):
        assert rec.label == raw[rec.index]["label"]
        assert (rec.predicted, rec.predicted_norm) == (want["predicted"], want["predicted_norm"])
        np.testing.assert_allclose(rec.losses, want["losses"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(rec.mean_losses, want["mean_losses"], rtol=0, atol=1e-4)
    assert res.num_correct == sum(w["predicted"] == r["label"] for w, r in zip(ref, raw))
    assert res.num_correct_norm == sum(w["predicted_norm"] == r["label"] for w, r in zip(ref, raw))
    assert res.num_total == len(raw)  # the accuracies the CLI and training report are these counts' fractions
    assert (res.acc, res.acc_norm) == (res.num_correct / len(raw), res.num_correct_norm / len(raw))
    # the fixture exercises what it should: sum and mean disagree somewhere, endings differ in length
    assert any(w["predicted"] != w["predicted_norm"] for w in ref)
    assert len({n for rec in res.records for n in rec.num_tokens}) >= 5


def test_different_contexts_of_one_length_in_one_forward_equal_the_reference(tiny_hf_dir, model, tmp_path):
    """Examples are batched by context length: the fixture's contexts recur, so no forward held two different
    contexts, and a cache repeated in the wrong order (each example's endings after another's context) passed."""
    from transformers import GPT2LMHeadModel

    contexts = ["the man picks up the", "a dog jumps over a", "then the woman puts down"]
    assert len({len(encode(c)) for c in contexts}) == 1
    endings = ["ball", "roof slowly", "guitar", "kitchen then"]
    raw = [{"ctx": c, "endings": endings[i:] + endings[:i], "label": i} for i, c in enumerate(contexts)]
    ref = reference_scores(GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval(), raw)
    res = score_hellaswag(model, load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", raw)), batch_examples=8,
                          progress=False)
    for rec, want in zip(res.records, ref):
        np.testing.assert_allclose(rec.losses, want["losses"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("endings", [["cat", "dog runs", "a", "big tree"], ["cat", "dog", "a", "tree"]],
                         ids=["two-token-endings", "one-token-endings"])
def test_shortest_endings_equal_pytorch_reference(tiny_hf_dir, model, tmp_path, endings):
    """Endings of at most two tokens: the batch's only ending tokens past the first come from one more position
    (and with one-token endings from none)."""
    from transformers import GPT2LMHeadModel

    raw = [{"ctx": "the man picks up the", "endings": endings, "label": 1},
           {"ctx": "a woman throws the ball and", "endings": endings[::-1], "label": 0}]
    ref = reference_scores(GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval(), raw)
    res = score_hellaswag(model, load_hellaswag(write_jsonl(tmp_path / "short.jsonl", raw)), progress=False)
    assert max(n for rec in res.records for n in rec.num_tokens) == max(len(e.split()) for e in endings)
    for rec, want in zip(res.records, ref):
        np.testing.assert_allclose(rec.losses, want["losses"], rtol=0, atol=1e-4)


def test_padding_does_not_change_losses(fixture_file, model, monkeypatch):
    examples = load_hellaswag(fixture_file)
    one = score_hellaswag(model, examples, batch_examples=1, progress=False)
    calls, forward = [], GPT.__call__
    monkeypatch.setattr(GPT, "__call__", lambda self, *args, **kw: calls.append(1) or forward(self, *args, **kw))
    together = score_hellaswag(model, examples, batch_examples=len(examples), progress=False)
    assert 0 < len(calls) <= len(examples)  # one-by-one takes 2 per example: examples did share forwards
    for a, b in zip(one.records, together.records):
        assert (a.predicted, a.predicted_norm, a.num_tokens) == (b.predicted, b.predicted_norm, b.num_tokens)
        np.testing.assert_allclose(a.losses, b.losses, rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="batch_examples must be >= 1, got 0"):  # was taken as the default
        score_hellaswag(model, examples, batch_examples=0, progress=False)
    with pytest.raises(UserError, match="rank 3 of world 2"):
        score_hellaswag(model, examples, rank=3, world=2, progress=False)


def test_ranks_split_examples_and_their_counts_sum_to_the_whole(fixture_file, model):
    """What the Trainer sums over ranks (the counts) equals one process's result; every example is scored once."""
    examples = load_hellaswag(fixture_file, limit=11)
    full = score_hellaswag(model, examples, batch_examples=4, progress=False)
    parts = [score_hellaswag(model, examples, batch_examples=4, rank=r, world=3, progress=False) for r in range(3)]
    assert [p.num_total for p in parts] == [4, 4, 3]
    for count in ("num_total", "num_correct", "num_correct_norm"):
        assert sum(getattr(p, count) for p in parts) == getattr(full, count)
    assert sorted(r.index for p in parts for r in p.records) == list(range(11))


def test_after_batch_is_told_the_share_scored_so_far(fixture_file, model):
    """The ranks poll at fractions of their shares (evaluations.py): HellaSwag said 0 done after every batch, its
    bar being disabled (progress=False, the Trainer's), and the ranks stopped only at its end."""
    calls = []
    score_hellaswag(model, load_hellaswag(fixture_file, limit=11), batch_examples=4, rank=0, world=1,
                    progress=False, after_batch=lambda done, total: calls.append((done, total)))
    assert [total for _, total in calls] == [11] * len(calls) and calls[-1][0] == 11
    assert [done for done, _ in calls] == sorted({done for done, _ in calls}) and len(calls) >= 3


def test_two_files_examples_concatenated_are_scored_as_each_alone(fixture_file, model, tmp_path):
    """Both files number their examples from 0: each example is scored with its own endings, not another's."""
    a = load_hellaswag(fixture_file, limit=5)
    b = load_hellaswag(write_jsonl(tmp_path / "b.jsonl", make_hellaswag(5, seed=1)))
    alone = score_hellaswag(model, a, progress=False).records + score_hellaswag(model, b, progress=False).records
    together = score_hellaswag(model, a + b, batch_examples=3, progress=False).records
    assert [r.index for r in together] == [*range(5), *range(5)]
    for x, y in zip(alone, together):
        assert (x.label, x.predicted, x.predicted_norm, x.num_tokens) == (y.label, y.predicted, y.predicted_norm,
                                                                          y.num_tokens)
        np.testing.assert_allclose(x.losses, y.losses, rtol=0, atol=1e-4)
    ranks = [score_hellaswag(model, a + b, rank=r, world=2, progress=False) for r in range(2)]
    assert sum(p.num_total for p in ranks) == 10


def test_limit_and_records_file(fixture_file, model, tmp_path):
    """A blank line is skipped, and numbers no example: the records' indices count examples, not lines."""
    rows = fixture_file.read_text().splitlines(keepends=True)
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("".join(rows[:2] + ["\n"] + rows[2:]))
    res = score_hellaswag(model, load_hellaswag(spaced, limit=7), progress=False)
    assert res.num_total == 7 and 0 <= res.acc <= 1 and 0 <= res.acc_norm <= 1
    write_records(tmp_path / "out.jsonl", res.records)
    lines = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [l["index"] for l in lines] == list(range(7))
    assert all(len(l["losses"]) == 4 and l["predicted"] in range(4) for l in lines)


@pytest.mark.parametrize("call, needle", [
    (lambda m, f: load_hellaswag(f, "5"), "limit must be an integer, got '5'"),  # a TypeError
    (lambda m, f: load_hellaswag(f, 2.5), "limit must be an integer, got 2.5"),  # it read 3
    (lambda m, f: load_hellaswag(f, 0), "limit must be >= 1, got 0"),  # "no examples", of a file that has them
    (lambda m, f: score_hellaswag(m, load_hellaswag(f, 2), batch_examples=2.5, progress=False),
     "batch_examples must be an integer, got 2.5"),
], ids=["limit-str", "limit-float", "limit-0", "batch_examples-float"])
def test_count_arguments_of_the_wrong_type_are_one_line(fixture_file, model, call, needle):
    with pytest.raises(UserError, match=f"^{re.escape(needle)}$"):
        call(model, fixture_file)


@pytest.mark.parametrize("call, needle", [
    (lambda m, f: score_hellaswag(m, str(f), progress=False),
     "examples must be a list of HellaSwag Examples (load_hellaswag(path) reads them), got '"),
    (lambda m, f: score_hellaswag(m, f, progress=False), "examples must be a list of HellaSwag Examples"),
    (lambda m, f: score_hellaswag(m, [json.loads(f.read_text().splitlines()[0])], progress=False),
     "got a dict among them"),
    (lambda m, f: score_hellaswag(m, 5, progress=False), "got a int"),
    (lambda m, f: score_hellaswag(m, [], progress=False), "got none"),  # it gave acc 0.0
    (lambda m, f: score_hellaswag(str(f), load_hellaswag(f, 1), progress=False),
     "a GPT model is needed (load one with weights.load_model), got '"),
    (lambda m, f: eval_loss("out/cli", f.parent, progress=False), "a GPT model is needed"),
    (lambda m, f: loader_loss("out/cli", None, 1), "a GPT model is needed"),
    (lambda m, f: eval_loss(m, 5, progress=False), "the data directory must be a str or path, got 5"),
    (lambda m, f: load_hellaswag(123), "the HellaSwag file must be a str or path, got 123"),
    (lambda m, f: load_hellaswag(""), "the HellaSwag file is '' (an unset variable?); name a file"),
    (lambda m, f: perplexity("3"), "loss must be a number, got '3'"),
], ids=["path-str", "path", "dicts", "int", "none", "model-path", "eval_loss-model-path", "loader_loss-model-path",
        "data-int", "hellaswag-int", "hellaswag-empty", "perplexity-str"])
def test_python_arguments_of_the_wrong_type_are_one_line(fixture_file, model, call, needle):
    """A path where the examples or the model go, a number for the data directory: AttributeErrors ('ctx',
    'config') and TypeErrors from deep inside."""
    with pytest.raises(UserError, match=re.escape(needle)):
        call(model, fixture_file)


# ------------------------------------------------------------------------------------ bad input
GOOD = make_hellaswag(2)


def test_a_label_written_as_a_string_is_read_as_its_number(tmp_path):
    assert [ex.label for ex in load_hellaswag(write_jsonl(tmp_path / "s.jsonl", [{**GOOD[0], "label": "2"}]))] == [2]


@pytest.mark.parametrize("rows, needle", [
    ([GOOD[0], GOOD[1], '{"ctx": "a", "endings": [', GOOD[0]], ":3: not valid JSON"),
    ([GOOD[0], {**GOOD[1], "label": 4}], ":2: label 4 is not an integer 0..3"),
    ([{**GOOD[0], "label": -1}], ":1: label -1"),
    ([{**GOOD[0], "label": "\u00b2"}], ":1: label '\u00b2' is not an integer 0..3"),  # a digit to isdigit(), not int()
    ([{**GOOD[0], "endings": ["x", "y"]}], "'endings' must be a list of 4 strings"),
    ([{**GOOD[0], "endings": [*GOOD[0]["endings"], "x"]}], ":1: 'endings' must be a list of 4 strings"),
    ([{k: v for k, v in GOOD[0].items() if k != "ctx"}], "missing field 'ctx'"),
    (["[1, 2]"], "expected a JSON object"),
    ([""], "no examples"),
])
def test_bad_jsonl(tmp_path, rows, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as e:
        load_hellaswag(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_hellaswag(tmp_path / "nope.jsonl")


def test_examples_from_a_pipe(tmp_path):
    """`--data <(zcat hellaswag_val.jsonl.gz)` is a pipe, no regular file: it was 'file not found'."""
    fifo = tmp_path / "examples"
    os.mkfifo(fifo)
    text = write_jsonl(tmp_path / "good.jsonl", GOOD).read_text()
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    assert [e.ctx for e in load_hellaswag(fifo)] == [g["ctx"] for g in GOOD]
    writer.join()


def test_row_longer_than_context(tmp_path, model):
    long = {**GOOD[0], "ctx": "word " * 200}
    with pytest.raises(UserError, match="more than the model's context of 128"):
        score_hellaswag(model, load_hellaswag(write_jsonl(tmp_path / "long.jsonl", [long])), progress=False)
    # a row of exactly the context (126 context tokens + 2 ending tokens) fits, one more does not
    full = {"ctx": "word" + " word" * 125, "endings": ["dog runs", "a", "cat", "tree"], "label": 0}
    assert len(encode(full["ctx"])) == 126
    assert score_hellaswag(model, load_hellaswag(write_jsonl(tmp_path / "full.jsonl", [full])), progress=False
                           ).num_total == 1
    over = write_jsonl(tmp_path / "over.jsonl", [{**full, "ctx": full["ctx"] + " word"}])
    with pytest.raises(UserError, match="a row has 129 tokens"):
        score_hellaswag(model, load_hellaswag(over), progress=False)


# ------------------------------------------------------------------------------------- download
@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    """Serve a directory on 127.0.0.1 (a random free port) for the test's duration."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy set in the environment must not see these requests
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/cut-off":
                return super().do_GET()
            self.send_response(200)  # promises more than it sends, then hangs up
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b'{"ctx": "a man')
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_caches(http_dir, fixture_file, tmp_path):
    root, base = http_dir
    (root / "hellaswag_val.jsonl").write_bytes(fixture_file.read_bytes())
    dest = tmp_path / "cache" / "hellaswag_val.jsonl"
    assert download_hellaswag(f"{base}/hellaswag_val.jsonl", dest, progress=False) == dest
    assert dest.read_bytes() == fixture_file.read_bytes()
    (root / "hellaswag_val.jsonl").unlink()  # a second call must not fetch again
    assert download_hellaswag(f"{base}/hellaswag_val.jsonl", dest, progress=False) == dest
    assert [p.name for p in dest.parent.iterdir()] == ["hellaswag_val.jsonl"]  # no temp file left


def test_a_download_under_home_is_expanded(http_dir, fixture_file, tmp_path, monkeypatch):
    """A dest of `~/h.jsonl` was an AttributeError (a str has no is_file); a Path of it was written as ./~/h.jsonl."""
    root, base = http_dir
    (root / "hellaswag_val.jsonl").write_bytes(fixture_file.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for dest in ("~/h.jsonl", Path("~/p.jsonl")):
        got = download_hellaswag(f"{base}/hellaswag_val.jsonl", dest, progress=False)
        assert got == tmp_path / "home" / str(dest)[2:] and got.read_bytes() == fixture_file.read_bytes()
    assert not (tmp_path / "~").exists()


def test_download_failure_is_one_clear_line(http_dir, tmp_path):
    _, base = http_dir
    dest = tmp_path / "cache" / "hellaswag_val.jsonl"
    with pytest.raises(UserError, match="could not download HellaSwag .*pass --data FILE") as e:
        download_hellaswag(f"{base}/missing.jsonl", dest, progress=False)
    assert "404" in str(e.value) and not dest.exists()
    with pytest.raises(UserError, match="cut off after 14 of 100000 bytes; pass --data FILE"):
        download_hellaswag(f"{base}/cut-off", dest, progress=False)
    assert not dest.parent.exists() or not any(dest.parent.iterdir())  # no partial file kept
    with pytest.raises(UserError, match="pass --data FILE"):  # nothing listening: like being offline
        download_hellaswag("http://127.0.0.1:9/hellaswag_val.jsonl", dest, progress=False)


def test_a_download_that_is_no_hellaswag_is_not_kept(http_dir, fixture_file, tmp_path, monkeypatch):
    """A proxy's error page sent with 200 was cached and failed every later run, whatever the URL then."""
    root, base = http_dir
    (root / "page.html").write_text("<html>proxy login</html>\n")
    (root / "val.jsonl").write_bytes(fixture_file.read_bytes())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(UserError, match=r"page.html did not send HellaSwag \(the download:1: not valid JSON.*pass --data"):
        download_hellaswag(f"{base}/page.html", progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert download_hellaswag(f"{base}/val.jsonl", progress=False).read_bytes() == fixture_file.read_bytes()


# ------------------------------------------------------------------------------------ eval loss
def test_eval_loss_equals_direct_computation(tmp_path, tiny_hf_dir, model):
    import torch
    from transformers import GPT2LMHeadModel

    rng = np.random.default_rng(0)
    shards = [rng.integers(0, 50257, n).astype(np.uint16) for n in (200, 150)]
    for i, s in enumerate(shards):
        np.save(tmp_path / f"toy_val_{i:06d}.npy", s)
    np.save(tmp_path / "toy_train_000000.npy", shards[0])
    B, T = 2, 16
    # batches of B*T consecutive tokens, per shard: 6 from the first, 4 from the second, one pass = 10
    windows = [s[k * B * T : (k + 1) * B * T + 1] for s in shards for k in range((len(s) - 1) // (B * T))]
    hf = GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()
    losses = []
    with torch.no_grad():
        for w in windows:
            w = torch.tensor(w.astype(np.int64))
            logits = hf(w[:-1].view(B, T)).logits
            losses.append(torch.nn.functional.cross_entropy(logits.view(B * T, -1), w[1:]).item())
    assert eval_loss(model, tmp_path, "val", batches=8, B=B, T=T, progress=False) == \
        pytest.approx(float(np.mean(losses[:8])), abs=1e-4)
    # more batches than one pass holds: capped at one pass
    assert eval_loss(model, tmp_path, "val", batches=99, B=B, T=T, progress=False) == \
        pytest.approx(float(np.mean(losses)), abs=1e-4)
    # two ranks read alternate batches (0, 2 and 1, 3): their mean is the first four batches'
    ranks = [eval_loss(model, tmp_path, "val", batches=2, B=B, T=T, rank=r, world=2, progress=False) for r in (0, 1)]
    assert ranks[0] == pytest.approx(float(np.mean(losses[0:4:2])), abs=1e-4)
    assert ranks[1] == pytest.approx(float(np.mean(losses[1:4:2])), abs=1e-4)
    with pytest.raises(UserError, match="exceeds the model's context of 128"):
        eval_loss(model, tmp_path, "val", batches=1, B=1, T=129, progress=False)
    with pytest.raises(UserError, match="no test shards"):
        eval_loss(model, tmp_path, "test", progress=False)
    for rank, world in ((2, 2), (0, 0), (-1, 2)):  # world 0 divided by zero; rank 2 of 2 scored nothing
        with pytest.raises(UserError, match="expected 0 <= rank < world"):
            eval_loss(model, tmp_path, "val", batches=2, B=B, T=T, rank=rank, world=world, progress=False)
    for bad in ({"batches": 0}, {"batches": -3}, {"B": 0}, {"T": 0}):  # were a ZeroDivisionError, -0.0, the context
        with pytest.raises(UserError, match="must be >= 1"):
            eval_loss(model, tmp_path, "val", **{"batches": 2, "B": B, "T": T, **bad}, progress=False)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_hellaswag(tiny_hf_dir, model, fixture_file, tmp_path):
    out = tmp_path / "scores.jsonl"
    proc = run_cli("eval", "hellaswag", "--model", str(tiny_hf_dir), "--data", str(fixture_file),
                   "--limit", "10", "--batch-size", "3", "--output", str(out), check=True)
    scores = score_hellaswag(model, load_hellaswag(fixture_file, limit=10), progress=False)
    assert scores.acc != scores.acc_norm  # so that the two swapped are seen
    assert repr(scores) == (f"HellaSwagResult(acc={scores.acc:.4f}, acc_norm={scores.acc_norm:.4f}, num_total=10, "
                            "records=[10 ExampleScore])")  # not every record (a notebook cell shows it)
    assert f"hellaswag  10 examples  acc {scores.acc:.4f}  acc_norm {scores.acc_norm:.4f}  " in proc.stdout
    assert "acc_norm 0.2955" in proc.stdout and "0.337" in proc.stdout  # reference figures
    assert len(out.read_text().splitlines()) == 10


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_cli_hellaswag_writes_its_records_before_its_summary(tiny_hf_dir, fixture_file, tmp_path):
    """The summary was printed first: a stdout on a full disk (status 1) or closed by its reader (`| true`, status
    0) left no records file."""
    import subprocess
    import sys

    out = tmp_path / "scores.jsonl"
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", "eval", "hellaswag", "--model", str(tiny_hf_dir),
                               "--data", str(fixture_file), "--limit", "3", "--output", str(out)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 1 and "stdout: cannot write" in proc.stderr
    assert len(out.read_text().splitlines()) == 3


def test_cli_hellaswag_prints_its_summary_where_its_records_cannot_be_written(tiny_hf_dir, fixture_file, tmp_path,
                                                                              monkeypatch, capsys):
    """Records written first lost the summary where they could not be (the disk filled during the evaluation)."""
    from nanogpt_mlx import evaluate

    def full(path, records):
        raise UserError(f"{path}: cannot write (No space left on device)")

    monkeypatch.setattr(evaluate, "write_records", full)
    proc = run_main(capsys, "eval", "hellaswag", "--model", str(tiny_hf_dir), "--data", str(fixture_file),
                    "--limit", "3", "--output", str(tmp_path / "scores.jsonl"))
    assert proc.returncode == 1 and proc.stdout.startswith("hellaswag  3 examples  acc ")
    assert_one_line_error(proc, "scores.jsonl: cannot write (No space left on device)")


def test_cli_hellaswag_scores_batch_size_examples_a_forward(tiny_hf_dir, fixture_file, monkeypatch, capsys):
    from nanogpt_mlx import evaluate

    seen, score = [], evaluate.score_hellaswag
    monkeypatch.setattr(evaluate, "score_hellaswag",
                        lambda *a, **kw: seen.append(kw.get("batch_examples")) or score(*a, **kw))
    proc = run_main(capsys, "eval", "hellaswag", "--model", str(tiny_hf_dir), "--data", str(fixture_file),
                    "--limit", "4", "--batch-size", "3")
    assert proc.returncode == 0 and seen == [3]


def test_cli_hellaswag_downloads_into_cache(tiny_hf_dir, fixture_file, http_dir, tmp_path):
    root, base = http_dir
    (root / "val.jsonl").write_bytes(fixture_file.read_bytes())
    env = {"NANOGPT_MLX_HELLASWAG_URL": f"{base}/val.jsonl", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_cli("eval", "hellaswag", "--model", str(tiny_hf_dir), "--limit", "4", env=env, check=True)
    assert "hellaswag  4 examples" in proc.stdout
    cached, = (tmp_path / "cache" / "nanogpt-mlx" / "hellaswag").glob("*/hellaswag_val.jsonl")  # this URL's copy
    assert cached.read_bytes() == fixture_file.read_bytes()
    env["XDG_CACHE_HOME"] = str(tmp_path / "empty")
    env["NANOGPT_MLX_HELLASWAG_URL"] = "http://127.0.0.1:9/val.jsonl"
    assert_one_line_error(run_cli("eval", "hellaswag", "--model", str(tiny_hf_dir), env=env),
                          "could not download HellaSwag", "--data")


@pytest.mark.parametrize("where, needle", [
    ("", "the records file is '' (an unset variable?); name a file"),  # a ValueError's traceback
    (".", ".: is a directory (the records file is a file)"),
    ("a-file/out.jsonl", "out.jsonl: cannot write"),
])
def test_records_are_written_only_to_a_file(where, needle, tmp_path, monkeypatch):
    """write_records checks its path as the CLI's --output does (the CLI alone checked it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match=re.escape(needle)):
        write_records(where, [])


def test_records_and_their_data_under_home_are_expanded(tmp_path, monkeypatch, capsys):
    """write_records to `~/r.jsonl` wrote ./~/r.jsonl; and an --output of `~/FILE` that is the --data file was not
    seen as such (the records would have replaced the examples)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    write_records("~/r.jsonl", [])
    assert (tmp_path / "home" / "r.jsonl").is_file() and not (tmp_path / "~").exists()
    write_jsonl(tmp_path / "home" / "good.jsonl", GOOD)
    assert_one_line_error(run_main(capsys, "eval", "hellaswag", "--model", str(tmp_path / "no-model"), "--data",
                                   "~/good.jsonl", "--output", "~/good.jsonl"), "is the --data file")


def test_cli_bad_inputs(tiny_hf_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], "{not json"])
    assert_one_line_error(run_cli("eval", "hellaswag", "--model", str(tiny_hf_dir), "--data", str(bad)),
                          f"{bad}:2: not valid JSON")
    assert_one_line_error(run_cli("eval", "hellaswag", "--data", str(tmp_path / "none.jsonl")), "file not found")
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    assert_one_line_error(run_cli("eval", "hellaswag", "--model", str(tmp_path / "no-model"), "--data", str(good),
                                  "--output", str(tmp_path)), "is a directory")  # before the model is even loaded
    assert_one_line_error(run_cli("eval", "hellaswag", "--model", str(tmp_path / "no-model"), "--data", str(good),
                                  "--output", str(good)), "is the --data file")  # it would replace the examples
    assert_one_line_error(run_cli("eval", "loss", "--model", str(tiny_hf_dir), "--data", str(tmp_path / "nodir")),
                          "data directory not found")


def test_cli_hellaswag_refuses_an_empty_data_path(tmp_path, monkeypatch, capsys):
    """`--data ''` (an unset variable) was taken as no --data: HellaSwag was downloaded instead."""
    from nanogpt_mlx import evaluate

    def download(*a, **kw):
        raise AssertionError("downloaded HellaSwag for --data ''")

    monkeypatch.setattr(evaluate, "download_hellaswag", download)
    for more in ((), ("--output", str(tmp_path / "scores.jsonl"))):
        proc = run_main(capsys, "eval", "hellaswag", "--model", str(tmp_path / "no-model"), "--data", "", *more)
        assert_one_line_error(proc, "the HellaSwag file (--data) is '' (an unset variable?); name a file")


def test_cli_loss_checks_its_data_before_loading_the_model(tmp_path, capsys):
    """The model was loaded first: a mistyped --data with the default gpt2 uncached was said as a model that cannot
    be downloaded (online, ~500 MB were downloaded before the typo was said)."""
    no_model = str(tmp_path / "no-model")
    assert_one_line_error(run_main(capsys, "eval", "loss", "--model", no_model, "--data", str(tmp_path / "typo_dir")),
                          "typo_dir: data directory not found")
    np.save(tmp_path / "toy_train_000000.npy", np.zeros(300, np.uint16))
    assert_one_line_error(run_main(capsys, "eval", "loss", "--model", no_model, "--data", str(tmp_path)),
                          "no val shards")


def test_cli_loss(tiny_hf_dir, model, tmp_path):
    np.save(tmp_path / "toy_val_000000.npy", np.random.default_rng(1).integers(0, 50257, 300).astype(np.uint16))
    proc = run_cli("eval", "loss", "--model", str(tiny_hf_dir), "--data", str(tmp_path), "--batches", "3",
                   "--batch-size", "2", "--seq-len", "32", check=True)
    want = eval_loss(model, tmp_path, batches=3, B=2, T=32, progress=False)
    assert f"val loss {want:.4f}  perplexity {np.exp(want):.2f}  (3 batches of 2x32 tokens" in proc.stdout
    np.save(tmp_path / "toy_train_000001.npy", np.random.default_rng(2).integers(0, 50257, 300).astype(np.uint16))
    proc = run_cli("eval", "loss", "--model", str(tiny_hf_dir), "--data", str(tmp_path), "--split", "train",
                   "--batches", "3", "--batch-size", "2", "--seq-len", "32", check=True)
    want = eval_loss(model, tmp_path, "train", batches=3, B=2, T=32, progress=False)
    assert f"train loss {want:.4f}" in proc.stdout
    # more batches than the split holds: each of its 4 once (wrapping around would count some twice)
    proc = run_cli("eval", "loss", "--model", str(tiny_hf_dir), "--data", str(tmp_path), "--batches", "50",
                   "--batch-size", "2", "--seq-len", "32", check=True)
    want = eval_loss(model, tmp_path, batches=4, B=2, T=32, progress=False)
    assert f"val loss {want:.4f}  perplexity {np.exp(want):.2f}  (4 batches of 2x32 tokens" in proc.stdout


def test_cli_evaluates_in_the_dtype_asked(tiny_hf_dir, fixture_file, tmp_path):
    """--dtype bfloat16: the model's weights and computation in bfloat16 (as load_model(..., "bfloat16")), said on
    the result's line; float32 is the CPU profile's default."""
    from nanogpt_mlx.weights import load_model

    np.save(tmp_path / "toy_val_000000.npy", np.random.default_rng(1).integers(0, 50257, 300).astype(np.uint16))
    args = ("eval", "loss", "--model", str(tiny_hf_dir), "--data", str(tmp_path), "--batches", "3", "--batch-size",
            "2", "--seq-len", "32")
    f32, b16 = (load_model(tiny_hf_dir, dtype) for dtype in ("float32", "bfloat16"))
    loss32, loss16 = (eval_loss(m, tmp_path, batches=3, B=2, T=32, progress=False) for m in (f32, b16))
    assert loss32 != loss16 and loss32 == pytest.approx(loss16, abs=0.05)
    assert f"val loss {loss32:.4f}" in run_cli(*args, check=True).stdout
    proc = run_cli(*args, "--dtype", "bfloat16", check=True)
    assert f"val loss {loss16:.4f}" in proc.stdout and "2x32 tokens from" in proc.stdout
    assert proc.stdout.rstrip().endswith(", bfloat16)") and "bfloat16 is slow on MLX's CPU backend" in proc.stderr
    proc = run_cli("eval", "hellaswag", "--model", str(tiny_hf_dir), "--data", str(fixture_file), "--limit", "4",
                   "--dtype", "bfloat16", check=True)
    scores = score_hellaswag(b16, load_hellaswag(fixture_file, limit=4), progress=False)
    assert f"acc_norm {scores.acc_norm:.4f}  (bfloat16, " in proc.stdout
    # a GPU profile's default (forced on the CPU: its kernels, the same loss within bfloat16's rounding)
    proc = run_cli(*args, check=True, env={"NANOGPT_MLX_PROFILE": "cuda"})
    assert proc.stdout.rstrip().endswith(", bfloat16)") and "slow" not in proc.stderr
    assert float(proc.stdout.split()[2]) == pytest.approx(loss16, abs=0.02)
    assert "(default: bfloat16, the cuda profile's)" in " ".join(
        run_cli("sample", "--help", check=True, env={"NANOGPT_MLX_PROFILE": "cuda"}).stdout.split())


def test_a_stderr_whose_reader_is_gone_costs_no_result(tiny_hf_dir, tmp_path):
    """`eval loss ... 2> >(head -c 1)`: the progress bar drew on a pipe that is not a terminal, and its broken pipe
    ended the command with status 0 before the result was printed."""
    import os
    import subprocess
    import sys

    np.save(tmp_path / "toy_val_000000.npy", np.random.default_rng(1).integers(0, 50257, 300).astype(np.uint16))
    read, write = os.pipe()
    os.close(read)  # every write to stderr: EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", "eval", "loss", "--model", str(tiny_hf_dir),
                               "--data", str(tmp_path), "--batches", "3", "--batch-size", "2", "--seq-len", "32"],
                              stdout=subprocess.PIPE, stderr=write, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 0 and "val loss " in proc.stdout, proc.stdout


def test_a_json_line_nested_too_deeply_is_one_line(tmp_path):
    """A RecursionError traceback from json, in HellaSwag's reader, prepare's jsonl reader and a resumed log; and
    json's ValueError for an integer of over 4300 digits, in HellaSwag's."""
    from nanogpt_mlx import prepare, sources
    from nanogpt_mlx.checkpoint import RunLog
    from nanogpt_mlx.evaluate import load_hellaswag

    deep = "[" * 100_000 + "]" * 100_000 + "\n"
    (tmp_path / "h.jsonl").write_text(deep)
    with pytest.raises(UserError, match="not valid JSON"):
        load_hellaswag(tmp_path / "h.jsonl")
    if not hasattr(sys, "get_int_max_str_digits"):  # (Python 3.10.0-3.10.6 convert integers of any length)
        return
    (tmp_path / "big.jsonl").write_text('{"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 1' + "0" * 5000 + "}")
    with pytest.raises(UserError, match=r"big.jsonl:1: not valid JSON \(Exceeds the limit \(4300 digits\) for "
                                        r"integer string conversion: value has 5001 digits\)$"):
        load_hellaswag(tmp_path / "big.jsonl")
    with pytest.raises(UserError, match="line 1: not valid JSON"):
        prepare.prepare(sources.local_files([tmp_path / "h.jsonl"]), tmp_path / "out", prepare.PrepareConfig(workers=1))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text('{"step": 0, "kind": "train"}\n' + deep)
    RunLog(tmp_path / "run", 5, True)  # the deep line dropped as a torn one
    assert (tmp_path / "run" / "log.jsonl").read_text() == '{"step": 0, "kind": "train"}\n'


def test_perplexity_of_a_nan_loss_is_nan():
    """It was inf: "val loss nan perplexity inf" read as a loss too large, not a broken one. A large loss's is inf
    only past what a float holds."""
    assert np.isnan(perplexity(float("nan")))
    assert perplexity(1000.0) == float("inf") and perplexity(0.0) == 1.0
    assert perplexity(100.0) == pytest.approx(math.exp(100)) and perplexity(709.0) == pytest.approx(math.exp(709))
    assert perplexity(710.0) == perplexity(float("inf")) == float("inf") and perplexity(float("-inf")) == 0.0
    assert perplexity(mx.array(2.0)) == perplexity(np.float32(2.0)) == pytest.approx(math.exp(2))  # a model's loss


def test_a_hellaswag_file_with_a_byte_order_mark_is_read(tmp_path):
    """A JSONL file saved with a UTF-8 byte order mark (some Windows editors) was refused: "Unexpected UTF-8 BOM"."""
    plain = write_jsonl(tmp_path / "plain.jsonl", GOOD)
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_hellaswag(marked) == load_hellaswag(plain)
