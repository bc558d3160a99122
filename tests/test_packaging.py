"""The source distribution carries what its test suite needs, and the package its data files."""

from __future__ import annotations

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
