#!/usr/bin/env bash
# Create .venv with nanogpt-mlx installed (plus extras given as arguments, e.g. `test`).
# Sourced by quickstart.sh and test.sh; safe to run again.
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
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
