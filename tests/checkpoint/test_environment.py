"""The probe is compared bit for bit only in an identical environment; on another machine (another
CPU kernel set, thread count, GPU, library build) it gets the tolerance, and the log names what differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.checkpoint.environment import differences, fingerprint
from radiodiff_resume.config import Config, to_yaml
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import STEP4, build, events, hashes, read_manifest, rewrite_tensors
from tests.conftest import REPO


def test_the_manifest_records_where_the_probe_ran(run: Path) -> None:
    env = read_manifest(run / "checkpoints" / STEP4)["probe"]["environment"]
    assert env == fingerprint(torch.device("cpu")) | {"threads": "1"}
    for key in ("device_type", "cpu", "cpu_capability", "threads", "torch", "deterministic"):
        assert env[key], key


def test_differences_name_each_changed_entry() -> None:
    assert differences({"a": "1", "b": "x"}, {"a": "2", "b": "x", "c": "y"}) == ["a: 1 → 2", "c: - → y"]


@pytest.fixture
def two_threads() -> tp.Iterator[None]:
    """Another environment in-process: the golden run saved with one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_another_thread_count_gets_the_tolerance_and_says_why(
    run: Path, run_cfg: tp.Callable[..., Config], two_threads: None
) -> None:
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP4
    detail = tp.cast(tp.Any, trainer.checkpointer.verified).levels["probe"].detail
    assert "within 0.001 relative; the environment differs: threads: 1 → 2" in detail
    assert events(run, "checkpoint_quarantined") == []


def test_beyond_the_tolerance_in_another_environment_stops_without_moving_anything(
    run: Path, run_cfg: tp.Callable[..., Config], two_threads: None
) -> None:
    def nudge(t: dict[str, torch.Tensor]) -> None:
        t["unet.conv_in.weight"].view(-1)[0] += 1e-3

    rewrite_tensors(run / "checkpoints" / STEP4, "model", nudge)
    before = hashes(run / "checkpoints")
    with pytest.raises(UserError) as info:
        build(run_cfg("checkpoint.probe_tolerance=1e-9")).checkpointer.resume()
    message = str(info.value)
    assert "within 1e-09 relative; the environment differs: threads: 1 → 2" in message
    assert "checkpoint.accept_probe_mismatch=true" in message
    assert hashes(run / "checkpoints") == before


def verify_in_subprocess(cfg: Config, tmp_path: Path, **env: str) -> dict[str, tp.Any]:
    """Resume ``cfg`` in a fresh interpreter with ``env``; the verification report as JSON."""
    config = tmp_path / "cfg.yaml"
    config.write_text(to_yaml(cfg))
    script = (
        "import json, sys, torch\n"
        "from accelerate import Accelerator\n"
        "from radiodiff_resume.config import load_config\n"
        "from radiodiff_resume.run import build_ldm_trainer\n"
        "t = build_ldm_trainer(load_config(sys.argv[1]), Accelerator())\n"
        "path = t.checkpointer.resume()\n"
        "levels = t.checkpointer.verified.levels\n"
        "print(json.dumps({'path': str(path), 'capability': torch.backends.cpu.get_cpu_capability(),\n"
        "                  'levels': {k: [v.ok, v.detail] for k, v in levels.items()}}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tp.cast(dict[str, tp.Any], json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_another_cpu_kernel_set_resumes_within_the_tolerance(
    run: Path, run_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    """``ATEN_CPU_CAPABILITY=default`` stands in for another CPU generation (it changes the
    vectorised kernels, and with them the last bits of a result)."""
    saved = read_manifest(run / "checkpoints" / STEP4)["probe"]["environment"]["cpu_capability"]
    out = verify_in_subprocess(run_cfg(), tmp_path, ATEN_CPU_CAPABILITY="default")
    assert out["path"] == str(run / "checkpoints" / STEP4)
    assert out["capability"] == "DEFAULT"
    ok, detail = out["levels"]["probe"]
    assert ok, detail
    assert f"the environment differs: cpu_capability: {saved} → DEFAULT" in detail
    assert events(run, "checkpoint_quarantined") == []

    same = verify_in_subprocess(run_cfg(), tmp_path)
    assert same["levels"]["probe"][0] and "bit-exact (identical environment)" in same["levels"]["probe"][1]


@pytest.mark.slow
def test_deterministic_kernels_are_set_and_recorded(
    make_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    """``trainer.deterministic=true`` (what a bit-exact GPU resume needs) runs, and the probe's
    environment says so, so a checkpoint saved without it is compared with the tolerance."""
    from tests.checkpoint.helpers import FAST, committed
    from tests.conftest import write_random_first_stage

    cfg = make_cfg("trainer.train_num_steps=1", *FAST, "trainer.deterministic=true", results=tmp_path / "d")
    write_random_first_stage(cfg)
    config = tmp_path / "d.yaml"
    config.write_text(to_yaml(cfg))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_cond_ldm.py"), "--cfg", str(config)], capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert committed(cfg.results_folder) == ["step-00000001"]
    env = read_manifest(cfg.results_folder / "checkpoints" / "step-00000001")["probe"]["environment"]
    assert env["deterministic"] == "True"
