"""Crash-safe file writing: a file appears under its final name only when complete, and a disk that
cannot take it (read-only, full, a file where a directory should be) is one line, with nothing left behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import secrets
import socket
import ssl
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from . import signals
from .errors import UserError, first_line

# What a writer's body may raise that is not about the disk (a download's connection): passed through.
NETWORK_ERRORS = (ConnectionError, TimeoutError, ssl.SSLError)
LOW_SPACE = 1 << 20  # bytes; less free space than this after a failed write means the disk is full
# a temporary's name tells its writer, host and pid, so that the next writer there can remove it once that writer is
# gone (_remove_orphans); the host (a tag of its name: containers have their own) as other hosts' pids are not ours
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_OWNER = r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)"  # the writer in a temporary's name (_owner)
# any temporary's name as the writers below make it: `.NAME.tmp`, the writer, then atomic_path's suffix (`.npy`) or
# atomic_dir's and atomic_files' 8 random characters; a user's `.notes.tmp2024.txt` has no writer's mark
_TEMP = rf"\..+\.tmp{_OWNER}(\.[^.]*|-\w{{8}})?"


def existing_ancestor(path: str | os.PathLike) -> Path:
    """`path` (made absolute), or its nearest ancestor that exists: where a path to be made would be made."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cannot(what: str, path: str | os.PathLike, e: OSError) -> UserError:
    """`PATH: cannot WHAT (reason)`, the one line for a storage error. Some writers (numpy's short
    writes, MLX) give no errno: a nearly full disk is then named as the reason."""
    reason = e.strerror
    if not reason:
        full = shutil.disk_usage(existing_ancestor(Path(path).absolute().parent)).free < LOW_SPACE
        reason = "No space left on device" if full else first_line(e)
    return UserError(f"{path}: cannot {what} ({reason})")


def make_dirs(path: str | os.PathLike) -> Path:
    """`mkdir -p path`; a failure (read-only, no permission, a file in the way) is one UserError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # exist_ok covers directories only
        raise UserError(f"{path}: cannot create directory (a file of that name is in the way)") from None
    except OSError as e:
        raise cannot("create directory", path, e) from None
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after the work, if `path` (a file or directory, existing or not) cannot be written:
    make and remove a file in the nearest directory that exists. Creates nothing that stays."""
    path = Path(path).absolute()
    parent = existing_ancestor(path if path.is_dir() else path.parent)
    if not parent.is_dir():
        raise UserError(f"{path}: cannot write ({parent} is not a directory)")
    probe = parent / f".nanogpt-mlx-probe{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise cannot("write", path, e) from None


def mlx_path(path: str | os.PathLike) -> str:
    """`path` as a str for MLX's file functions, which can only take UTF-8: a name with bytes that are not (os.fsdecode
    gives them as surrogates) raised std::bad_cast, which read as a damaged file or a full disk."""
    path = os.fspath(path)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode(errors="surrogateescape").decode(errors="replace")
        raise UserError(f"MLX can only open UTF-8 paths: {shown} is not one (rename it)") from None
    return path


def devnull_onto(fd: int) -> None:
    """Point file descriptor `fd` at /dev/null (a stream whose reader is gone, or that was closed at start)."""
    null = os.open(os.devnull, os.O_WRONLY)  # the lowest free number: fd itself if it was closed
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


def named_dir(path: str | os.PathLike, what: str, name: str = "a directory") -> str | os.PathLike:
    """`path`, unless it is no str or path (None, a number: a TypeError far on), holds a NUL byte, or is '': Path('')
    is the working directory, which an unset variable would write into (or, where a file is wanted, write as). `name`
    is what to name instead: "a directory", "a file"."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"the {what} must be a str or path, got {path!r}")
    text = os.fspath(path)
    if not text:
        raise UserError(f"the {what} is '' (an unset variable?); name {name}")
    if isinstance(text, str) and "\0" in text:  # (the os' ValueError, "embedded null byte", was a traceback)
        raise UserError(f"the {what} {text!r} holds a NUL byte, which no file name can")
    return path


def output_file(path: str | os.PathLike, what: str, name: str = "a file") -> Path:
    """`path` (a leading `~` expanded) checked to name a file this process can write, replacing what is there: now,
    not after the work that makes it. `what` names it in the errors (e.g. "records file"), `name` says what to name
    instead of ''."""
    path = user_path(named_dir(path, what, name))
    if path.is_dir():
        raise UserError(f"{path}: is a directory (the {what} is a file)")
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: not a regular file (the {what} replaces the file it names)")
    # a link is written through: the file it names is replaced, the link kept (replaced, a root's /dev/stdout
    # became a file, and a link into another directory left that directory's file as it was)
    path = Path(os.path.realpath(path)) if path.is_symlink() else path
    for fd, stream in ((1, "standard output"), (2, "standard error")):
        with contextlib.suppress(OSError):  # (a closed stream, a file not there yet)
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                raise UserError(f"{path}: is this process's {stream}, which the {what} would replace: name "
                                "another file")
    check_writable(path)
    return path


def user_path(path: str | os.PathLike) -> Path:
    """`path` with a leading `~` or `~user` expanded; where it cannot be (no such user, or no home directory), one
    UserError: Path.expanduser's RuntimeError was a traceback."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        if Path(path).parts[0] == "~":  # HOME unset and a uid without a passwd entry (e.g. docker --user N)
            raise UserError(f"{path}: no home directory to expand ~ in (set HOME)") from None
        raise UserError(f"{path}: no such user") from None


def _short(name: str, limit: int = 200) -> str:
    """`name` cut to `limit` bytes (whole characters) for a temporary name beside it: a name near the file
    system's limit of 255 bytes was refused once the temporary's marks were added."""
    return name.encode(errors="surrogateescape")[:limit].decode(errors="ignore")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    Usage: `with atomic_path(out) as tmp: write(tmp)`. On any error the temp file is removed and
    `path` keeps its previous content; a storage error (also from the body) becomes one UserError.
    """
    path = Path(path)
    make_dirs(path.parent)
    # Keep the real suffix last: some writers (np.save, mx.save_safetensors) append one otherwise. (A "suffix" of
    # hundreds of bytes is the name's bulk: cut as the stem.)
    stem, suffix = (path.stem, path.suffix) if len(path.suffix.encode(errors="surrogateescape")) <= 32 else \
        (path.name, "")
    stem = _short(stem)
    tmp = path.with_name(f".{stem}.tmp{_owner()}{suffix}")
    _remove_orphans(path.parent, rf"\.{re.escape(stem)}\.tmp{_OWNER}{re.escape(suffix)}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, NETWORK_ERRORS):
            raise
        raise cannot("write", path, e) from None
    finally:
        with contextlib.suppress(OSError):  # on a read-only disk even a missing file's unlink fails
            tmp.unlink(missing_ok=True)


def _owner() -> str:
    """This process, as a temporary's name tells its writer."""
    return f"{HOST_TAG}-{os.getpid()}"


def _remove_orphans(directory: Path, pattern: str) -> None:
    """Delete the temporaries in `directory` whose names match `pattern` (with _OWNER's groups) and whose writer
    was on this host and is gone: what a kill -9 or a crash left (an exported model's worth, or a download). A live
    writer's stay, another host's (a shared disk), and a dead one's whose pid another process has taken since."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            found = re.fullmatch(pattern, entry.name)
            if found and found["host"] == HOST_TAG and not _alive(int(found["pid"])):
                with contextlib.suppress(OSError):
                    _delete(Path(entry.path))


def _delete(path: Path) -> None:
    """Remove a file (a link: itself), or a directory with what it holds (as far as it can)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; a number no pid can be (kept)
        pass
    return True


def remove_stale_temps(directory: Path) -> None:
    """Delete what a killed writer left half-written in `directory`, whoever wrote it (the caller holds the directory's
    lock): the temporaries of atomic_path, atomic_dir and atomic_files, named as they name them (_TEMP), no other."""
    for stale in directory.glob(".*.tmp*"):
        if re.fullmatch(_TEMP, stale.name):
            _delete(stale)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path` (which does not exist); on success fsync it and rename it to
    `path`, so that `path` holds all of it or nothing. On any error the temporary directory is
    removed; a storage error (also from the body) becomes one UserError."""
    path = Path(path)
    make_dirs(path.parent)
    name = _short(path.name)
    tmp = path.with_name(f".{name}.tmp{_owner()}-{secrets.token_hex(4)}")  # no other writer's
    _remove_orphans(path.parent, rf"\.{re.escape(name)}\.tmp{_OWNER}-[0-9a-f]{{8}}")
    try:
        tmp.mkdir()  # (mkdtemp's would be private: 0700 whatever the umask)
        yield tmp
        _fsync_dir(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, NETWORK_ERRORS):
            raise
        raise cannot("write", path, e) from None
    except UserError as e:  # a writer's error names its file in the temporary directory, gone after this
        raise UserError(str(e).replace(str(tmp), str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):  # the rename's durability: done, or the file system's to finish
        _fsync_dir(path.parent)


def owned_temp_dir(prefix: str, directory: Path | None = None) -> Path:
    """A new directory in `directory` (default: the system's temporary one) named `prefix`, this process (_owner), "-"
    and mkdtemp's 8 characters (pids repeat across containers); those there that a gone process left are removed."""
    directory = Path(directory or tempfile.gettempdir())
    _remove_orphans(directory, rf"{re.escape(prefix)}{_OWNER}-\w{{8}}")
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_owner()}-", dir=directory))


STAGING = ".export.tmp"  # atomic_files' directories (export_hf's): owned_temp_dir's


@contextlib.contextmanager
def atomic_files(directory: Path, names: Sequence[str], remove: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging directory inside the existing `directory`, for the body to write the files `names` into;
    then rename them into `directory` one after another, and delete the files (or folders) `remove` there (old ones
    that a reader would take with the new), with Ctrl-C and SIGTERM held back. A signal or a storage error leaves the
    files there before as they were, not some old and some new (only a kill -9 or a crash amid the renames,
    milliseconds, can mix them); a directory under one of `names` is refused before the first. The directory itself
    stays: its inode, owner, mode (it may be a mount point or the working directory). A storage error becomes one
    UserError."""
    staging = None
    try:
        staging = owned_temp_dir(STAGING, directory)
        yield staging
        with signals.deferred():
            written = sorted(f.name for f in staging.iterdir())
            if written != sorted(names):  # another process took files from it
                raise UserError(f"{directory}: the files changed while they were written ({', '.join(written)})")
            for name in written:  # before the first rename: one failing midway left the files before it replaced
                if (directory / name).is_dir() and not (directory / name).is_symlink():
                    raise UserError(f"{directory / name}: cannot write (a directory of that name is in the way)")
            for name in written:
                os.replace(staging / name, directory / name)
            for name in remove:
                _delete(directory / name)
    except OSError as e:
        raise cannot("write", directory, e) from None
    except UserError as e:  # the files' names, not the staging directory's
        raise UserError(str(e).replace(str(staging), str(directory))) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def as_paths(paths: str | os.PathLike | Iterable[str | os.PathLike], what: str = "paths") -> list[str | os.PathLike]:
    """One path or several (a list, a glob's generator...), as a list: a str is one path, not its characters.
    Anything else is refused (UserError) as `what`: an int or None failed later as a TypeError, or was read as a
    file named "3"."""
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    try:
        listed = None if isinstance(paths, bytes) else list(paths)
    except TypeError:
        listed = None
    if listed is None or not all(isinstance(p, (str, os.PathLike)) for p in listed):
        raise UserError(f"{what} must be a path or a list of paths, got {paths if listed is None else listed!r}")
    return listed


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike):
    """A JSON file's value (parse_json)."""
    return parse_json(Path(path).read_text())


def parse_json(text: str | bytes):
    """A JSON text's value. Nesting past Python's recursion limit (a damaged or hostile file) is a ValueError, as
    other malformed JSON is (and an integer of over 4300 digits): it was a RecursionError's traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where downloads and built files are kept: $XDG_CACHE_HOME/nanogpt-mlx (default ~/.cache/nanogpt-mlx; a
    relative XDG_CACHE_HOME is ignored, as the XDG spec says)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "nanogpt-mlx"
    try:
        return Path("~/.cache").expanduser() / "nanogpt-mlx"
    except RuntimeError:  # HOME unset and a uid without a passwd entry (e.g. docker --user N)
        raise UserError("no home directory to keep the cache in: set XDG_CACHE_HOME (or HOME)") from None


def shell_word(path: str | os.PathLike) -> str:
    """`path` as one word of a command a message suggests (`--resume OUT`): quoted where a shell would split it."""
    return shlex.quote(str(path))
