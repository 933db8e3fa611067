#!/usr/bin/env bash
# Set up, then run the test suite (CPU; real multi-process accelerate runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check radiodiff_resume tests train_cond_ldm.py
.venv/bin/python scripts/check_imports.py  # import circles and upward imports fail the build
exec .venv/bin/python -m pytest "$@"
