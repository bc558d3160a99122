"""Tokenisation throughput of `prepare` vs build-nanogpt's fineweb.py approach, on the same local jsonl.

Input: Tiny Shakespeare paragraphs repeated into ~--mb MB of jsonl ({"text": ...} per line).
- single process: a loop of `encode_ordinary` over documents already in memory (the per-core ceiling);
- build-nanogpt: the main process reads every document and a multiprocessing Pool tokenizes them one by
  one (imap, chunksize 16), each returned as a pickled uint16 array and copied into the shard buffer;
- prepare: this project (workers read and tokenize their own parts of the file).
Both pipelines write one 1e8-token shard; timings are the best of --repeat runs.

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
from nanogpt_mlx.prepare import PrepareConfig, local_files, prepare
from nanogpt_mlx.tokenizer import EOT, get_tokenizer

SHARD_SIZE = 100_000_000


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


def baseline(jsonl: Path, out: Path, workers: int) -> int:
    """build-nanogpt's fineweb.py main loop over a local jsonl instead of `datasets` (no progress bar)."""
    out.mkdir(parents=True, exist_ok=True)
    docs = (json.loads(line) for line in open(jsonl))
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


def best_of(repeat: int, fn, *args) -> tuple[int, float]:
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        n = fn(*args)
        seconds = time.perf_counter() - start
        best = (n, seconds) if best is None or seconds < best[1] else best
        for a in args:
            if isinstance(a, Path) and a.is_dir():
                shutil.rmtree(a)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True, help="real text to repeat (e.g. tinyshakespeare.txt)")
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "docs.jsonl"
        n_docs = make_jsonl(args.text, jsonl, args.mb)
        print(f"input: {jsonl.stat().st_size / 1e6:.1f} MB jsonl, {n_docs:,} documents; "
              f"{os.cpu_count()} cores; best of {args.repeat}")
        single = best_of(args.repeat, single_process, [json.loads(line)["text"] for line in open(jsonl)])
        single_rate = single[0] / single[1]
        rows = [("single process encode_ordinary loop", 1, *single)]
        for w in args.workers:
            rows.append(("build-nanogpt Pool.imap, chunksize 16", w, *best_of(args.repeat, baseline, jsonl, tmp / "b", w)))
            rows.append(("prepare (this project)", w, *best_of(args.repeat, ours, jsonl, tmp / "o", w)))

    base = {w: n / s for name, w, n, s in rows if name.startswith("build")}
    print(f"\n{'method':<40}{'workers':>8}{'tokens':>13}{'seconds':>9}{'M tok/s':>9}"
          f"{'vs build-nanogpt':>18}{'vs 1-proc x workers':>21}")
    for name, w, n, s in rows:
        rate = n / s
        vs_base = f"{rate / base[w]:.2f}x" if not name.startswith("single") else "-"
        print(f"{name:<40}{w:>8}{n:>13,}{s:>9.2f}{rate / 1e6:>9.2f}{vs_base:>18}{rate / (single_rate * w):>20.0%}")


if __name__ == "__main__":
    main()
