"""The bench and GPU-check commands on a machine without CUDA: they say what they did not run.

``CUDA_VISIBLE_DEVICES=""`` makes a GPU machine look like this CPU one, so these tests mean the same
everywhere; ``scripts/gpu_check.sh`` itself runs the GPU tests where there is a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_gpu_check_on_a_cpu_machine_exits_0_and_says_what_it_skipped() -> None:
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**NO_GPU, "PYTHON": sys.executable}, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == (
        "gpu_check: no CUDA device here, nothing run: skipped the GPU-only tests "
        "(tests/checkpoint/test_gpu.py, tests/checkpoint/test_async_save.py on the GPU) "
        "and the GPU bench rows (python -m bench --gpu-only)")


def test_bench_gpu_rows_are_refused_without_cuda_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--gpu-only"], cwd=REPO, env=NO_GPU,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    assert done.stderr.strip() == "python -m bench --gpu-only: no CUDA device here, nothing measured"


def test_the_headline_section_goes_first_and_the_others_stay_as_they_were(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_results", REPO / "bench" / "results.py")
    assert spec is not None and spec.loader is not None
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    path = tmp_path / "RESULTS.md"
    results.write_section(path, "bench_checkpoint", "# checkpoint")
    results.write_section(path, "bench_guard", "# guard")
    before = path.read_text()

    results.write_section(path, "headline", "# headline")

    text = path.read_text()
    assert text.startswith("<!-- headline:begin -->\n# headline\n<!-- headline:end -->\n\n")
    assert text.endswith(before)
