"""Dataset preparation: text -> GPT-2 token shards in build-nanogpt's format (what data.py reads).

Shards are uint16 `.npy` files `{name}_{split}_{index:06d}.npy` of `shard_size` tokens (the last one
shorter) with `<|endoftext|>` before every document; shard 0 is `val`, the rest `train` (a source of at most one
shard: its first tenth val, the rest train, ShardWriter._split_small; Tiny Shakespeare: its last tenth val, as many
shards as it fills, then its first nine tenths train); `manifest.json` describes them. Sources: FineWeb-Edu (hub or
a local mirror), Tiny Shakespeare, your own files.

Parallelism: every input file is cut into parts (documents.py: jsonl byte ranges, parquet row groups,
whole txt files) that worker processes read and tokenize by themselves, so only a small part description
goes in and one uint16 array comes out (build-nanogpt pickles every document both ways). Results are
consumed in part order, so the shards do not depend on the number of workers.

Resuming: a shard is written atomically, then recorded in the manifest with the position where the
next one starts (file, part, token offset). A re-run verifies the recorded shards and continues after
the last intact one. Hub files are downloaded file by file (the next one while the current one is
tokenized) and deleted once tokenized, so at most two are on disk (_Downloads).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import json
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

from . import signals
from .console import counted, few, warn
from .data import list_shards, load_shard, open_shard, warn_if_shards_differ
from .documents import Part, plan_parts, read_docs
from .errors import UserError, check_int, check_types, first_line
from .files import (LOCK_FILE, atomic_path, atomic_write_text, lock_dir, named_dir, read_json, remove_stale_temps,
                    sha256_file, unlock_dir, user_path)
from .sources import Source, Unit
from .tokenizer import EOT, EOT_TEXT, decode, get_tokenizer

FORMAT = "nanogpt-mlx-shards"
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
    part_bytes: int = 2 << 20  # jsonl files are cut into parts of about this size
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
    """Tokens of one part and its document count. With a shuffle key, the documents are permuted
    first, seeded by the key (so every worker count gives the same order)."""
    part, shuffle_key = task
    docs = read_docs(part)
    if shuffle_key is not None:
        docs = [docs[i] for i in np.random.default_rng(shuffle_key).permutation(len(docs))]
    return encode_docs(docs), len(docs)


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


# ------------------------------------------------------------------------------------ shards
def _write_manifest(out: Path, manifest: dict) -> None:
    # indented once complete; while shards are added, on one line: json's indenting encoder is Python code, and
    # the manifest is written after every shard (thousands of small shards took minutes)
    text = json.dumps(manifest, indent=1 if manifest["complete"] else None)
    atomic_write_text(out / "manifest.json", text + "\n")


class ShardWriter:
    """Cuts the token stream into shards; each is written atomically, then recorded in the manifest."""

    def __init__(self, out: Path, manifest: dict):
        self.out, self.manifest = out, manifest
        self.name = manifest["settings"]["name"]
        self.buf = np.empty(manifest["settings"]["shard_size"], dtype=np.uint16)
        self.count = 0
        self.split = "val"

    def add(self, tokens: np.ndarray, split: str | None, unit: int, part: int, offset: int) -> None:
        """Append `tokens`, which start at token `offset` of part `part` of unit `unit`."""
        if self.count and split and split != self.split:
            self._flush({"unit": unit, "part": part, "skip": offset})  # a forced split starts a new shard
        pos = 0
        while pos < len(tokens):
            # a full shard is written when more tokens come, not at once: a source of exactly one shard's tokens
            # is then still whole at finish(), which splits it
            if self.count == len(self.buf):
                self._flush({"unit": unit, "part": part, "skip": offset + pos})
            if self.count == 0:
                self.split = split or ("val" if not self.manifest["shards"] else "train")
            n = min(len(self.buf) - self.count, len(tokens) - pos)
            self.buf[self.count : self.count + n] = tokens[pos : pos + n]
            self.count += n
            pos += n

    def finish(self) -> None:
        if self.count and not self.manifest["shards"] and self.split == "val":
            self._split_small()
        elif self.count:
            self._flush(None)
        _complete(self.out, self.manifest)

    def _split_small(self) -> None:
        """A source of at most one shard would be all val (build-nanogpt's shard 0), leaving nothing to train on:
        its first tenth is val instead (to the next document's start, if that comes before a fifth), the rest train.
        Both files are listed at once, and a resume that finds one of them lost or damaged makes both again
        (_intact_shards): the val shard alone would be taken for the end."""
        tokens = self.buf[: self.count]
        tenth = self.count // 10
        starts = np.flatnonzero(tokens[tenth : 2 * tenth] == EOT)
        cut = tenth + int(starts[0]) if len(starts) else tenth  # else inside a document
        if cut == 0:
            self._flush(None)  # under 10 tokens: too little to split
            return
        self.manifest["shards"] += [self._save(tokens[:cut], "val", 0, None),
                                    self._save(tokens[cut:], "train", 1, None)]
        _write_manifest(self.out, self.manifest)
        self.count = 0

    def _flush(self, end: dict | None) -> None:
        index = len(self.manifest["shards"])
        self.manifest["shards"].append(self._save(self.buf[: self.count], self.split, index, end))
        _write_manifest(self.out, self.manifest)
        self.count = 0

    def _save(self, tokens: np.ndarray, split: str, index: int, end: dict | None) -> dict:
        """Write shard `index` of `split`; its manifest record, with where the source goes on after it (`end`)."""
        file = f"{self.name}_{split}_{index:06d}.npy"
        with atomic_path(self.out / file) as tmp:
            np.save(tmp, tokens)
            digest = sha256_file(tmp)
        return {"file": file, "split": split, **_counted(tokens), "sha256": digest, "end": end}


def _counted(tokens: np.ndarray) -> dict:
    """A shard's counts as its manifest record holds them (a document starts at each EOT)."""
    return {"tokens": len(tokens), "documents": int(np.count_nonzero(tokens == EOT))}


def _complete(out: Path, manifest: dict) -> None:
    shards = manifest["shards"]
    shards[-1]["end"] = None  # nothing left to read
    manifest["complete"] = True
    manifest["totals"] = {
        "shards": len(shards),
        "documents": sum(s["documents"] for s in shards),
        **{f"{split}_tokens": sum(s["tokens"] for s in shards if s["split"] == split) for split in ("val", "train")},
    }
    _write_manifest(out, manifest)


def _resume(out: Path, fresh: dict) -> list[dict]:
    """Shards of an earlier run with the same settings that are intact on disk (a prefix of its list). Shard files
    beyond them are removed: a killed run can leave one written but not yet listed, which other settings would
    not overwrite and every reader would take for data. What a killed writer left half-written goes too, once the
    directory is taken for prepare's (a directory refused keeps all it holds)."""
    path = out / "manifest.json"
    if not path.exists():
        if any(not f.name.startswith(".") for f in out.glob("*.npy")):  # (hidden files are no shards to readers)
            raise UserError(f"{out}: holds .npy files but no manifest.json; choose an empty directory")
        remove_stale_temps(out)
        return []
    intact, old_name = _intact_shards(out, path, fresh)
    remove_stale_temps(out)
    listed = {shard["file"] for shard in intact}
    ours = {fresh["settings"]["name"], old_name}  # shard names this prepare or the one before writes
    for split in ("val", "train"):
        for file in list_shards(out, split, missing_ok=True):
            if file.name not in listed and file.name.rsplit(f"_{split}_", 1)[0] in ours:
                file.unlink()
    return intact


def _intact_shards(out: Path, path: Path, fresh: dict) -> tuple[list[dict], str | None]:
    """The intact prefix of the manifest's shards, and the shard name its settings gave."""
    try:
        old = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({first_line(e)}); delete the directory to start over") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise UserError(f"{path}: not a manifest that prepare writes; choose an empty directory")
    settings = old.get("settings")
    old_name = settings.get("name") if isinstance(settings, dict) else None
    if not old.get("shards"):
        return [], old_name  # nothing to keep: any settings may start over
    if (not isinstance(old["shards"], list) or not all(map(_is_shard_record, old["shards"]))
            or not isinstance(old.get("stamps", []), list)
            or not all(s is None or type(s) is int for s in old.get("stamps", []))):
        raise UserError(f"{path}: damaged (a shard's record is malformed); delete the directory to start over")
    for key in ("format", "source", "tokenizer", "settings", "units"):
        if old.get(key) != fresh[key]:
            what = "from other input files (or other versions of them)" if key == "units" else f"with other {key}"
            then = "delete the directory to start over" if key == "units" else "the same options to resume"
            raise UserError(f"{out} holds shards made {what} ({_difference(old.get(key), fresh[key])}); use "
                            f"another --out (Python: out), or {then}")
    # no stamps: a manifest from before they were kept; a None: a download (the hub's files do not change)
    changed = [(key, was) for key, was, now in zip(fresh["units"], old.get("stamps", fresh["stamps"]),
                                                   fresh["stamps"]) if None not in (was, now) and was != now]
    if changed:
        key, was = changed[0]
        raise UserError(f"{key} was modified after {out}'s shards were made from it (its modification time "
                        "differs); use another --out (Python: out), or delete the directory to start over (if only its "
                        f"time changed, a copy or a touch, `touch -d @{was // 10**9}.{was % 10**9:09d}` on it resumes)")
    intact, recounted = [], []
    for shard in old["shards"]:
        file = out / shard["file"]
        if not file.is_file() or sha256_file(file) != shard["sha256"]:
            break
        # the counts too: the totals are their sums, and a loader that finds a length other than the record's says
        # to re-run this to restore it
        counts = _counted(open_shard(file))
        if any(shard[k] != v for k, v in counts.items()):
            recounted.append(shard["file"])
        intact.append({**shard, **counts})
    if intact and intact[-1]["end"] is None and len(intact) < len(old["shards"]):
        # ShardWriter._split_small's val shard, whose train shard is lost: alone it would look finished (both records
        # end None), so the pair is made again
        intact, recounted = [], []
    if recounted:
        warn(f"{path}: corrected the token and document counts it gave for {few(recounted)} (they differed from the "
             "shards)")
    return intact, old_name


def _counts(d: dict, *keys: str) -> bool:
    return all(type(d.get(k)) is int and d[k] >= 0 for k in keys)


def _is_shard_record(shard) -> bool:
    """Whether a manifest's shard entry has what ShardWriter._flush writes, of the right types."""
    if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) or not isinstance(shard.get("sha256"), str):
        return False
    end = shard.get("end")
    return (Path(shard["file"]).name == shard["file"] and shard.get("split") in ("val", "train")
            and _counts(shard, "tokens", "documents")
            and (end is None or isinstance(end, dict) and _counts(end, "unit", "part", "skip")))


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _difference(old, new) -> str:
    """What differs between a value that a manifest records and this run's: the keys of settings whose values
    differ ("seed 3 there, 4 now"), the input files only one of them lists, else both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return ", ".join(f"{k} {_short(old.get(k))} there, {_short(new.get(k))} now"
                         for k in {**old, **new} if old.get(k) != new.get(k))
    if isinstance(old, list) and all(isinstance(u, str) for u in old) and isinstance(new, list):
        old_set, new_set = set(old), set(new)
        gone, added = [u for u in old if u not in new_set], [u for u in new if u not in old_set]
        if not (gone or added):
            return "the same files in another order"
        said = []
        if gone:
            said.append(f"{few(gone)} there" + ("" if added else ", not now"))
        if added:
            said.append(f"{few(added)} now" + ("" if gone else ", not there"))
        return ", ".join(said)
    return f"{_short(old)} there, {_short(new)} now"


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
        if cfg.shuffle_docs:
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
    except cf.BrokenExecutor:
        pool.shutdown()
        raise UserError(BROKEN_POOL) from None
    return pool


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(source: Source, out: str | os.PathLike, config: PrepareConfig | None = None) -> Summary:
    """Tokenize `source` into shards under `out`, resuming an interrupted run with the same settings.

    Uses worker processes; with the spawn start method (macOS, Windows) call it under
    `if __name__ == "__main__":` as for any multiprocessing code. A second prepare into the same `out` while
    this one runs is refused (files.lock_dir).
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
    manifest["shards"] = _resume(out, manifest)
    if manifest["shards"] and manifest["shards"][-1]["end"] is None:  # done already
        _complete(out, manifest)
        _warn_of_thin_splits(out, manifest)
        return Summary(out, manifest, 0, time.perf_counter() - start_time)
    _write_manifest(out, manifest)
    start = manifest["shards"][-1]["end"] if manifest["shards"] else {"unit": 0, "part": 0, "skip": 0}
    writer = ShardWriter(out, manifest)
    scratch = out / SCRATCH

    cores = _cpu_count()
    workers = min(cfg.workers or cores, cores)
    if cfg.workers and cfg.workers > cores:  # tokenizing is CPU-bound: more processes than cores only cost memory
        warn(f"{cfg.workers} workers asked for, {workers} used (this machine's cores)")
    pool = _start_pool(workers)
    from tqdm import tqdm

    bar = tqdm(unit="tok", unit_scale=True, desc=f"{manifest['settings']['name']} -> {out}",
               disable=None if cfg.progress else True, smoothing=0.1)
    new_tokens = docs = 0
    downloads = _Downloads()

    def tokenized(item: tuple, ok: bool) -> None:  # (in the pool's thread)
        downloads.tokenized(item[0], ok)

    try:
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
        bar.close()
        if pool is not None:  # a second Ctrl-C here left the workers waiting for work, and exit waiting for them
            with signals.deferred(signal.SIGINT):
                pool.shutdown(cancel_futures=True)
    shutil.rmtree(scratch, ignore_errors=True)
    _warn_of_thin_splits(out, manifest)
    return Summary(out, manifest, new_tokens, time.perf_counter() - start_time)


def _warn_of_thin_splits(out: Path, manifest: dict) -> None:
    """Say (not refuse: shards can be added by hand) that a split has no tokens, or that train has under a tenth of
    val's (a source just over one shard: shard 0 is val): training needs train tokens, and validates on val tokens."""
    totals = manifest["totals"]
    val, train = totals["val_tokens"], totals["train_tokens"]
    if not train:
        warn(f"{out}: no train tokens, nothing to train on (a source of under 10 tokens is all val); give more text")
    elif train < val / 10:
        warn(f"{out}: {counted(train, 'train token')}, under a tenth of its {val:,} val tokens (shard 0 is val); "
             f"prepare it into another --out with a smaller --shard-size (Python: shard_size), e.g. "
             f"{(val + train) // 10}")
    if not totals["val_tokens"]:
        warn(f"{out}: no val tokens, nothing to validate on (the source's val part holds no text); give more text, "
             "or train with --val-every 0 (Python: TrainConfig(val_every=0))")


def describe(data_dir: str | os.PathLike, n_tokens: int = 64) -> str:
    """Shard counts and token totals of a shard directory, and the first tokens of its first train shard (else its
    first val shard) decoded."""
    check_int("n_tokens", n_tokens, low=0)
    data_dir = user_path(named_dir(data_dir, "shard directory"))
    sized = {}  # split: [(shard, tokens)]; headers only
    for split in ("val", "train"):  # (a missing directory, or a file, is said as such)
        sized[split] = [(path, len(open_shard(path))) for path in list_shards(data_dir, split, missing_ok=True)]
    splits = {split: [path for path, _ in shards] for split, shards in sized.items()}
    if not any(splits.values()):  # (before the warnings of each missing shard a manifest lists: one line)
        raise UserError(f"{data_dir}: no shards (*_val_*.npy, *_train_*.npy)")
    path = data_dir / "manifest.json"
    unread = None  # why manifest.json could not be read: the shards are described still, as for a malformed record
    try:
        manifest = read_json(path) if path.is_file() else None
    except ValueError as e:
        manifest, unread = {}, f"damaged ({first_line(e)})"
    except OSError as e:
        manifest, unread = {}, f"unreadable ({e.strerror or first_line(e)})"
    for split, shards in sized.items():  # as a loader would
        warn_if_shards_differ(data_dir.resolve(), split, shards, manifest if isinstance(manifest, dict) else {})
    lines = [str(data_dir)]
    if manifest is None:  # shards from elsewhere
        pass
    elif unread:
        lines.append(f"  manifest.json is {unread}: ignored")
    elif not (isinstance(manifest, dict) and manifest.get("format") == FORMAT):
        lines.append("  manifest.json is not one that prepare writes: ignored")
    elif not (isinstance(manifest.get("source"), dict) and isinstance(manifest.get("shards"), list)
              and all(map(_is_shard_record, manifest["shards"]))):
        lines.append("  manifest.json is damaged (a record is malformed): ignored")
    else:
        state = "complete" if manifest.get("complete") else "incomplete (re-run the same command to resume)"
        source = ", ".join(f"{k}={v}" for k, v in manifest["source"].items())
        lines.append(f"  source     {source}; {state}")
        lines.append(f"  documents  {sum(s['documents'] for s in manifest['shards']):,}")
    for split, shards in sized.items():
        lines.append(f"  {split:<10} {counted(len(shards), 'shard')}, {counted(sum(n for _, n in shards), 'token')}")
    first = (splits["train"] or splits["val"])[0]
    ids = load_shard(first)[:n_tokens].tolist()
    if max(ids, default=0) > EOT:  # not GPT-2's tokens: nothing to decode them with
        lines.append(f"first {n_tokens} token ids of {first.name} (beyond GPT-2's {EOT + 1}, not decoded):")
        lines.append(" ".join(map(str, ids)))
    else:
        lines.append(f"first {n_tokens} tokens of {first.name}:")
        lines.append(decode(ids))
    return "\n".join(lines)
