"""The fp16 loss scaler: each stage starts with its own, and its state travels in checkpoints.

accelerate creates no GradScaler on a CPU, so these tests hand the Accelerator a real
``torch.amp.GradScaler("cpu")``: the trainer, the optimizer wrapper and the checkpoints then use it
exactly as they would a CUDA one (scaled backward, unscale, skipped steps, update).
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
from accelerate import Accelerator

from radiodiff_resume.config import Config
from radiodiff_resume.run import build_ldm_trainer
from tests.checkpoint.helpers import FAST, read_component
from tests.conftest import write_random_first_stage


def accelerator_with_scaler(init_scale: float = 2.0**10) -> Accelerator:
    accelerator = Accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=3)
    return accelerator


def test_each_stage_starts_with_its_own_loss_scale(make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg(*FAST)
    write_random_first_stage(cfg)
    accelerator = accelerator_with_scaler()
    used = accelerator.scaler
    assert used is not None
    used.scale(torch.ones(()))  # materialise the scale, then back off as an overflowing stage 1 would
    used.update(2.0**3)

    trainer = build_ldm_trainer(cfg, accelerator)

    scaler = trainer.accelerator.scaler
    assert scaler is not None and scaler is not used
    assert scaler.get_scale() == 2.0**10 and scaler.get_growth_interval() == 3
    assert tp.cast(tp.Any, trainer.optimizer).scaler is scaler, "the optimizer wrapper steps with it"


def test_the_loss_scale_round_trips_through_a_checkpoint(
    make_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    cfg = make_cfg(*FAST, "trainer.train_num_steps=4", "checkpoint.every=4", results=tmp_path / "s")
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, accelerator_with_scaler())
    trainer.fit()
    saved = tp.cast(torch.amp.GradScaler, trainer.accelerator.scaler).state_dict()
    on_disk = read_component(cfg.results_folder / "checkpoints" / "step-00000004", "grad_scaler")
    assert on_disk == saved and on_disk["scale"] != 2.0**10, "4 steps with growth_interval 3 grew it"

    resumed = build_ldm_trainer(cfg, accelerator_with_scaler())
    assert resumed.checkpointer.resume() == cfg.results_folder / "checkpoints" / "step-00000004"
    assert tp.cast(torch.amp.GradScaler, resumed.accelerator.scaler).state_dict() == saved
