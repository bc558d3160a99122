"""Where documents come from: Tiny Shakespeare, FineWeb-Edu (hub or a local mirror), your own files.

Each source is a list of input files (`Unit`s) that `prepare.prepare` tokenizes into shards. Files from
the hub are fetched one at a time, so disk use stays bounded.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import files
from .downloads import download
from .hub import hub_offline
from .errors import UserError, check_bool, first_line

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FINEWEB_REPO = "HuggingFaceFW/fineweb-edu"
FILE_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}  # of lower-cased suffixes


@dataclass(frozen=True)
class Unit:
    """One input file. `fetch(scratch)` returns its local path, downloading into `scratch` if needed."""

    key: str  # identity recorded in the manifest (name and size): a resume must see the same files
    kind: str  # txt | paragraphs | jsonl | parquet | shakespeare
    fetch: Callable[[Path], Path]
    field: str = "text"
    temporary: bool = False  # a download: deleted once tokenized, so disk use stays bounded
    stamp: int | None = None  # a local file's modification time (ns): an edit that keeps its size changes it


@dataclass(frozen=True)
class Source:
    name: str  # default shard file prefix
    label: str  # for messages
    info: dict  # what was read, recorded in the manifest; a resume must match it
    units: list[Unit]
    origin: dict | None = None  # where it came from (hub revision, local mirror): recorded, not compared
    shuffles: bool = True  # whether shuffle_docs has documents to shuffle


def local_files(paths: str | os.PathLike | Sequence[str | os.PathLike], text_field: str = "text",
                split_on_blank_lines: bool = False) -> Source:
    """`.txt` (one document per file, or per blank-line-separated paragraph), `.jsonl` and `.parquet`
    (documents in `text_field`), suffixes in any case; files, directories or glob patterns (`**` recursive). A
    directory's search, like `**`, skips hidden files and folders and does not enter symlinked folders (a link
    to a parent is a loop); it and a pattern skip files of other types and dangling links, a file named outright
    must be readable. A file that several of them name is read once, where it first appears."""
    found: list[Path] = []
    paths = files.as_paths(paths)
    if not paths:
        raise UserError("no files named (paths is empty)")
    if not isinstance(text_field, str) or not text_field:
        raise UserError(f"text_field must name a field, got {text_field!r}")
    check_bool("split_on_blank_lines", split_on_blank_lines)
    for spec in map(str, paths):
        if not spec:  # Path("") is the working directory: an unset variable would tokenize all of it
            raise UserError("'' names no file (an unset variable?)")
        spec = os.path.expanduser(spec)
        if any(c in spec for c in "*?[") and not os.path.exists(spec):  # a file may be named a[1].txt
            matches = sorted(set(_glob(spec)))
            if not matches:
                raise UserError(f"{spec}: no files match")
            for m in map(Path, matches):
                found += _search(m) if m.is_dir() else [m] if _wanted(m) else []
            continue
        m = Path(spec)
        if m.is_dir():
            found += _search(m)
        elif m.is_file():
            if not _kind(m):
                raise UserError(f"{m}: unsupported file type (expected .txt, .jsonl or .parquet)")
            found.append(m)
        else:  # a FIFO (it would block) or a device
            raise UserError(f"{m}: {'not a regular file' if m.exists() else 'no such file or directory'}")
    unique: dict[Path, Path] = {}
    for f in found:
        unique.setdefault(f.resolve(), f)  # a file named twice (a.txt a.txt, or a.txt and its directory) is read once
    found = list(unique.values())
    label = ", ".join(map(str, paths))
    if not found:
        raise UserError(f"{label}: no .txt, .jsonl or .parquet files (empty source)")
    txt = "paragraphs" if split_on_blank_lines else "txt"
    units = [_local_unit(f, txt if (kind := _kind(f)) == "txt" else kind, text_field, str(f.resolve())) for f in found]
    info = {"name": "files", "text_field": text_field, "split_on_blank_lines": bool(split_on_blank_lines)}  # (JSON)
    return Source("data", label, info, units)


def _wanted(file: Path) -> bool:
    """A regular file (or a link to one) of a kind that is read."""
    return _kind(file) is not None and file.is_file()


def _search(folder: Path) -> list[Path]:
    """The files under `folder` that are read, as `folder/**/*` finds them (its name taken as it is, not a pattern)."""
    return sorted(f for f in map(Path, _expand(str(folder), ["**", "*"])) if _wanted(f))


def _glob(pattern: str) -> Iterator[str]:
    """glob.glob(pattern, recursive=True), except that `**` does not enter symlinked folders: glob's does, and a
    link to a parent folder made its paths multiply without end."""
    base = os.sep if pattern.startswith(os.sep) else ""
    found = _expand(base, [s for s in pattern.split(os.sep) if s])
    return (p for p in found if os.path.isdir(p)) if pattern.endswith(os.sep) else found  # d*/ names folders


def _expand(base: str, segments: list[str]) -> Iterator[str]:
    if not segments:
        if base:  # "", the working directory matched by a leading **, is not listed (as by glob)
            yield base
        return
    segment, rest = segments[0], segments[1:]
    if segment == "**":  # no folders, or one more (not hidden, not a link) and then ** again; last, files too
        yield from _expand(base, rest)
        for entry in _entries(base):
            if entry.name.startswith("."):
                continue
            if _is_dir(entry, follow_symlinks=False):
                yield from _expand(os.path.join(base, entry.name), segments)
            elif not rest and not _is_dir(entry, follow_symlinks=True):  # a folder link, yielded, was searched
                yield os.path.join(base, entry.name)
    elif not glob.has_magic(segment):
        path = os.path.join(base, segment)
        if os.path.isdir(path) if rest else os.path.lexists(path):
            yield from _expand(path, rest)
    else:  # as glob: a wildcard matches a hidden name only where the segment starts with "."
        for entry in _entries(base):
            if (fnmatch.fnmatchcase(entry.name, segment) and (segment[0] == "." or not entry.name.startswith("."))
                    and (not rest or _is_dir(entry, follow_symlinks=True))):
                yield from _expand(os.path.join(base, entry.name), rest)


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder or os.curdir) as it:
            return list(it)
    except OSError:  # unreadable, or not a folder: nothing in it matches (as for glob)
        return []


def _is_dir(entry: os.DirEntry, follow_symlinks: bool) -> bool:
    try:  # (it stats a link or an entry of unknown type)
        return entry.is_dir(follow_symlinks=follow_symlinks)
    except OSError:
        return False


def _kind(file: Path) -> str | None:
    """txt, jsonl or parquet by the file's suffix in any case (C.TXT too), else None."""
    return FILE_KINDS.get(file.suffix.lower())


def shakespeare(path: str | os.PathLike | None = None, url: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> Source:
    """Tiny Shakespeare from a local file or downloaded (and cached) from `url`; split 90/10 by position."""
    if path is not None and url is not None:
        raise UserError("--path (a local copy) or --url (to download), not both")
    if path is not None:
        file = files.user_path(path)
        if not file.is_file():  # (a FIFO is not opened: it would block)
            what = "a directory, not" if file.is_dir() else "not a regular file:" if file.exists() else "no such file:"
            raise UserError(f"{file}: {what} Tiny Shakespeare's text (input.txt)")
    else:
        file = _download_cached(url or SHAKESPEARE_URL, files.user_path(cache_dir) if cache_dir else files.cache_dir())
    digest = files.sha256_file(file)
    unit = Unit(f"tinyshakespeare ({file.stat().st_size} bytes, sha256 {digest[:16]})", "shakespeare",
                lambda scratch: file)
    # one text cut by position: shuffling would only write train before val
    return Source("shakespeare", str(file), {"name": "shakespeare", "val_fraction": 0.1}, [unit], shuffles=False)


def fineweb_edu(sample: str = "sample-10BT", local_dir: str | os.PathLike | None = None,
                revision: str | None = None) -> Source:
    """HuggingFaceFW/fineweb-edu parquet files of one sample, from the hub (downloaded one at a time)
    or from `local_dir` laid out like the hub repo (`local_dir/sample/10BT/*.parquet`)."""
    folder = _fineweb_folder(sample)
    info = {"name": "fineweb-edu", "repo": FINEWEB_REPO, "sample": sample}
    if local_dir is not None and revision is not None:  # a local copy has no revision to choose: it was ignored
        raise UserError("--local-dir (a local copy) or --revision (of the hub's repo), not both")
    if local_dir is not None:
        root = files.user_path(local_dir) / folder
        parquet = sorted(root.glob("*.parquet"))
        if not parquet:
            raise UserError(f"{root}: no .parquet files (expected the layout of the hub repo: "
                            f"DIR/{folder}/*.parquet)")
        units = [_local_unit(f, "parquet", "text", f"{folder}/{f.name}") for f in parquet]
        return Source("edufineweb", str(root), info, units, {"local_dir": str(root)})
    sha, entries = _hub_listing(folder, revision)
    units = [Unit(f"{path} ({size} bytes)", "parquet", _hub_fetcher(path, sha), temporary=True)
             for path, size in entries]
    return Source("edufineweb", f"{FINEWEB_REPO}/{folder}", info, units, {"revision": sha})


def _local_unit(file: Path, kind: str, field: str, name: str) -> Unit:
    stat = file.stat()
    return Unit(f"{name} ({stat.st_size} bytes)", kind, lambda scratch: file, field, stamp=stat.st_mtime_ns)


def _download_cached(url: str, cache: Path) -> Path:
    """`url` into the cache (once); the default Tiny Shakespeare URL is checked against its sha256."""
    dest = cache / f"tinyshakespeare-{hashlib.sha256(url.encode()).hexdigest()[:12]}.txt"
    hint = "pass a local copy: --path FILE (Python: sources.shakespeare(path=FILE))"
    download(url, dest, "Tiny Shakespeare", hint)
    if url == SHAKESPEARE_URL and files.sha256_file(dest) != SHAKESPEARE_SHA256:
        dest.unlink()
        raise UserError(f"{url}: downloaded file has an unexpected sha256; {hint}")
    return dest


def _fineweb_folder(sample: str) -> str:
    if not isinstance(sample, str):  # (re's TypeError was a traceback)
        raise UserError(f"the fineweb-edu sample must be a name such as sample-10BT, got {sample!r}")
    if m := re.fullmatch(r"sample-(\d+BT)", sample):
        return f"sample/{m[1]}"
    if re.fullmatch(r"CC-MAIN-\d{4}-\d{2}", sample):
        return f"data/{sample}"
    raise UserError(f"unknown fineweb-edu sample {sample!r} (sample-10BT, sample-100BT, sample-350BT "
                    "or a crawl such as CC-MAIN-2024-10)")


def _hub_listing(folder: str, revision: str | None) -> tuple[str, list[tuple[str, int]]]:
    """(commit sha, [(path, size)]) of the parquet files under `folder` of the fineweb-edu repo."""
    from huggingface_hub import HfApi

    hint = (f"download the parquet files yourself and pass --local-dir DIR (Python: local_dir=DIR; laid out as "
            f"DIR/{folder}/*.parquet), or use `prepare files`")
    if hub_offline():
        raise UserError(f"HF_HUB_OFFLINE is set, cannot list {FINEWEB_REPO}; {hint}")
    api = HfApi()
    try:
        # dataset_info fails fast when offline (the tree listing retries for ~30 s)
        sha = api.dataset_info(FINEWEB_REPO, revision=revision, timeout=20).sha
        tree = api.list_repo_tree(FINEWEB_REPO, folder, revision=sha, repo_type="dataset")
        entries = sorted((f.path, f.size) for f in tree if f.path.endswith(".parquet"))
    except Exception as e:  # network, auth, missing revision: all mean "use local files"
        raise UserError(f"could not list {FINEWEB_REPO}/{folder} on the Hugging Face hub "
                        f"({first_line(e)}); {hint}") from None
    if not entries:
        raise UserError(f"{FINEWEB_REPO}@{sha[:10]} has no parquet files under {folder}/")
    return sha, entries


def _hub_fetcher(path: str, sha: str) -> Callable[[Path], Path]:
    def fetch(scratch: Path) -> Path:
        from huggingface_hub import hf_hub_download

        try:  # into scratch (not the shared cache) so it can be deleted; partial downloads resume
            return Path(hf_hub_download(FINEWEB_REPO, path, repo_type="dataset", revision=sha, local_dir=scratch))
        except Exception as e:
            raise UserError(f"could not download {path} from {FINEWEB_REPO} ({first_line(e)}); re-run to "
                            "resume, or pass --local-dir (local_dir=) with the files") from None
    return fetch
