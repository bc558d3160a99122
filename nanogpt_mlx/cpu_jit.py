"""How MLX's Linux CPU backend compiles `mx.compile`'s fused kernels, set up before any compiles (cpu.py's setup).

- MLX's x86-64 wheel compiles them with `g++ -O3` for baseline x86-64: SSE2, four lanes, and no per-lane shifts, so a
  kernel that shifts by a computed count (cpu_math.exp's 2**k) runs one number at a time. On a CPU with AVX2 and FMA
  a `g++` wrapper first on PATH adds `-mavx2 -mfma -mf16c` (the flags MLX's own AVX2 builds add), and TMPDIR points
  MLX's kernel cache at a directory of its own, so no baseline build is reused. The rounding is unchanged: MLX
  compiles in ISO C++ mode, where g++ contracts no multiply-add into an FMA. NANOGPT_MLX_NO_AVX2=1 turns it off.
  Elsewhere a wrapper without the flags is first on PATH: either way each kernel's library appears whole (_WRAPPER).
- MLX compiles in $TMPDIR/mlx/<version>/cpu and fails every compiled function where it cannot: a TMPDIR that is
  no writable directory, another user's /tmp/mlx, a full disk or a noexec mount move it elsewhere (_usable_tmpdir),
  and `explain` turns such a failure into one line.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from .errors import UserError
from .files import LOW_SPACE, atomic_path, cache_dir, existing_ancestor

NO_AVX2_ENV = "NANOGPT_MLX_NO_AVX2"
SYSTEM_TMPDIR_ENV = "NANOGPT_MLX_SYSTEM_TMPDIR"  # the TMPDIR before _vectorize_jit, for child processes
JIT_FLAGS = ("-mavx2", "-mfma", "-mf16c")
_EXPANDED = '$`"\\'  # what a shell takes as its own within double quotes: in a path there, MLX's g++ fails
KERNEL_ROOM = 32 * 2**20  # free bytes wanted where MLX compiles: a run's kernels (~16 kB each) and g++'s temporaries

# What setup did, reported by `nanogpt-mlx info` (cpu.info).
jit: str = "MLX's default flags"  # how MLX compiles fused kernels
jit_avx2: bool = False  # whether they are compiled for AVX2 (exp's 2**k by per-lane shifts)
_kernels_tmpdir: str | None = None  # the TMPDIR that _vectorize_jit set, for MLX alone (child_env)
_paths: tuple[str, str] | None = None  # the PATH that _vectorize_jit set, g++'s wrapper first, and the one before


def setup(notes: list[str]) -> None:
    """Have MLX compile through g++'s wrapper (for AVX2 where the CPU has it) in a directory where it can; problems
    that the user should hear of are appended to `notes`."""
    _vectorize_jit(notes)
    _usable_tmpdir()


def cpuinfo(field: str) -> str:
    """The value of a field of the first CPU in /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""


def _vectorize_jit(notes: list[str]) -> None:
    """Have MLX compile its fused CPU kernels through a g++ wrapper (_WRAPPER) first on PATH: for AVX2 (see the
    module docstring) into a kernel cache of their own where the CPU has it, else with MLX's flags in MLX's cache."""
    global jit, jit_avx2, _kernels_tmpdir
    flags = set(cpuinfo("flags").split())
    avx2 = platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= flags
    if os.environ.get(NO_AVX2_ENV, "") not in ("", "0"):
        jit, avx2 = f"MLX's default flags ({NO_AVX2_ENV} is set)", False
    wrappers = None
    try:
        wrappers = cache_dir() / ("jit-avx2" if avx2 else "jit") / "bin"
    except UserError as e:
        jit = f"MLX's default flags ({e})"
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != wrappers]
    gxx = shutil.which("g++", path=os.pathsep.join(path))
    if gxx is None:  # MLX runs `g++ --version` from PATH, once: where it fails, it compiles nothing, ever
        jit = "none: no g++ on PATH; fused graphs run op by op"
        notes.append("no g++ on PATH: MLX compiles no fused kernels, and training steps take about twice as long. "
                     "Install it with `sudo apt-get install g++` (Debian/Ubuntu).")
        return
    if wrappers is None:  # no cache to keep the wrapper in
        return
    home = wrappers.parent
    script = _WRAPPER.replace("GXX", " ".join([shlex.quote(gxx), *(JIT_FLAGS if avx2 else ())]))
    wrapper, kernels = wrappers / "g++", home / "kernels"
    try:
        if not wrapper.is_file() or wrapper.read_text() != script or not os.access(wrapper, os.X_OK):
            with atomic_path(wrapper) as tmp:
                tmp.write_text(script)
                tmp.chmod(0o755)
        if avx2:
            kernels.mkdir(parents=True, exist_ok=True)
    except (OSError, UserError) as e:  # a read-only cache: MLX's default build still works
        jit = f"MLX's default flags (could not write {wrapper}: {e})"
        return
    if not os.access(wrapper, os.X_OK):  # a noexec mount: MLX could neither run the wrapper nor load kernels there
        jit = f"MLX's default flags ({wrapper.parent} does not allow executing)"
        return
    if not avx2:  # MLX's own build, in its own cache: only whole libraries
        _put_first(wrappers, path)
        return
    if why := _cannot_compile_in(kernels):  # a full cache, as a read-only one: the system's temporary directory
        jit = f"MLX's default flags ({_kernel_dir(kernels)} {why})"
        return
    # MLX keeps compiled kernels in $TMPDIR/mlx/<version>/cpu, by name only: a directory of our own keeps
    # baseline builds out. MLX reads TMPDIR from this process's environment, at each kernel, so it is set here;
    # this process's Python temporary files stay where they were, and so do those of the children this package
    # starts (child_env) and of a child that imports nanogpt_mlx.
    system_tmp = os.environ.get(SYSTEM_TMPDIR_ENV) if os.environ.get("TMPDIR") == str(kernels) else None
    tempfile.tempdir = system_tmp or tempfile.gettempdir()
    os.environ[SYSTEM_TMPDIR_ENV] = tempfile.tempdir
    os.environ["TMPDIR"] = _kernels_tmpdir = str(kernels)
    _put_first(wrappers, path)
    jit, jit_avx2 = f"g++ {' '.join(JIT_FLAGS)} (kernels in {kernels})", True


def _put_first(wrappers: Path, path: list[str]) -> None:
    """PATH as `path` after `wrappers`, where MLX finds g++'s wrapper; the PATH before, without it, for child_env."""
    global _paths
    before = [d for d in os.environ["PATH"].split(os.pathsep) if Path(d) != wrappers]  # (a child of an older one's)
    os.environ["PATH"] = os.pathsep.join([str(wrappers), *path])
    _paths = (os.environ["PATH"], os.pathsep.join(before))


# MLX's `g++ ... SOURCE -o LIBRARY` (GXX: the compiler, and the AVX2 flags where they are used).
# - Ctrl-C in a terminal signals the whole process group: a compiler killed mid-kernel fails MLX's step with a
#   missing library, where the trainer would finish the step and save. The kernel takes seconds; it completes.
# - MLX loads a library that it finds at its path without compiling it, so one that the linker is still writing there
#   for another process (the ranks of `--ranks N` compile the same kernels at once) could be loaded half written:
#   2 ranks on an empty kernel cache were seen to train on wrong numbers. Each compiler writes a file of its own,
#   renamed to the path once whole. A compile that fails, as one whose source the other process was rewriting (MLX
#   writes it before compiling), is tried again, unless the other process's library is there by then.
_WRAPPER = """#!/bin/sh
trap '' INT TERM
n=$# out= prev=
for a in "$@"; do
  if [ "$prev" = -o ]; then out=$a; a=$a.$$.tmp; fi
  set -- "$@" "$a"
  prev=$a
done
shift "$n"
[ -n "$out" ] || exec GXX "$@"
for try in 1 2; do
  GXX "$@" && mv -f "$out.$$.tmp" "$out" && exit 0
  rm -f "$out.$$.tmp"
  [ -f "$out" ] && exit 0
done
exit 1
"""


def child_env() -> dict[str, str]:
    """os.environ for a child process: TMPDIR back at the system's where _vectorize_jit pointed it at MLX's kernels
    (the temporary files of a compiler, `mktemp`, a rank were left among them), and PATH back at the user's, without
    the g++ wrapper for MLX (a child's own g++ would compile with its flags; a child that imports nanogpt_mlx puts
    it first again)."""
    env = dict(os.environ)
    if _kernels_tmpdir is not None and env.get("TMPDIR") == _kernels_tmpdir:
        env["TMPDIR"] = env[SYSTEM_TMPDIR_ENV]
    if _paths is not None and env.get("PATH") == _paths[0]:
        env["PATH"] = _paths[1]
    return env


def _kernel_dir(tmp: str | os.PathLike | None = None) -> Path:
    """Where MLX's CPU backend writes and compiles its kernels: $TMPDIR/mlx/<its version>/cpu."""
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:  # a build of MLX not installed as a package: its parent, at least
        version = ""
    return Path(tmp or os.environ.get("TMPDIR") or tempfile.gettempdir()) / "mlx" / version / "cpu"


def _free_bytes(place: str | os.PathLike) -> int:
    """The bytes this user can still write on `place`'s disk: 0 where it has no inodes left."""
    disk = os.statvfs(place)
    return 0 if disk.f_files and not disk.f_favail else disk.f_bavail * disk.f_frsize


def noexec(place: str | os.PathLike) -> bool:
    """Whether `place` (or, where it is not there yet, the directory it would be made in) is on a mount that lets
    no program or library be loaded from it (mount -o noexec, a common hardening of /tmp)."""
    return bool(os.statvfs(existing_ancestor(place)).f_flag & os.ST_NOEXEC)


def _shell_expanded(path: Path) -> str:
    """The characters of `path` that a shell takes as its own within double quotes (_EXPANDED; '' where none)."""
    return "".join(c for c in _EXPANDED if c in str(path))


def _cannot_compile_in(tmp: str | os.PathLike) -> str:
    """Why MLX could not compile its kernels under `tmp` ('' where it can)."""
    kernels = _kernel_dir(tmp)
    if expanded := _shell_expanded(kernels):
        return f"has {expanded} in its path, which MLX's g++ command, in double quotes, leaves to the shell"
    try:
        kernels.mkdir(parents=True, exist_ok=True)
    except OSError:  # a full disk (MLX would fail with a traceback), a read-only one
        return "cannot be written"
    if not os.access(kernels, os.W_OK | os.X_OK):  # another user's /tmp/mlx, say
        return "cannot be written"
    if noexec(kernels):  # g++ would build kernels there that MLX could not load (a traceback at the first)
        return "is on a noexec mount"
    # g++ would fail on a full disk mid-run, at the first kernel not built yet, leaving its files behind
    if _free_bytes(kernels) < KERNEL_ROOM:
        return f"has under {KERNEL_ROOM // 2**20} MB free"
    return ""


def _usable_tmpdir() -> None:
    """MLX compiles its kernels in _kernel_dir() and fails every compiled function where it cannot make or write
    there: a TMPDIR that names no writable directory, another user's /tmp/mlx on a shared machine, a full disk.
    Make that directory now, or point TMPDIR where it can be made and has room: Python's temporary directory, then
    one in this user's cache (where _vectorize_jit has not moved TMPDIR already)."""
    global jit
    tmp = os.environ.get("TMPDIR")
    if tmp and not (os.path.isdir(tmp) and os.access(tmp, os.W_OK | os.X_OK)):
        os.environ["TMPDIR"] = tempfile.gettempdir()  # Python's own fallback: /tmp, /var/tmp, ... or the cwd
        jit += f" [TMPDIR={tmp} is not a writable directory: kernels in {os.environ['TMPDIR']}]"
    why = _cannot_compile_in(os.environ.get("TMPDIR") or tempfile.gettempdir())
    if not why:
        return
    try:
        mine = cache_dir() / "mlx-tmp"
    except UserError:
        return  # explain() says what is wrong when a kernel fails
    if not _cannot_compile_in(mine):
        jit += f" [{_kernel_dir().parent.parent} {why}: kernels in {mine}]"
        os.environ["TMPDIR"] = str(mine)


def explain(e: RuntimeError) -> str | None:
    """One line for MLX's CPU backend failing to compile or load a kernel or to make its kernel directory
    (_kernel_dir), or None for another error, with what is wrong with that directory where that can be seen."""
    where = _kernel_dir()
    if "Could not load C++ shared library" in str(e):  # MLX's dlopen of a kernel that it compiled
        said = str(e).strip().splitlines()[-1][-300:]
        why = "a noexec mount: set TMPDIR to a directory that allows executing" if noexec(where) else \
            "see the loader's message"
        return f"MLX could not load a kernel that it compiled in {where} ({why}): {said}"
    if "[Compile::eval_cpu]" not in str(e) and not ("filesystem error" in str(e) and str(where.parent.parent) in
                                                     str(e)):
        return None
    said = str(e).strip().splitlines()[-1][-300:]
    place = existing_ancestor(where)
    if expanded := _shell_expanded(where):
        why = f"its path has {expanded}, which MLX's g++ command leaves to the shell: set TMPDIR to another"
    elif not os.access(place, os.W_OK | os.X_OK):
        why = f"{place} is not writable by this user"
    else:
        why = "its disk is full" if _free_bytes(place) < LOW_SPACE else "see the compiler's message"
    return f"MLX could not compile a kernel in {where} ({why}): {said}"
