#!/usr/bin/env bash
# The GPU check, one command, under 8 minutes on a CUDA machine:
#   1. the GPU-only tests, tests/checkpoint/test_gpu.py (skipped without CUDA): EMA and RNG device
#      placement after a load, fp16 GradScaler skipped steps under real autocast, bit-exact resume with
#      trainer.deterministic, host syncs per guarded step on CUDA; and tests/checkpoint/test_async_save.py
#      on the GPU (pinned snapshot buffers, the probe enqueued on the training stream, a background
#      save's checkpoint holding the saved step and verifying on resume);
#   2. the GPU bench rows, `python -m bench --gpu-only` (device -> host snapshot of the state, verified
#      save and load against accelerate, guard overhead, host syncs per step), written to a temp file;
# then prints one table of both. Without a CUDA device it runs nothing, says what it skipped and exits 0.
# Exit status: 0 when every test passed and the bench ran, 1 otherwise.
#
#   bash scripts/gpu_check.sh            # PYTHON=... to use another interpreter than .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here, nothing run: skipped the GPU-only tests (tests/checkpoint/test_gpu.py," \
       "tests/checkpoint/test_async_save.py on the GPU)" \
       "and the GPU bench rows (python -m bench --gpu-only)"
  exit 0
fi

out=$(mktemp -d -t radiodiff-gpu-check-XXXXXX)
echo "gpu_check: tests (at most 4 min) ..."
# cuBLAS reads its workspace setting when its first handle is made: set before the process starts, the
# bit-exact test does not depend on which test made the first handle.
CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8} timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
  tests/checkpoint/test_gpu.py tests/checkpoint/test_async_save.py --junitxml "$out/junit.xml" > "$out/tests.log" 2>&1
tests_rc=$?
echo "gpu_check: bench rows (at most 3.5 min) ..."
timeout 210 "$PY" -m bench --gpu-only --out "$out/RESULTS.md" > "$out/bench.log" 2>&1
bench_rc=$?

"$PY" - "$out" "$tests_rc" "$bench_rc" <<'EOF'
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, tests_rc, bench_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"\nGPU check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}); logs in {out}\n")
print("| check | result | seconds | detail |")
print("| --- | --- | ---: | --- |")
junit = out / "junit.xml"
cases = list(ET.parse(junit).iter("testcase")) if junit.exists() else []
passed = 0
for case in cases:
    bad = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
    result = "passed" if bad is None else {"skipped": "SKIPPED"}.get(bad.tag, "FAILED")
    passed += result == "passed"
    message = "" if bad is None else bad.get("message") or ""
    detail = message.splitlines()[0][:120] if message else ""
    print(f"| test: {case.get('name')} | {result} | {float(case.get('time', 0)):.1f} | {detail} |")
if not cases:
    print(f"| tests | FAILED (exit status {tests_rc}, no report) | | see {out}/tests.log |")
results = out / "RESULTS.md"
text = results.read_text() if results.exists() else ""
rows = [ln for ln in text.split("<!-- headline:end -->")[0].splitlines()
        if ln.startswith("| ") and not ln.startswith(("| measure", "| ---"))]
for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    print(f"| bench: {cells[0]} | {cells[3]} (aim {cells[4]}: {cells[5]}) | | {cells[1]} ours, {cells[2]} baseline |")
if bench_rc or not rows:
    print(f"| bench | FAILED (exit status {bench_rc}) | | see {out}/bench.log |")
ok = tests_rc == 0 and bench_rc == 0 and cases and passed == len(cases) and rows
print(f"\ngpu_check: {'passed' if ok else 'FAILED'}; bench sections in {results}")
sys.exit(0 if ok else 1)
EOF
