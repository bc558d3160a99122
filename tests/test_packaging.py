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


def test_the_sdist_holds_the_tests_scripts_and_package_data(tmp_path):
    """setuptools' default sdist left out tests/conftest.py and tests/cuda_on_cpu.h: its tests could not run.
    Built from a copy of the sources: an egg-info of an earlier build lists files that its sdist then carries."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in TOP:
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(tmp_path)], cwd=src, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    wanted = {p.relative_to(src).as_posix() for folder in FOLDERS for p in (src / folder).rglob("*") if p.is_file()}
    assert {"tests/conftest.py", "tests/cuda_on_cpu.h", "nanogpt_mlx/gpt2.tiktoken"} <= wanted
    assert (wanted | set(TOP)) - names == set()
