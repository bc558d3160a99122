"""A shard directory as prepare writes it: build-nanogpt's uint16 `.npy` token shards and the `manifest.json` that
records each (its counts, its sha256 and where the source goes on after it), written shard by shard (ShardWriter);
which of an earlier run's shards are intact to resume from (resume); and a directory's description (describe,
`prepare --inspect`). What the shards hold and how a source is cut into them: prepare.py; reading them: data.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .console import counted, few, warn
from .data import list_shards, load_shard, open_shard, warn_if_shards_differ
from .errors import UserError, check_int, first_line
from .files import atomic_path, atomic_write_text, named_dir, read_json, remove_stale_temps, sha256_file, user_path
from .tokenizer import EOT, decode

FORMAT = "nanogpt-mlx-shards"


def write_manifest(out: Path, manifest: dict) -> None:
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
        complete(self.out, self.manifest)

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
        write_manifest(self.out, self.manifest)
        self.count = 0

    def _flush(self, end: dict | None) -> None:
        index = len(self.manifest["shards"])
        self.manifest["shards"].append(self._save(self.buf[: self.count], self.split, index, end))
        write_manifest(self.out, self.manifest)
        self.count = 0

    def _save(self, tokens: np.ndarray, split: str, index: int, end: dict | None) -> dict:
        """Write shard `index` of `split`; its manifest record, with where the source goes on after it (`end`)."""
        file = f"{self.name}_{split}_{index:06d}.npy"
        with atomic_path(self.out / file) as tmp:
            np.save(tmp, tokens)
            digest = sha256_file(tmp)
        return {"file": file, "split": split, **_record_counts(tokens), "sha256": digest, "end": end}


def _record_counts(tokens: np.ndarray) -> dict:
    """A shard's counts as its manifest record holds them (a document starts at each EOT)."""
    return {"tokens": len(tokens), "documents": int(np.count_nonzero(tokens == EOT))}


def complete(out: Path, manifest: dict) -> None:
    shards = manifest["shards"]
    shards[-1]["end"] = None  # nothing left to read
    manifest["complete"] = True
    manifest["totals"] = {
        "shards": len(shards),
        "documents": sum(s["documents"] for s in shards),
        **{f"{split}_tokens": sum(s["tokens"] for s in shards if s["split"] == split) for split in ("val", "train")},
    }
    write_manifest(out, manifest)


def resume(out: Path, fresh: dict) -> list[dict]:
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
        counts = _record_counts(open_shard(file))
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
    if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("sha256"), str)):
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


def warn_of_thin_splits(out: Path, manifest: dict) -> None:
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
