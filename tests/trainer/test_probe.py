"""The probe runs on the inputs its checkpoint stores, however many samples they hold: a checkpoint
written when the probe took two validation maps still verifies and resumes now that it takes one."""

from __future__ import annotations

import typing as tp

import pytest

from radiodiff_resume.checkpoint.verify import open_checkpoint
from radiodiff_resume.config import Config
from radiodiff_resume.trainer import probe
from tests.checkpoint.helpers import FAST, STEP2, build, committed
from tests.conftest import write_random_first_stage


def probe_maps(ckpt: tp.Any) -> int:
    return int(open_checkpoint(ckpt, "ldm").shared["probe"]["cond"].shape[0])


def test_a_checkpoint_probed_on_two_maps_still_verifies(make_cfg: tp.Callable[..., Config],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(*FAST, "trainer.train_num_steps=2", "checkpoint.every=2")
    write_random_first_stage(cfg)
    with monkeypatch.context() as before:
        before.setattr(probe, "PROBE_SAMPLES", 2)
        build(cfg).fit()
    ckpt = cfg.results_folder / "checkpoints" / STEP2
    assert committed(cfg.results_folder) == [STEP2] and probe_maps(ckpt) == 2

    trainer = build(cfg)
    report = trainer.checkpointer.verify_and_load(ckpt)
    assert report.ok, report
    assert trainer.state.step == 2
    assert probe.PROBE_SAMPLES == 1 and probe_maps(ckpt) == 2
