"""The source distribution carries what its test suite needs, and the package its data files; the sources are
Python of the oldest version that pyproject.toml allows."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("nanogpt_mlx", "tests", "benchmarks", "docs")
TOP = ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "setup.sh", "test.sh", "quickstart.sh")


def sources() -> list[str]:
    """The project's files: git's where this is a checkout (not an editor's or Finder's leftovers), else the tree's."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "ls-files", "--", *FOLDERS], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.splitlines()
    else:  # an unpacked sdist
        listed = [p.relative_to(ROOT).as_posix() for folder in FOLDERS for p in (ROOT / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)]
    return [*listed, *TOP]


def test_the_sdist_holds_the_tests_scripts_and_package_data(tmp_path):
    """setuptools' default sdist left out tests/conftest.py and tests/cuda_on_cpu.h: its tests could not run.
    Built from a copy of the sources: an egg-info of an earlier build lists files that its sdist then carries."""
    pytest.importorskip("setuptools")
    src, wanted = tmp_path / "src", set(sources())
    for name in wanted:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(tmp_path)], cwd=src, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    assert {"tests/conftest.py", "tests/cuda_on_cpu.h", "nanogpt_mlx/gpt2.tiktoken"} <= wanted
    assert wanted - names == set()


# Run by the oldest Python allowed: every file compiles, and every pattern given to `re` as a literal (possessive
# quantifiers and atomic groups came in 3.11: a 3.10 failed at `import nanogpt_mlx`).
_COMPILES_THERE = """
import ast, re, sys
for path in sys.argv[1:]:
    source = open(path, encoding="utf-8").read()
    tree = ast.parse(source, path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "re"
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, (str, bytes))):
            try:
                re.compile(node.args[0].value)
            except re.error as e:
                sys.exit(f"{path}:{node.lineno}: {e}")
"""


def oldest_python() -> tuple[str, str | None]:
    """pyproject.toml's lowest Python version, and an interpreter of it found here (PATH, pyenv), if any."""
    version = re.search(r'requires-python = ">=(3\.\d+)"', (ROOT / "pyproject.toml").read_text())[1]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(pyenv.glob(f"{version}.*/bin/python{version}"))
    on_path = shutil.which(f"python{version}")
    if on_path and "shims" not in Path(on_path).parts:  # pyenv's shim runs only the versions that pyenv selects
        found.append(Path(on_path))
    return version, str(found[0]) if found else None


def test_the_sources_compile_under_the_oldest_python_allowed():
    """Syntax and regular expressions that the oldest allowed Python rejects fail there at import."""
    version, python = oldest_python()
    if python is None:
        pytest.skip(f"no Python {version} here (on PATH or in pyenv)")
    files = [str(ROOT / name) for name in sources() if name.endswith(".py")]
    done = subprocess.run([python, "-c", _COMPILES_THERE, *files], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
