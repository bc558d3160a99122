#!/usr/bin/env bash
# Create .venv with nanogpt-mlx installed (plus extras given as arguments, e.g. `test`).
# Run by quickstart.sh and test.sh; safe to run again (offline too, once installed: an install whose
# pyproject.toml and extras are unchanged is not repeated).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
extras="${1:-}"
if [ "$(uname -s)" = "Linux" ]; then
    extras="cpu${extras:+,$extras}"
    # MLX's Linux wheel bundles a slow reference BLAS; OpenBLAS makes fp32 matmuls ~30x faster.
    if ! ls /usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            (apt-get install -y -qq libopenblas0-pthread || { apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; }) >/dev/null \
                || echo "setup: could not install libopenblas0-pthread; training will be slow" >&2
        else
            echo "setup: for fast training run: sudo apt-get install libopenblas0-pthread" >&2
        fi
    fi
fi
# a venv without pip (ensurepip failed, an interrupted creation) or from a Python older than 3.10 is made anew
if ! .venv/bin/python -c 'import sys, pip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    python3 -m venv --clear .venv
fi
stamp=".venv/.installed-$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
    rm -f .venv/.installed-* && touch "$stamp"
fi
