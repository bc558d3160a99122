"""Tokenisation throughput of `prepare` vs build-nanogpt's fineweb.py approach, on the same local jsonl.

Input: Tiny Shakespeare paragraphs repeated into ~--mb MB of jsonl ({"text": ...} per line).
- single process: a loop of `encode_ordinary` over documents already in memory (the per-core ceiling);
- build-nanogpt: the main process iterates the documents (parsing the jsonl, or from a list of dicts
  already in memory, which favours the baseline) and a multiprocessing Pool tokenizes them one by one
  (imap, chunksize 16), each returned as a pickled uint16 array and copied into the shard buffer;
- prepare: this project (workers read and tokenize their own parts of the file).
All pipelines write one 1e8-token shard; timings are the best of --repeat runs; "vs build-nanogpt" is
relative to the faster build-nanogpt variant with the same number of workers.

    flock /tmp/nanogpt-cpu.lock python benchmarks/bench_prepare.py --text /work/shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import tempfile
import time
from pathlib import Path


import numpy as np

import nanogpt_mlx  # noqa: F401  (package setup first)
from nanogpt_mlx.prepare import PrepareConfig, prepare
from nanogpt_mlx.sources import local_files
from nanogpt_mlx.tokenizer import EOT, get_tokenizer
from nanogpt_mlx.arguments import positive_float, positive_int

SHARD_SIZE = 100_000_000
BASE_JSONL = "build-nanogpt Pool, reading the jsonl"
BASE_MEMORY = "build-nanogpt Pool, documents in memory"


def make_jsonl(text_file: Path, path: Path, mb: float) -> int:
    paragraphs = [p for p in re.split(r"\n\s*\n", text_file.read_text()) if p.strip()]
    lines = [json.dumps({"text": p}) + "\n" for p in paragraphs]
    block = "".join(lines)
    reps = max(1, round(mb * 1e6 / len(block.encode())))
    path.write_text(block * reps)
    return len(lines) * reps


def _baseline_tokenize(doc: dict) -> np.ndarray:
    """build-nanogpt's fineweb.py `tokenize`."""
    tokens = [EOT]
    tokens.extend(get_tokenizer().encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2**16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def baseline(docs, out: Path, workers: int) -> int:
    """build-nanogpt's fineweb.py main loop over `docs` (dicts) instead of `datasets` (no progress bar)."""
    out.mkdir(parents=True, exist_ok=True)
    buf = np.empty((SHARD_SIZE,), dtype=np.uint16)
    count = index = total = 0
    with mp.Pool(workers) as pool:
        for tokens in pool.imap(_baseline_tokenize, docs, chunksize=16):
            total += len(tokens)
            if count + len(tokens) < SHARD_SIZE:
                buf[count : count + len(tokens)] = tokens
                count += len(tokens)
            else:
                remainder = SHARD_SIZE - count
                buf[count:] = tokens[:remainder]
                np.save(out / f"base_{'val' if index == 0 else 'train'}_{index:06d}", buf)
                index += 1
                buf[: len(tokens) - remainder] = tokens[remainder:]
                count = len(tokens) - remainder
    if count:
        np.save(out / f"base_{'val' if index == 0 else 'train'}_{index:06d}", buf[:count])
    return total


def single_process(docs: list[str]) -> int:
    enc = get_tokenizer()
    return sum(len(enc.encode_ordinary(d)) + 1 for d in docs)


def ours(jsonl: Path, out: Path, workers: int) -> int:
    summary = prepare(local_files([jsonl]), out, PrepareConfig(workers=workers, progress=False))
    return summary.new_tokens


def best_of(repeat: int, run, out: Path | None = None) -> tuple[int, float]:
    """(tokens, seconds) of the fastest of `repeat` calls of `run()`; `out` is emptied after each."""
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        n = run()
        seconds = time.perf_counter() - start
        best = (n, seconds) if best is None or seconds < best[1] else best
        if out is not None:
            shutil.rmtree(out)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True, help="real text to repeat (e.g. tinyshakespeare.txt)")
    ap.add_argument("--mb", type=positive_float, default=50, help="MB of jsonl to tokenize (default: 50)")
    ap.add_argument("--workers", type=positive_int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="worker counts to time (default: 1 and the cores)")
    ap.add_argument("--repeat", type=positive_int, default=2, help="runs of each, the best counts (default: 2)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "docs.jsonl"
        n_docs = make_jsonl(args.text, jsonl, args.mb)
        print(f"input: {jsonl.stat().st_size / 1e6:.1f} MB jsonl, {n_docs:,} documents; "
              f"{os.cpu_count()} cores; best of {args.repeat}")
        records = [json.loads(line) for line in open(jsonl)]
        texts = [r["text"] for r in records]
        single = best_of(args.repeat, lambda: single_process(texts))
        single_rate = single[0] / single[1]
        rows = [("single process encode_ordinary loop", 1, *single)]
        b, o = tmp / "b", tmp / "o"
        for w in args.workers:
            rows += [
                (BASE_JSONL, w, *best_of(args.repeat, lambda: baseline((json.loads(l) for l in open(jsonl)), b, w), b)),
                (BASE_MEMORY, w, *best_of(args.repeat, lambda: baseline(records, b, w), b)),
                ("prepare (this project)", w, *best_of(args.repeat, lambda: ours(jsonl, o, w), o)),
            ]

    # the ratio is to the faster build-nanogpt variant with the same workers
    base = {w: max(n / s for name, w2, n, s in rows if name.startswith("build") and w2 == w) for w in args.workers}
    print(f"\n{'method':<46}{'workers':>8}{'tokens':>13}{'seconds':>9}{'M tok/s':>9}"
          f"{'vs build-nanogpt':>18}{'vs 1-proc x workers':>21}")
    for name, w, n, s in rows:
        rate = n / s
        vs_base = f"{rate / base[w]:.2f}x" if not name.startswith("single") else "-"
        print(f"{name:<46}{w:>8}{n:>13,}{s:>9.2f}{rate / 1e6:>9.2f}{vs_base:>18}{rate / (single_rate * w):>20.0%}")


if __name__ == "__main__":
    main()
