"""``model.objective=radiodiff`` resumes bit-exactly: the tiny config run straight equals the same
command killed with SIGKILL (inside a save, mid-step) and re-run until done, bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.config import build_config
from tests.conftest import write_random_first_stage
from tests.trainer.test_resume_exact import (
    assert_bit_identical,
    final_tensors,
    kill_when,
    run_to_end,
    start,
    write_config,
)

RADIODIFF = {"objective": "radiodiff", "sampling_timesteps": 1}


@pytest.mark.slow
def test_radiodiff_killed_and_rerun_equals_straight(tmp_path: Path, synth_cache: Path) -> None:
    ae = tmp_path / "ae.safetensors"
    probe = write_config(tmp_path, synth_cache, "probe", ae, **RADIODIFF)
    write_random_first_stage(build_config(yaml.safe_load(probe.read_text())))
    straight_cfg = write_config(tmp_path, synth_cache, "straight", ae, **RADIODIFF)
    killed_cfg = write_config(tmp_path, synth_cache, "killed", ae, **RADIODIFF)
    checkpoints = tmp_path / "killed" / "checkpoints"

    run_to_end(straight_cfg, 1, tmp_path)

    def staging() -> bool:
        return checkpoints.is_dir() and any(p.name.startswith(".staging-") for p in checkpoints.iterdir())

    def committed(step: int) -> bool:
        return (checkpoints / f"step-{step:08d}" / "manifest.json").exists()

    assert kill_when(start(killed_cfg, 1, tmp_path), staging)
    assert staging(), "the first kill must land inside a save (staging folder left behind)"
    assert kill_when(start(killed_cfg, 1, tmp_path), lambda: committed(15),
                     delay=random.Random(0).uniform(0.0, 0.05))
    out = run_to_end(killed_cfg, 1, tmp_path)

    assert "resumed from verified checkpoint" in out
    straight = final_tensors(tmp_path / "straight")
    assert straight["model.safetensors"]["unet.conv_out.weight"].shape[0] == 2 * 3, "drift and noise"
    assert_bit_identical(straight, final_tensors(tmp_path / "killed"))
