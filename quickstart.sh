#!/usr/bin/env bash
# Set up .venv, then: prepare Tiny Shakespeare, train the `shakespeare` preset (~6 min on a 2-core CPU),
# and sample from the trained model.
#   bash quickstart.sh                       # downloads Tiny Shakespeare (cached)
#   bash quickstart.sh path/to/input.txt     # offline: use a local copy
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
source=(shakespeare)
[ $# -ge 1 ] && source+=(--path "$1")
.venv/bin/nanogpt-mlx prepare "${source[@]}" --out data/shakespeare
.venv/bin/nanogpt-mlx train --preset shakespeare --data data/shakespeare --out out/shakespeare
.venv/bin/nanogpt-mlx sample --model out/shakespeare --prompt "ROMEO:" --num-samples 3 --max-new-tokens 120
