#!/usr/bin/env bash
# Set up .venv, then: prepare Tiny Shakespeare, train the `shakespeare` preset (~6 min on a 2-core CPU),
# and sample from the trained model.
#   bash quickstart.sh                       # downloads Tiny Shakespeare (cached)
#   bash quickstart.sh path/to/input.txt     # offline: use a local copy
# Run again (or after Ctrl-C), it continues the run in out/shakespeare.
set -euo pipefail
source=(shakespeare)
if [ $# -ge 1 ]; then  # absolute before the cd below (realpath is missing before macOS 13)
    case "$1" in /*) source+=(--path "$1") ;; *) source+=(--path "$PWD/$1") ;; esac
fi
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/nanogpt-mlx prepare "${source[@]}" --out data/shakespeare
if compgen -G "out/shakespeare/ckpt-*" >/dev/null; then
    .venv/bin/nanogpt-mlx train --resume out/shakespeare
else
    # (--overwrite: an earlier try that ended before its first checkpoint left only its logs there)
    .venv/bin/nanogpt-mlx train --preset shakespeare --data data/shakespeare --out out/shakespeare --overwrite
fi
.venv/bin/nanogpt-mlx sample --model out/shakespeare --prompt "ROMEO:" --num-samples 3 --max-new-tokens 120
