#!/usr/bin/env bash
# Set up .venv with the project and its test tools.
# - Keeps the torch that the calling Python already has (a cluster's CUDA build, say):
#   the venv then sees it through --system-site-packages and pip leaves it alone.
# - Otherwise installs ${TORCH_SPEC:-torch==2.13.0}; on a machine with a local CPU wheel
#   (pip find-links) that wheel is used, so no CUDA packages are downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! .venv/bin/python -c "import radiodiff_resume, pytest" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing radiodiff_resume and its dependencies into .venv"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch .venv/.installed
fi
