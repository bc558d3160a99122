#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh test
exec .venv/bin/python -m pytest "$@"
