"""cpu_jit.py's kernel compiler on x86-64: MLX's fused CPU kernels built for AVX2 into a cache of their own, and
exp as one such kernel (with MLX's default flags it still works, by its float32 bits)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from nanogpt_mlx import cpu_jit, device

# cpu.py sets MLX's CPU backend up on Linux only, and where the device profile is a CPU one (MLX's default device)
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not device.PROFILE.cpu_backend,
                                reason="MLX's CPU backend on Linux only")

PROBE = r"""
import glob, json, os, subprocess, sys, tempfile
import nanogpt_mlx
from nanogpt_mlx import cpu_jit, cpu_math
import mlx.core as mx
import numpy as np

x = mx.random.uniform(-63.9, 0, (1000,), key=mx.random.key(0))
y = mx.compile(cpu_math.exp)(mx.concatenate([x, mx.array([-mx.inf, -1e30])]))
mx.eval(y)
cache = glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "mlx", "*", "cpu"))
child = subprocess.run([sys.executable, "-c", "import nanogpt_mlx, os, tempfile; "
                        "print(tempfile.gettempdir(), os.environ['PATH'].count('jit-avx2'))"],
                       capture_output=True, text=True, check=True).stdout.split()
print(json.dumps({
    "avx2": cpu_jit.jit_avx2, "jit": cpu_jit.jit, "tmpdir": os.environ.get("TMPDIR"),
    "python_tmp": tempfile.gettempdir(),
    "path0": os.environ["PATH"].split(os.pathsep)[0], "child_tmp": child[0], "child_wrappers": int(child[1]),
    "mktemp": subprocess.run(["mktemp", "-u"], env=cpu_jit.child_env(), capture_output=True, text=True).stdout.strip(),
    "child_path": cpu_jit.child_env()["PATH"],
    "kernels": sorted(os.path.basename(k) for k in glob.glob(os.path.join(cache[0], "*.so"))) if cache else [],
    "cache": cache[0] if cache else "", "err": float(np.max(np.abs(np.array(y[:-2]) / np.exp(np.array(x, dtype=np.float64)) - 1))),
    "tails": y[-2:].tolist()}))
"""

x86_with_avx2 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not {"avx2", "fma", "f16c"} <= set(cpu_jit.cpuinfo("flags").split()) or shutil.which("g++") is None,
    reason="needs an x86-64 CPU with AVX2 and FMA, and g++")


def _fake_statvfs(env: str, result: str) -> str:
    """Code run before PROBE: os.statvfs gives `result` (an expression of the real `disk`) under the path in $env."""
    return f"""
import os
_statvfs = os.statvfs
def _fake(path):
    disk = _statvfs(path)
    if not os.path.abspath(path).startswith(os.environ["{env}"]):
        return disk
    return {result}
os.statvfs = _fake
"""


# the disk under FULL_DISK has 100 kB free (what shutil.disk_usage and os.statvfs report)
FULL_DISK = _fake_statvfs("FULL_DISK", "os.statvfs_result((*disk[:3], 0, 100_000 // disk.f_frsize, *disk[5:]))")
# the disk under NOEXEC is mounted noexec
NOEXEC = _fake_statvfs("NOEXEC", "os.statvfs_result((*disk[:8], disk.f_flag | os.ST_NOEXEC, *disk[9:]))")


def probe(tmp_path, prelude: str = "", **env) -> dict:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(system_tmp),
           "NANOGPT_MLX_PROFILE": "cpu-x86", **env}
    env.pop(cpu_jit.SYSTEM_TMPDIR_ENV, None)
    env["PATH"] = os.pathsep.join(d for d in env["PATH"].split(os.pathsep) if "jit-avx2" not in d)
    out = subprocess.run([sys.executable, "-c", prelude + PROBE], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout) | {"system_tmp": str(system_tmp), "path": env["PATH"]}


@x86_with_avx2
def test_kernels_are_compiled_for_avx2_into_their_own_cache(tmp_path):
    got = probe(tmp_path)
    home = tmp_path / "cache" / "nanogpt-mlx" / "jit-avx2"
    assert got["avx2"] and got["jit"].startswith("g++ -mavx2 -mfma -mf16c")
    assert got["tmpdir"] == str(home / "kernels") and got["path0"] == str(home / "bin")
    wrapper = (home / "bin" / "g++").read_text()
    assert "-mavx2 -mfma -mf16c" in wrapper and "jit-avx2" not in wrapper  # calls the real g++, not itself
    # Python's own temporary files stay in the system's directory, also in a child process, which neither
    # wraps g++ twice nor loses the kernel cache
    assert got["python_tmp"] == got["child_tmp"] == got["system_tmp"] and got["child_wrappers"] == 1
    # the children this package starts (cc, ranks) too, even those that are not Python: MLX alone writes there;
    # and their PATH is the user's (a child's own g++ has no AVX2 flags added)
    assert os.path.dirname(got["mktemp"]) == got["system_tmp"] and got["child_path"] == got["path"]
    # exp is two fused kernels: the clamp, and the rest built for AVX2
    clamp, body = sorted(got["kernels"], key=lambda name: "Maximum" not in name)
    assert len(got["kernels"]) == 2 and "Maximum" in clamp and "Maximum" not in body, got["kernels"]
    assert got["err"] < 3e-7 and got["tails"] == [0.0, 0.0]
    if shutil.which("objdump"):
        dump = subprocess.run(["objdump", "-d", os.path.join(got["cache"], body)],
                              capture_output=True, text=True, check=True).stdout
        assert "ymm" in dump  # 8 lanes: the AVX2 registers


def test_default_flags_when_turned_off(tmp_path):
    got = probe(tmp_path, NANOGPT_MLX_NO_AVX2="1")
    assert not got["avx2"] and "NANOGPT_MLX_NO_AVX2" in got["jit"]
    assert got["tmpdir"] == got["python_tmp"] == got["system_tmp"] and "jit-avx2" not in got["path0"]
    if shutil.which("g++"):  # MLX's own flags, through the wrapper that publishes each library whole
        home = tmp_path / "cache" / "nanogpt-mlx" / "jit"
        assert got["path0"] == str(home / "bin") and "-mavx2" not in (home / "bin" / "g++").read_text()
        assert not (home / "kernels").exists() and got["kernels"]  # compiled in MLX's cache
    assert got["child_path"] == got["path"]
    # exp's 2**k from its float32 bits instead of per-lane shifts: as accurate
    assert got["err"] < 3e-7 and got["tails"] == [0.0, 0.0]


def test_a_tmpdir_that_is_no_directory_falls_back_as_python_does(tmp_path):
    """MLX writes compiled kernels under $TMPDIR and fails every compiled function where it cannot."""
    got = probe(tmp_path, NANOGPT_MLX_NO_AVX2="1", TMPDIR=str(tmp_path / "missing"))
    assert got["tmpdir"] == got["python_tmp"] != str(tmp_path / "missing")
    assert "missing is not a writable directory" in got["jit"] and got["err"] < 3e-7


def test_a_kernel_directory_that_cannot_be_made_moves_to_the_users_cache(tmp_path):
    """Another user's /tmp/mlx on a shared machine, or a full disk: MLX could not make $TMPDIR/mlx/<version>/cpu
    and failed every compiled function (a traceback, or "a full disk?" on a disk with room). Here `mlx` is a file."""
    shared = tmp_path / "shared-tmp"
    shared.mkdir()
    (shared / "mlx").write_text("")
    got = probe(tmp_path, NANOGPT_MLX_NO_AVX2="1", TMPDIR=str(shared))
    assert got["tmpdir"] == str(tmp_path / "cache" / "nanogpt-mlx" / "mlx-tmp")
    assert f"{shared / 'mlx'} cannot be written" in got["jit"] and got["err"] < 3e-7  # its kernels compiled


@x86_with_avx2
def test_a_full_cache_falls_back_as_a_read_only_one(tmp_path):
    """g++ failed at the first kernel in a cache with a few kB free (the wrapper and kernel directory made): every
    compiled function failed, where a read-only cache compiled with MLX's default flags in the system's TMPDIR."""
    got = probe(tmp_path, FULL_DISK, FULL_DISK=str(tmp_path / "cache"))
    assert not got["avx2"] and got["jit"].startswith("MLX's default flags (") and "MB free" in got["jit"]
    assert got["tmpdir"] == got["system_tmp"] and "jit-avx2" not in got["path0"]
    assert got["err"] < 3e-7 and got["kernels"]  # compiled in the system's TMPDIR


def test_a_full_tmpdir_moves_to_the_users_cache(tmp_path):
    got = probe(tmp_path, FULL_DISK, NANOGPT_MLX_NO_AVX2="1", FULL_DISK=str(tmp_path / "system-tmp"))
    assert got["tmpdir"] == str(tmp_path / "cache" / "nanogpt-mlx" / "mlx-tmp")
    assert "MB free: kernels in" in got["jit"] and got["err"] < 3e-7 and got["kernels"]


def test_a_noexec_tmpdir_moves_to_the_users_cache(tmp_path):
    """/tmp mounted noexec: g++ built each kernel there and MLX's dlopen of it failed, a traceback at the first."""
    got = probe(tmp_path, NOEXEC, NANOGPT_MLX_NO_AVX2="1", NOEXEC=str(tmp_path / "system-tmp"))
    assert got["tmpdir"] == str(tmp_path / "cache" / "nanogpt-mlx" / "mlx-tmp")
    assert "is on a noexec mount: kernels in" in got["jit"] and got["err"] < 3e-7 and got["kernels"]


@x86_with_avx2
def test_a_noexec_cache_keeps_mlx_default_flags(tmp_path):
    got = probe(tmp_path, NOEXEC, NOEXEC=str(tmp_path / "cache"))
    assert not got["avx2"] and got["jit"].startswith("MLX's default flags (") and "noexec mount" in got["jit"]
    assert got["tmpdir"] == got["system_tmp"] and "jit-avx2" not in got["path0"]
    assert got["err"] < 3e-7 and got["kernels"]  # compiled in the system's TMPDIR


@x86_with_avx2
def test_a_cache_whose_path_the_shell_would_expand_keeps_mlx_default_flags(tmp_path):
    """MLX puts the kernel's paths in double quotes in its g++ command: a `$` in the cache's path was expanded
    there, and every fused kernel failed to compile."""
    got = probe(tmp_path, XDG_CACHE_HOME=str(tmp_path / "do$llar"))
    assert not got["avx2"] and got["jit"].startswith("MLX's default flags (") and "has $ in its path" in got["jit"]
    assert got["tmpdir"] == got["system_tmp"] and got["err"] < 3e-7 and got["kernels"]


@pytest.mark.parametrize("name", ['back`tick', 'quo"te', "back\\slash"])
def test_a_tmpdir_whose_path_the_shell_would_expand_moves_to_the_users_cache(tmp_path, name):
    (tmp_path / name).mkdir()
    got = probe(tmp_path, NANOGPT_MLX_NO_AVX2="1", TMPDIR=str(tmp_path / name))
    assert got["tmpdir"] == str(tmp_path / "cache" / "nanogpt-mlx" / "mlx-tmp")
    assert "in its path" in got["jit"] and got["err"] < 3e-7 and got["kernels"]


def test_a_kernel_that_cannot_be_loaded_is_explained(monkeypatch, tmp_path):
    """MLX's dlopen of a kernel on a noexec mount was a 30-line traceback."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    where = cpu_jit._kernel_dir()
    failed = RuntimeError(f"Could not load C++ shared library {where}/k.so: failed to map segment from shared object")
    statvfs = os.statvfs
    monkeypatch.setattr(cpu_jit.os, "statvfs", lambda p: os.statvfs_result(
        (*statvfs(p)[:8], statvfs(p).f_flag | os.ST_NOEXEC, *statvfs(p)[9:])))
    assert device.explain(failed) == (f"MLX could not load a kernel that it compiled in {where} (a noexec mount: set "
                                      f"TMPDIR to a directory that allows executing): {failed}")


def test_a_kernel_that_cannot_be_compiled_is_explained(monkeypatch, tmp_path):
    """MLX's own failures to make its kernel directory were a traceback; a compiler's, "a full disk?" always."""
    import collections

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    where = cpu_jit._kernel_dir()
    made = RuntimeError(f"filesystem error: cannot create directories: No space left on device [{where}]")
    disk = collections.namedtuple("disk", "f_bavail f_frsize f_files f_favail")
    monkeypatch.setattr(cpu_jit.os, "statvfs", lambda p: disk(0, 4096, 100, 0))
    assert cpu_jit.explain(made) == f"MLX could not compile a kernel in {where} (its disk is full): {made}"
    monkeypatch.setattr(cpu_jit.os, "statvfs", lambda p: disk(10**6, 4096, 100, 50))
    said = cpu_jit.explain(RuntimeError("[Compile::eval_cpu] g++\nerror: x"))
    assert "(see the compiler's message): error: x" in said
    assert cpu_jit.explain(RuntimeError("filesystem error: cannot create directories [/elsewhere]")) is None
    monkeypatch.setenv("TMPDIR", str(tmp_path / "do$llar"))
    assert "its path has $, which MLX's g++ command leaves to the shell" in cpu_jit.explain(
        RuntimeError("[Compile::eval_cpu] Failed to compile function"))


def test_no_gxx_is_said(tmp_path):
    """Without g++ MLX compiles nothing and runs each fused graph op by op (training steps about 2x slower), where
    info said "MLX's default flags" and no command said a word."""
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": str(tmp_path / "bin"),
           "NANOGPT_MLX_PROFILE": "cpu-x86"}
    said = ("import json, nanogpt_mlx; from nanogpt_mlx import cpu_jit, cpu_math, device; "
            "import mlx.core as mx; "
            "print(json.dumps([cpu_jit.jit, device.notes(), mx.compile(cpu_math.exp)(mx.array([-1.0])).item()]))")
    proc = subprocess.run([sys.executable, "-c", said], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    jit, notes, e = json.loads(proc.stdout)
    assert jit == "none: no g++ on PATH; fused graphs run op by op" and abs(e - 0.36787944) < 1e-6
    assert [n for n in notes if "g++" in n] == [
        "no g++ on PATH: MLX compiles no fused kernels, and training steps take about twice as long. "
        "Install it with `sudo apt-get install g++` (Debian/Ubuntu)."]


@x86_with_avx2
def test_the_compiler_outlives_a_ctrl_c_to_its_process_group(tmp_path):
    """Ctrl-C signals the terminal's whole process group: MLX's step would fail on a kernel whose compiler died,
    where the trainer finishes the step and saves it."""
    import signal
    import time

    probe(tmp_path)
    wrapper = tmp_path / "cache" / "nanogpt-mlx" / "jit-avx2" / "bin" / "g++"
    # as MLX runs it (popen of sh -c); `-E -` preprocesses standard input, so it waits for it
    proc = subprocess.Popen(["sh", "-c", f"{wrapper} -E -x c++ - 2>&1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True, text=True)
    time.sleep(1)  # the compiler runs (and has set up its signals)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate("int answer = 42;\n", timeout=30)
    assert "int answer = 42;" in out


@x86_with_avx2
def test_a_stale_wrapper_is_replaced(tmp_path):
    wrapper = tmp_path / "cache" / "nanogpt-mlx" / "jit-avx2" / "bin" / "g++"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("#!/bin/sh\nexit 1\n")  # another compiler's, and not executable
    got = probe(tmp_path)
    assert got["avx2"] and os.access(wrapper, os.X_OK) and "-mavx2" in wrapper.read_text()
    assert got["err"] < 3e-7


@x86_with_avx2
def test_a_cache_that_cannot_be_written_keeps_mlx_default_flags(tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    got = probe(tmp_path, XDG_CACHE_HOME=str(blocked))
    assert not got["avx2"] and "could not write" in got["jit"]
    assert got["tmpdir"] == got["python_tmp"] == got["system_tmp"] and "jit-avx2" not in got["path0"]
    assert got["err"] < 3e-7 and got["tails"] == [0.0, 0.0]


# a stand-in for g++ that writes its -o output as a linker does, a part at a time: FAKE_GXX_MODE says how it ends
FAKE_GXX = r"""#!/bin/sh
out= prev=
for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done
echo "$out" >> "$FAKE_GXX_LOG"
case "$FAKE_GXX_MODE" in
  fail) echo "error: no" >&2; exit 1;;
  other) printf other > "$FAKE_GXX_OTHER"; exit 1;;  # another process published the library meanwhile
  once) [ -e "$FAKE_GXX_LOG.failed" ] || { touch "$FAKE_GXX_LOG.failed"; exit 1; };;
esac
printf half > "$out"; sleep 1; printf -- -whole >> "$out"
"""


@x86_with_avx2
@pytest.mark.parametrize("mode, status, library", [("whole", 0, "half-whole"), ("once", 0, "half-whole"),
                                                   ("other", 0, "other"), ("fail", 1, None)])
def test_a_kernel_library_appears_at_its_path_only_whole(tmp_path, mode, status, library):
    """MLX loads a kernel's library that it finds at its path without compiling it: one that the linker was still
    writing there for another process (ranks compile the same kernels at once) was loaded half written, and two
    ranks on an empty kernel cache trained on wrong numbers. The wrapper links under a name of its own and renames;
    a compile that fails (its source rewritten by the other process) is tried again, or is done where the other
    process's library is there."""
    import time

    fake = tmp_path / "fake-bin" / "g++"
    fake.parent.mkdir()
    fake.write_text(FAKE_GXX)
    fake.chmod(0o755)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "NANOGPT_MLX_PROFILE": "cpu-x86",
           "PATH": os.pathsep.join([str(fake.parent)] + [d for d in os.environ["PATH"].split(os.pathsep)
                                                       if "jit-avx2" not in d])}
    subprocess.run([sys.executable, "-c", "import nanogpt_mlx"], env=env, check=True, timeout=120)
    wrapper = tmp_path / "cache" / "nanogpt-mlx" / "jit-avx2" / "bin" / "g++"
    assert str(fake) in wrapper.read_text()
    out, log = tmp_path / "libk.so", tmp_path / "calls.log"
    env.update(FAKE_GXX_MODE=mode, FAKE_GXX_LOG=str(log), FAKE_GXX_OTHER=str(out))
    proc = subprocess.Popen(["sh", "-c", f"'{wrapper}' -shared k.cpp -o '{out}' 2>&1"], env=env,
                            stdout=subprocess.PIPE, text=True)
    while proc.poll() is None:  # never half there
        assert not out.exists() or out.read_text() in ("half-whole", "other")
        time.sleep(0.01)
    assert proc.returncode == status, proc.stdout.read()
    assert (out.read_text() if out.exists() else None) == library
    calls = log.read_text().split()
    assert len(calls) == {"whole": 1, "once": 2, "other": 1, "fail": 2}[mode] and str(out) not in calls
    assert not list(tmp_path.glob("libk.so.*"))  # no linker's file left behind
