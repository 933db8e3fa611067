#!/usr/bin/env bash
# Set up, then run the test suite (CPU; real multi-process accelerate runs included).
# With no -m and no test path of yours it runs the fast tier, pytest -m "not slow" (the end of
# pytest's output says so); -m slow runs the slow tier, -m "" every test (as .ci/run does), and
# the tests/... paths you name run whatever their markers.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not slow")
for arg in "$@"; do
  case "$arg" in
    -m | -m* | --markexpr | --markexpr=*) tier=() ;;
    tests | tests/* | tests::* ) [ -e "${arg%%::*}" ] && tier=() ;;
  esac
done
bash scripts/setup.sh
.venv/bin/python -m ruff check radiodiff_resume tests train_cond_ldm.py
.venv/bin/python scripts/check_imports.py  # import circles and upward imports fail the build
exec .venv/bin/python -m pytest "${tier[@]}" "$@"
