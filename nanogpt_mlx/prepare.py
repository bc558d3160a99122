"""Dataset preparation: text -> GPT-2 token shards in build-nanogpt's format (what data.py reads).

Shards are uint16 `.npy` files `{name}_{split}_{index:06d}.npy` of `shard_size` tokens (the last one
shorter) with `<|endoftext|>` before every document; shard 0 is `val`, the rest `train` (a source of at most one
shard: its first tenth val, the rest train, shards.ShardWriter._split_small; Tiny Shakespeare: its last tenth
val, as many shards as it fills, then its first nine tenths train); `manifest.json` describes them (shards.py).
Sources: FineWeb-Edu (hub or a local mirror), Tiny Shakespeare, your own files.

Parallelism: every input file is cut into parts (documents.py: jsonl byte ranges, parquet row groups,
whole txt files) that worker processes read and tokenize by themselves, so only a small part description
goes in and one uint16 array comes out (build-nanogpt pickles every document both ways). Results are
consumed in part order, so the shards do not depend on the number of workers.

Resuming: a shard is written atomically, then recorded in the manifest with the position where the
next one starts (file, part, token offset). A re-run verifies the recorded shards (shards.resume) and continues
after the last intact one. Hub files are downloaded file by file (the next one while the current one is
tokenized) and deleted once tokenized, so at most two are on disk (_Downloads).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import device, signals
from .console import bar_off, counted, warn
from .documents import Part, plan_parts, read_docs
from .errors import UserError, check_types
from .files import named_dir, user_path
from .locks import LOCK_FILE, lock_dir, unlock_dir
from .shards import FORMAT, ShardWriter, complete, resume, warn_of_thin_splits, write_manifest
from .sources import Source, Unit
from .tokenizer import EOT, EOT_TEXT, get_tokenizer

MAX_SHARD_SIZE = 2**31  # tokens: 4 GB of uint16 in memory while a shard is written
SCRATCH = ".download"  # hub files being tokenized, inside the output directory
BROKEN_POOL = ("a tokenizer process died (out of memory? with the spawn start method, as on macOS and Windows, "
               "call prepare() under `if __name__ == '__main__':`)")


@dataclass
class PrepareConfig:
    shard_size: int = 100_000_000  # tokens per shard (build-nanogpt: 1e8)
    workers: int | None = None  # tokenizer processes; None: all cores
    shuffle_docs: bool = False  # shuffle file order, part order within a file, documents within a part
    seed: int = 0  # of shuffle_docs; another without it is refused
    name: str | None = None  # shard file prefix; None: the source's
    part_bytes: int = 2 << 20  # jsonl and text files are cut into parts of about this size
    progress: bool = True

    def __post_init__(self):
        check_types(self)
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            raise UserError(f"shard_size must be in [1, 2^31] tokens (a shard is held in memory while written), "
                            f"got {self.shard_size}")
        if (self.workers is not None and self.workers < 1) or self.part_bytes < 1:
            raise UserError(f"workers and part_bytes must be >= 1, got {self.workers} and {self.part_bytes}")
        if self.seed < 0:
            raise UserError(f"seed must be >= 0, got {self.seed}")
        if self.seed != PrepareConfig.seed and not self.shuffle_docs:  # it would be ignored (the manifest says null)
            raise UserError(f"seed orders shuffle_docs (seed={self.seed} without shuffle_docs=True); pass both or "
                            "neither")
        if self.name is not None and (not self.name or self.name[0] == "." or any(c in self.name for c in "/\\\0")):
            raise UserError(f"name {self.name!r}: shards are files NAME_val_000000.npy, NAME_train_000001.npy, ... in "
                            "the output directory: a NAME has no '/' (nor a NUL byte) and does not start with '.' "
                            "(hidden files are not read)")


# ------------------------------------------------------------------------------------ tokenizing
def encode_docs(docs: list[str]) -> np.ndarray:
    """`[EOT, *encode_ordinary(doc)]` for each document, concatenated, as uint16.

    tiktoken encodes the text between allowed special tokens piece by piece, exactly as
    `encode_ordinary` would, so one call on the documents joined by the EOT string gives the same
    ids without a Python call and a list of Python ints per document (see benchmarks/bench_prepare.py).
    If a document contains the EOT string as text, they are encoded one by one instead.
    """
    enc = get_tokenizer()
    text = "".join(EOT_TEXT + doc for doc in docs)
    if text.count(EOT_TEXT) == len(docs):  # the EOT string cannot overlap itself, so only ours are found
        try:
            ids = enc.encode_to_numpy(text, allowed_special={EOT_TEXT})
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud83d", half an emoji): repaired as encode_ordinary does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = enc.encode_to_numpy(text, allowed_special={EOT_TEXT})
    else:
        ids = [t for doc in docs for t in (EOT, *enc.encode_ordinary(doc))]
    return np.asarray(ids, dtype=np.uint16)  # GPT-2 ids are < 50257: uint16 is exact


def tokenize_part(task: tuple[Part, tuple[int, ...] | None]) -> tuple[np.ndarray, int]:
    """Tokens of one part and the count of documents that start in it. With a shuffle key, the documents are
    permuted first, seeded by the key (so every worker count gives the same order)."""
    part, shuffle_key = task
    docs = read_docs(part)
    if shuffle_key is not None:
        docs = [docs[i] for i in np.random.default_rng(shuffle_key).permutation(len(docs))]
    continued = part.continues and bool(docs)  # (the one document of a .txt's part after its first)
    return encode_docs(docs)[int(continued):], len(docs) - continued


def _init_worker(parent: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the main process stops them (cli.py), and
        signal.signal(signum, signal.SIG_IGN)  # they end with it (_exit_with)
    get_tokenizer()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """Workers of a main process killed with -9 would otherwise wait for work forever."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


# ---------------------------------------------------------------------------------- pipeline
@dataclass
class Summary:
    out: Path
    manifest: dict
    new_tokens: int  # tokenized by this run (0 when everything was done already)
    seconds: float

    def __str__(self) -> str:
        t = self.manifest["totals"]
        n_val = sum(s["split"] == "val" for s in self.manifest["shards"])
        text = (f"{self.out}: {counted(t['shards'], 'shard')} ({n_val} val, {t['shards'] - n_val} train), "
                f"{t['val_tokens']:,} val + {t['train_tokens']:,} train tokens, {counted(t['documents'], 'document')}")
        if self.new_tokens:
            text += (f"; tokenized {counted(self.new_tokens, 'token')} in {self.seconds:.1f}s "
                     f"({self.new_tokens / max(self.seconds, 1e-9) / 1e6:.2f} M tokens/s)")
        else:
            text += "; already complete"
        return text

    def __repr__(self) -> str:  # (a notebook's cell showed the whole manifest, every shard's sha256)
        return f"Summary({self})"


class _Downloads:
    """Room for two downloaded files on disk: the one being tokenized and the next. A download waits for room (take),
    which a file makes when all its parts are tokenized (it is deleted then), not when their tokens are used: parts
    are tokenized ahead of that, so three files' could be in flight, and the thread that uses them may be the one
    waiting for the download."""

    def __init__(self):
        self.room, self.closed = 2, False
        self.left: dict[int, list] = {}  # unit: [its file (None: kept), its parts not yet tokenized]
        self.changed = threading.Condition()

    def take(self) -> bool:
        """Wait for room for a file; False once the run has ended (close)."""
        with self.changed:
            self.changed.wait_for(lambda: self.room or self.closed)
            self.room -= not self.closed
            return not self.closed

    def expect(self, unit: int, path: Path, parts: int) -> None:
        """Unit `unit`'s file `path` is read by `parts` parts yet (none: deleted now)."""
        with self.changed:
            self.left[unit] = [path, parts + 1]  # and this call, which ends now
        self.tokenized(unit)

    def tokenized(self, unit: int, ok: bool = True) -> None:
        """A part of unit `unit` is tokenized (a local file's: nothing to do). After its last, the file is deleted,
        unless a part failed: it is kept for the re-run, which the error asks for."""
        with self.changed:
            if unit not in self.left:
                return
            file = self.left[unit]
            file[0], file[1] = file[0] if ok else None, file[1] - 1
            if file[1]:
                return
            del self.left[unit]
            if file[0] is not None:
                with contextlib.suppress(OSError):  # (a callback's error would be lost, and the room with it)
                    file[0].unlink(missing_ok=True)
            self.room += 1
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()


def _parts(units: list[Unit], start: dict, scratch: Path, cfg: PrepareConfig,
           downloads: _Downloads) -> Iterator[tuple[tuple, tuple]]:
    """((unit, part, Part), task) from `start` on; the next file is fetched in the background."""
    fetch = functools.partial(_fetch_in_background, scratch=scratch, downloads=downloads)
    fetching = fetch(units[start["unit"]]) if start["unit"] < len(units) else None
    for u in range(start["unit"], len(units)):
        path = fetching()
        fetching = fetch(units[u + 1]) if u + 1 < len(units) else None
        parts = plan_parts(units[u], path, cfg.part_bytes)
        keys = [None] * len(parts)
        if cfg.shuffle_docs and not any(part.continues for part in parts):  # (a document cut into parts keeps them)
            keys = [(cfg.seed, u, p) for p in range(len(parts))]
            order = np.random.default_rng([cfg.seed, u]).permutation(len(parts))
            parts, keys = [parts[i] for i in order], [keys[i] for i in order]
        first = start["part"] if u == start["unit"] else 0
        if units[u].temporary:
            downloads.expect(u, path, len(parts) - first)
        for p in range(first, len(parts)):
            yield (u, p, parts[p]), (parts[p], keys[p])


def _fetch_in_background(unit: Unit, scratch: Path, downloads: _Downloads) -> Callable[[], Path]:
    """Start `unit.fetch` in a daemon thread (Ctrl-C must not wait for a download), a download once there is room
    for it; returns a getter."""
    box: dict = {}

    def run() -> None:
        try:
            if not unit.temporary or downloads.take():  # (else the run has ended: nothing waits for the file)
                box["path"] = unit.fetch(scratch)
        except BaseException as e:  # re-raised in the main thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def get() -> Path:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["path"]
    return get


def _in_order(tasks: Iterator, pool: cf.Executor | None, window: int,
              done: Callable[[tuple, bool], None]) -> Iterator:
    """(item, tokenize_part(task)) for (item, task) in tasks, in order, at most `window` in flight; done(item, ok)
    as soon as a task has ended (in another thread), before its result is used."""
    if pool is None:
        for item, task in tasks:
            result = tokenize_part(task)
            done(item, True)
            yield item, result
        return
    pending: deque = deque()
    for item, task in tasks:
        future = pool.submit(tokenize_part, task)
        future.add_done_callback(lambda f, item=item: f.cancelled() or done(item, f.exception() is None))
        pending.append((item, future))
        if len(pending) >= window:
            item, future = pending.popleft()
            yield item, future.result()
    while pending:
        item, future = pending.popleft()
        yield item, future.result()


def _start_pool(workers: int) -> cf.ProcessPoolExecutor | None:
    """Worker processes, started now: forking once threads exist (progress bar, downloads) is unsafe."""
    get_tokenizer()  # built once here; forked workers inherit it
    if workers == 1:
        return None
    pool = cf.ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        pool.submit(int).result()
    except BaseException as e:  # a Ctrl-C or SIGTERM too: a pool left to exit was joined there, unshut
        _stop_pool(pool)
        if isinstance(e, cf.BrokenExecutor):
            raise UserError(BROKEN_POOL) from None
        raise
    return pool


def _stop_pool(pool: cf.ProcessPoolExecutor | None) -> None:
    """Stop the workers (their parts in hand finished). A second Ctrl-C here left the workers waiting for work and
    the exit waiting for them; a pool not stopped (a Ctrl-C while it started) was left to Python's exit, whose join
    a second Ctrl-C broke with a traceback (or 3.11's race of the pool's wakeup pipe did, without one)."""
    if pool is not None:
        with signals.deferred(signal.SIGINT):
            pool.shutdown(cancel_futures=True)


def prepare(source: Source, out: str | os.PathLike, config: PrepareConfig | None = None) -> Summary:
    """Tokenize `source` into shards under `out`, resuming an interrupted run with the same settings.

    Uses worker processes; with the spawn start method (macOS, Windows) call it under
    `if __name__ == "__main__":` as for any multiprocessing code. A second prepare into the same `out` while
    this one runs is refused (locks.lock_dir).
    """
    if not isinstance(source, Source):  # a path to the text was an AttributeError deep inside
        raise UserError(f"source must be a Source (sources.local_files(paths), sources.shakespeare(), "
                        f"sources.fineweb_edu()), got {source!r}")
    if config is not None and not isinstance(config, PrepareConfig):
        raise UserError(f"config must be a PrepareConfig, got {config!r}")
    if config is not None and config.shuffle_docs and not source.shuffles:
        raise UserError(f"shuffle_docs: {source.label} is one text split by position, with no documents to shuffle")
    out = user_path(named_dir(out, "shard directory"))
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: not a directory")
    created = not out.exists()
    lock_dir(out, "prepare")
    try:
        return _prepare(source, out, config or PrepareConfig())
    except BaseException:
        # a directory made for nothing (an empty source, a bad first file) would be left holding a manifest of no
        # shards; one that holds anything more (a download to resume, a shard's temporary file) is kept
        if created and {p.name for p in out.iterdir()} <= {"manifest.json", LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        unlock_dir(out)


def _prepare(source: Source, out: Path, cfg: PrepareConfig) -> Summary:
    start_time = time.perf_counter()
    units = list(source.units)
    if cfg.shuffle_docs:
        units = [units[i] for i in np.random.default_rng(cfg.seed).permutation(len(units))]
    manifest = {
        "format": FORMAT,
        "source": source.info,
        "tokenizer": {"name": "gpt2", "eot": EOT, "dtype": "uint16"},
        "settings": {"name": cfg.name or source.name, "shard_size": cfg.shard_size, "part_bytes": cfg.part_bytes,
                     "shuffle_docs": cfg.shuffle_docs, "seed": cfg.seed if cfg.shuffle_docs else None},
        "units": [u.key for u in units],
        "stamps": [u.stamp for u in units],
        "origin": source.origin,
        "shards": [],
        "complete": False,
    }
    manifest["shards"] = resume(out, manifest)
    if manifest["shards"] and manifest["shards"][-1]["end"] is None:  # done already
        complete(out, manifest)
        warn_of_thin_splits(out, manifest)
        return Summary(out, manifest, 0, time.perf_counter() - start_time)
    write_manifest(out, manifest)
    start = manifest["shards"][-1]["end"] if manifest["shards"] else {"unit": 0, "part": 0, "skip": 0}
    writer = ShardWriter(out, manifest)
    scratch = out / SCRATCH

    cores = device.cores()
    workers = min(cfg.workers or cores, cores)
    if cfg.workers and cfg.workers > cores:  # tokenizing is CPU-bound: more processes than cores only cost memory
        warn(f"{cfg.workers} workers asked for, {workers} used (this machine's cores)")
    pool = bar = None
    new_tokens = docs = 0
    downloads = _Downloads()

    def tokenized(item: tuple, ok: bool) -> None:  # (in the pool's thread)
        downloads.tokenized(item[0], ok)

    try:  # from the pool's start: a Ctrl-C before the loop (tqdm's import, on a loaded machine) must stop it too
        pool = _start_pool(workers)
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc=f"{manifest['settings']['name']} -> {out}",
                   disable=bar_off(cfg.progress), smoothing=0.1)
        for (u, p, part), (tokens, n_docs) in _in_order(_parts(units, start, scratch, cfg, downloads), pool,
                                                          2 * workers + 2, tokenized):
            skip = start["skip"] if (u, p) == (start["unit"], start["part"]) else 0
            writer.add(tokens[skip:], part.split, u, p, skip)
            new_tokens += len(tokens) - skip
            docs += n_docs
            bar.update(len(tokens) - skip)
            bar.set_postfix_str(f"{docs / (time.perf_counter() - start_time):,.0f} docs/s, "
                                f"file {u + 1}/{len(units)}, shard {len(manifest['shards'])}", refresh=False)
        if not manifest["shards"] and writer.count == 0:
            raise UserError(f"{source.label}: no documents (empty source)")
        writer.finish()
    except cf.BrokenExecutor:
        raise UserError(BROKEN_POOL) from None
    except KeyboardInterrupt:
        if pool is not None:
            # on stdout, as train's "stopping" line: stderr holds one line, the command's last ("interrupted")
            print("stopping: the tokenizer processes finish the parts they hold (seconds)")
        raise
    finally:
        downloads.close()  # a download still waiting for room ends its thread
        if bar is not None:
            bar.close()
        _stop_pool(pool)
    shutil.rmtree(scratch, ignore_errors=True)
    warn_of_thin_splits(out, manifest)
    return Summary(out, manifest, new_tokens, time.perf_counter() - start_time)
