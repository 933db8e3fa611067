#!/usr/bin/env bash
# Set up, then train the embedded default: synthetic RadioMapSeer-layout data on the CPU,
# first stage (autoencoder) then the conditional LDM. Extra key=value overrides pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train_cond_ldm.py --cfg configs/radio_tiny.yaml "$@"
