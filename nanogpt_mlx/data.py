"""Token shards: reading them for training (build-nanogpt's DataLoaderLite, with resumable state).

Shards are uint16 `.npy` files named `{name}_{split}_{index:06d}.npy` (build-nanogpt's fineweb.py format).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from tokenize import TokenError

import numpy as np

from .console import few, warn, warn_once
from .errors import UserError, check_bool, check_int, check_seed
from .files import named_dir, read_json, user_path


def list_shards(data_dir: str | os.PathLike, split: str, missing_ok: bool = False) -> list[Path]:
    """Sorted shard files of one split (`train`, `val`: a name of letters and digits) in `data_dir` (a leading `~`
    expanded); hidden temp files of unfinished writes are skipped. None is an error unless missing_ok."""
    if not (isinstance(split, str) and re.fullmatch(r"[A-Za-z0-9]+", split)):  # a pattern ('*') read every split
        raise UserError(f"split must be a name such as val or train (letters and digits), got {split!r}")
    data_dir = user_path(named_dir(data_dir, "data directory"))
    if not data_dir.is_dir():
        what = "a file, not a directory of token shards" if data_dir.exists() else "data directory not found"
        raise UserError(f"{data_dir}: {what} (make one with `nanogpt-mlx prepare`)")
    shards = sorted(p for p in data_dir.glob(f"*_{split}_*.npy")
                    if re.fullmatch(rf"[^.].*_{split}_\d+\.npy", p.name))  # NAME_{split}_INDEX.npy, whatever NAME holds
    if not shards and not missing_ok:
        raise UserError(f"{data_dir}: no {split} shards (*_{split}_*.npy)")
    return shards


def open_shard(path: Path) -> np.ndarray:
    """A shard's tokens, memory-mapped (only its header is read), checked to be a 1-D integer array."""
    try:
        if path.exists() and not path.is_file():  # a FIFO's open waited for a writer, forever
            raise UserError(f"{path}: cannot read shard (not a regular file)")
        tokens = np.load(path, mmap_mode="r")
    except EOFError:
        raise UserError(f"{path}: cannot read shard (empty or cut off)") from None
    except TokenError:  # a damaged header's dict, which NumPy tokenizes as Python
        raise UserError(f"{path}: cannot read shard (a damaged .npy header)") from None
    except (OSError, ValueError) as e:
        # np.load takes a file without the .npy header for a pickle, and its advice (allow_pickle) is no help
        headerless = isinstance(e, ValueError) and not _has_npy_header(path)
        why = "not a NumPy .npy file: no .npy header; raw tokens? save them with np.save" if headerless else \
            "cut off, or a damaged .npy header: it says more bytes than the file holds" if "mmap length" in str(e) \
            else e
        raise UserError(f"{path}: cannot read shard ({why})") from None
    if not isinstance(tokens, np.ndarray):  # np.load opens a zip (.npz) as an archive of arrays
        raise UserError(f"{path}: not a .npy array (an .npz archive?)")
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":  # (timedelta64 is an np.integer too)
        raise UserError(f"{path}: expected a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    # np.save writes the data and nothing after it; a header saying another dtype or length (uint8 for uint16) read
    # part of the tokens without an error
    data = path.stat().st_size - tokens.offset
    if data != tokens.nbytes:
        raise UserError(f"{path}: cannot read shard (its .npy header says {tokens.dtype} {tokens.shape}, "
                        f"{tokens.nbytes} bytes, but {data} bytes follow it: a damaged header, or a file written to "
                        "after its array)")
    return tokens


def _has_npy_header(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX


def check_batch_shape(B: int, T: int, rank: int = 0, world: int = 1) -> None:
    """Refuse (UserError) a batch of B rows of T tokens for rank `rank` of `world` that cannot be read."""
    check_int("B", B)
    check_int("T", T)
    check_rank(rank, world)


def check_rank(rank: int, world: int) -> None:
    """Refuse a rank that is not one of `world`'s: a rank past the last would read another rank's share."""
    check_int("rank", rank, low=None)
    check_int("world", world, low=None)
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} of world {world}: expected 0 <= rank < world")


def load_shard(path: Path, vocab_size: int | None = None) -> np.ndarray:
    """A shard's tokens (memory-mapped), checked: 1-D integers, none negative, all < vocab_size if given, else
    all within the int32 of the batches (a uint32 shard's 2^31 came out negative)."""
    tokens = open_shard(path)
    if np.issubdtype(tokens.dtype, np.signedinteger) and tokens.size and int(tokens.min()) < 0:
        raise UserError(f"{path}: negative token id {int(tokens.min())}")
    if vocab_size is not None and tokens.size and int(tokens.max()) >= vocab_size:
        raise UserError(f"{path}: token id {int(tokens.max())} >= the model's vocab_size {vocab_size}")
    if vocab_size is None and tokens.size and np.iinfo(tokens.dtype).max >= 2**31 and int(tokens.max()) >= 2**31:
        raise UserError(f"{path}: token id {int(tokens.max())} is past what a batch holds (int32, below 2^31)")
    return tokens


def read_manifest(data_dir: Path) -> dict:
    """prepare's manifest.json in `data_dir`; {} where there is none (shards from elsewhere) or it is not a JSON
    object (not ours). Its records are checked where they are read."""
    try:
        manifest = read_json(data_dir / "manifest.json")
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def warn_if_incomplete(data_dir: Path, manifest: dict) -> None:
    """Warn when `prepare` has not finished writing `data_dir` (its manifest says "complete": false)."""
    if manifest.get("complete", True) is False:
        warn_once(f"{data_dir}: prepare has not finished these shards (manifest.json says incomplete); re-run the same "
                  "prepare command to complete them")


def warn_if_shards_differ(data_dir: Path, split: str, sized: list[tuple[Path, int]], manifest: dict) -> None:
    """Warn when a shard that a complete manifest lists is missing or of another length: a partial copy, or a
    deleted shard, would train and evaluate on less."""
    if manifest.get("complete") is not True:
        return
    try:
        listed = {r["file"]: r["tokens"] for r in manifest["shards"] if r["split"] == split}
    except (KeyError, TypeError):  # records not ours
        return
    found = {path.name: n for path, n in sized}
    missing = [name for name in listed if name not in found]
    other = [f"{name} ({found[name]} tokens, not {n})" for name, n in listed.items() if found.get(name, n) != n]
    if missing or other:
        said = "; ".join(f"{what}: {few(names)}"
                         for what, names in (("missing", missing), ("of another length", other)) if names)
        warn_once(f"{data_dir}: {split} shards that manifest.json lists are {said}; re-run the same prepare command "
                  "to restore them")


def manifest_digests(manifest: dict, split: str) -> dict[str, str]:
    """The sha256 of each `split` shard as prepare's manifest records it ({} without one: shards from elsewhere)."""
    try:
        return {r["file"]: r["sha256"] for r in manifest.get("shards", [])
                if r["split"] == split and isinstance(r.get("sha256"), str)}
    except (KeyError, TypeError, AttributeError):  # records not ours
        return {}


class NoBatch(UserError):
    """No shard of a split holds one batch."""


@dataclass
class LoaderState:
    shard: int = 0  # index into the sorted shard list
    step: int = 0  # global batch index within the shard (each covers B*T*world tokens)
    epoch: int = 0  # completed passes over all shards (changes the shuffle order)


class DataLoader:
    """Sequential batches over sorted shards, strided across ranks, wrapping at the end.

    As build-nanogpt's DataLoaderLite: rank r of `world` reads the window at offset
    B*T*(r + k*world) of a shard for its k-th batch and moves to the next shard when the
    next global batch does not fit. Every rank gets the same number of batches per shard.
    With `shuffle`, the window order within each shard is permuted (seeded by seed, epoch, shard).
    `data_dir` may start with `~`; token ids of `vocab_size` or more (if given) are refused.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, B: int, T: int, rank: int = 0, world: int = 1,
                 vocab_size: int | None = None, shuffle: bool = False, seed: int = 0):
        data_dir = user_path(named_dir(data_dir, "data directory"))
        check_batch_shape(B, T, rank, world)
        if vocab_size is not None:
            check_int("vocab_size", vocab_size)  # "512" failed deep inside, as a TypeError
        check_bool("shuffle", shuffle)  # "no" shuffled
        check_seed("seed", seed)  # -1 was NumPy's ValueError, 1.5 a TypeError
        # NumPy's integers and np.bool_ too: the layout goes into JSON
        B, T, rank, world, shuffle = int(B), int(T), int(rank), int(world), bool(shuffle)
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.vocab_size, self.shuffle, self.seed = None if vocab_size is None else int(vocab_size), shuffle, int(seed)
        # every shard's length now (headers only): one too short for a batch would stop a run when reached
        # (prepare's last shard can be); its token ids are checked when it is read
        sized = [(path, len(open_shard(path))) for path in list_shards(data_dir, split)]
        manifest, where = read_manifest(data_dir), data_dir.resolve()
        warn_if_incomplete(where, manifest)
        warn_if_shards_differ(where, split, sized, manifest)
        need = B * T * world + 1
        kept = [(path, n) for path, n in sized if n >= need]
        short = [f"{path.name} ({n} tokens)" for path, n in sized if n < need]
        short_list = f"{len(short)} {split} shard(s) shorter than one batch of B*T*ranks+1 = {need} tokens: " \
                     f"{few(short)}"
        if not kept:
            room = max(n for _, n in sized) - 1  # (list_shards found one at least)
            fits = f"; one of B*T*ranks <= {room} tokens fits (a smaller batch size or sequence length)" \
                if room >= world else ""
            raise NoBatch(f"{data_dir}: no {split} shard holds one batch: {short_list}{fits}")
        if short:
            warn(f"{data_dir}: skipping {short_list}")
        self.shards = [path.absolute() for path, _ in kept]  # a later os.chdir (a notebook) must not move them
        # what a saved position means: a checkpoint's position is refused by a loader that reads other batches
        # (and what they hold, where the manifest says: a dataset prepared again, shuffled with another seed, has
        # shards of the same names and lengths)
        digests = manifest_digests(manifest, split)
        self.layout = {"B": B, "T": T, "world": world, "shuffle": shuffle, "seed": self.seed if shuffle else None,
                       "shards": [[path.name, n] for path, n in kept],
                       "sha256": {path.name: digests[path.name] for path, _ in kept if path.name in digests}}
        # each shard's file (inode, size, mtime) when its token ids were checked: not again at every reset or epoch,
        # but again once it was replaced or written to
        self._checked: dict[int, tuple[int, int, int]] = {}
        self._loaded: tuple[int, int] | None = None  # the (shard, epoch) whose tokens and batch order are loaded
        self.reset()

    def _batches_in(self, tokens: int) -> int:
        """Global batches (B*T*world tokens, plus the last target) that a shard of `tokens` holds."""
        return (tokens - 1) // (self.B * self.T * self.world)

    def within_one_pass(self, batches: int) -> int:
        """`batches`, or this rank's batches in one pass over all shards where they are fewer: past one pass the
        loader wraps to the first shard and would repeat batches."""
        check_int("batches", batches)  # 2.5 failed later, as a range()'s TypeError
        return min(batches, sum(self._batches_in(n) for _, n in self.layout["shards"]))

    def _move_to(self, state: LoaderState) -> None:
        """Go to `state`, reading its shard unless it is the one loaded; where that read fails (UserError) the
        loader stays where it was, whole (a run that stops there saves its position)."""
        shard, epoch = state.shard, state.epoch
        if self._loaded != (shard, epoch):
            path = self.shards[shard]
            try:
                stat = path.stat()
                stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            except OSError:
                stamp = None  # (open_shard says why it cannot be read)
            checked = stamp is not None and self._checked.get(shard) == stamp
            tokens = open_shard(path) if checked else load_shard(path, self.vocab_size)
            counted = self.layout["shards"][shard][1]
            if len(tokens) != counted:  # its batches were counted at the length it had
                raise UserError(f"{path}: {len(tokens)} tokens, where this run counted {counted} (replaced while "
                                "it ran?)")
            self._checked[shard] = stamp
            steps = self._batches_in(len(tokens))
            order = np.random.default_rng([self.seed, epoch, shard]).permutation(steps) if self.shuffle \
                else np.arange(steps)
            self.tokens, self.steps_in_shard, self.order, self._loaded = tokens, steps, order, (shard, epoch)
        self.state = state

    def reset(self) -> None:
        self._move_to(LoaderState())

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int32 arrays of shape (B, T); y is x shifted by one token. Where the next shard cannot be read
        (UserError), the position stays at this batch."""
        BT = self.B * self.T
        self._check_unchanged()
        start = BT * (int(self.order[self.state.step]) * self.world + self.rank)
        buf = np.asarray(self.tokens[start : start + BT + 1], dtype=np.int32)
        shard, step, epoch = self.state.shard, self.state.step + 1, self.state.epoch
        if step >= self.steps_in_shard:
            shard, step = shard + 1, 0
            if shard == len(self.shards):
                shard, epoch = 0, epoch + 1
        self._move_to(LoaderState(shard, step, epoch))
        return buf[:-1].reshape(self.B, self.T), buf[1:].reshape(self.B, self.T)

    def _check_unchanged(self) -> None:
        """Refuse (UserError) to read the loaded shard's memory map once its file was written to in place: cut short,
        the map read zeros past its new end (trained on, and saved in the next checkpoint), then the process died of
        SIGBUS. A file put in its place (renamed over it) leaves the map reading the one loaded, checked already."""
        path, loaded = self.shards[self.state.shard], self._checked.get(self.state.shard)
        try:
            now = path.stat()
        except OSError:  # gone: the map holds the file as it was
            return
        if loaded is not None and now.st_ino == loaded[0] and (now.st_size, now.st_mtime_ns) != loaded[1:]:
            change = f"{loaded[1]} bytes then, {now.st_size} now" if now.st_size != loaded[1] else "its size unchanged"
            raise UserError(f"{path}: written to while this run read it ({change})")

    def state_dict(self) -> dict:
        return {**asdict(self.state), "layout": self.layout}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a saved position; refused where this loader's batches differ from those it counts
        (UserError); ValueError for a malformed position."""
        d = dict(d)
        saved = d.pop("layout", None)  # None: a checkpoint from before the layout was saved
        if saved is not None and not _is_layout(saved):
            raise ValueError(f"not a layout of batches: {str(saved)[:100]}")
        if saved is not None and (changes := _layout_changes(saved, self.layout)):
            raise UserError(f"cannot continue the checkpoint's data position with other batches: {changes}; resume "
                            "with the checkpoint's values, or start a new run from its weights (--init-from)")
        if set(d) != set(LoaderState.__dataclass_fields__) or any(type(v) is not int or v < 0 for v in d.values()):
            raise ValueError(f"not a position (shard, step, epoch: counts): {d}")
        state = LoaderState(**d)
        if state.shard >= len(self.shards):
            raise ValueError(f"position in shard {state.shard}, but there are {len(self.shards)}")
        if state.step >= self._batches_in(self.layout["shards"][state.shard][1]):
            raise ValueError(f"position at batch {state.step} of shard {state.shard}, which holds fewer")
        self._move_to(state)


def _is_layout(saved: object) -> bool:
    """Whether a checkpoint's saved layout has the form DataLoader.layout has ([name, tokens] per shard), so that
    comparing and describing it (_layout_changes) cannot fail."""
    shards = saved.get("shards", []) if isinstance(saved, dict) else None
    digests = saved.get("sha256", {}) if isinstance(saved, dict) else None
    return isinstance(shards, list) and all(isinstance(s, list) and len(s) == 2 and isinstance(s[0], str)
                                            and type(s[1]) is int for s in shards) \
        and isinstance(digests, dict) and all(isinstance(d, str) for d in digests.values())


def _layout_changes(saved: dict, now: dict) -> str:
    """What differs between the batches a saved position counts and those a loader reads, as options ('' if
    nothing). A shard's content is compared where both layouts know its sha256 (older checkpoints have none)."""
    names = {"B": "batch_size", "T": "seq_len", "world": "ranks", "shuffle": "shuffle", "seed": "seed"}
    differ = [k for k in names if saved.get(k) != now[k]
              and not (k == "seed" and saved.get("shuffle") != now["shuffle"])]  # a seed only orders a shuffle
    changes = [f"{names[k]} {saved.get(k)!r} (this run: {now[k]!r})" for k in differ]
    if saved.get("shards") != now["shards"]:
        count = lambda shards: f"{len(shards)} shard(s) of {sum(n for _, n in shards):,} tokens"  # noqa: E731
        changes.append(f"data of {count(saved.get('shards') or [])} (this run: {count(now['shards'])})")
    elif other := [name for name, digest in saved.get("sha256", {}).items()
                   if now["sha256"].get(name, digest) != digest]:
        changes.append(f"data of other content: {few(other)} (sha256 in manifest.json; prepared again?)")
    return ", ".join(changes)
