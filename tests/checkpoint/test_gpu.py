"""What only a CUDA machine can show: where a loaded state lands, a real fp16 GradScaler under autocast,
bit-exact resume with deterministic kernels, and the guard's host reads on a real device.

Every test here is skipped without CUDA; ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import shutil
import typing as tp

import pytest
import torch

from radiodiff_resume.build import write_untrained_first_stage
from radiodiff_resume.config import Config
from radiodiff_resume.run import build_ldm_trainer, make_accelerator
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer
from tests.checkpoint.helpers import FAST, STEP2, STEP4, read_component
from tests.guard.test_syncs import guarded_steps_syncs, steps_with_real_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")
RUN = (*FAST, "trainer.train_num_steps=4", "checkpoint.every=2")


def on_gpu(cfg: Config) -> LatentDiffusionTrainer:
    """A trainer as ``train`` builds it: make_accelerator picks the GPU."""
    write_untrained_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
    assert trainer.accelerator.device.type == "cuda"
    return trainer


def test_ema_and_rng_are_on_the_gpu_after_a_load(make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg(*RUN)
    on_gpu(cfg).fit()
    saved = read_component(cfg.results_folder / "checkpoints" / STEP4, "rank-00000")

    trainer = on_gpu(cfg)
    assert trainer.checkpointer.resume() == cfg.results_folder / "checkpoints" / STEP4

    device = next(trainer.model.parameters()).device
    assert device.type == "cuda"
    assert trainer.ema is not None and all(p.device == device for p in trainer.ema.shadow_params)
    assert trainer.noise.device.type == "cuda"
    assert torch.equal(trainer.noise.get_state(), saved["noise_rng"])
    assert torch.equal(torch.cuda.get_rng_state(device), saved["rng"]["cuda"])


def test_fp16_overflow_is_a_skipped_step_and_the_scale_backs_off_under_real_autocast(
    make_cfg: tp.Callable[..., Config]
) -> None:
    trainer = on_gpu(make_cfg(*FAST, "trainer.mixed_precision=fp16"))
    scaler = trainer.accelerator.scaler
    assert scaler is not None and trainer.accelerator.native_amp
    trainer.model.train()
    steps_with_real_batches(trainer, 2)
    scaler.scale(torch.ones((), device=trainer.accelerator.device))  # the scale exists from the first use
    scaler.update(2.0**100)  # gradients scaled by 2^100 overflow fp16 (max 65504) under autocast

    first = trainer.train_step()
    assert not first.stepped and first.reason == "scaler"
    assert scaler.get_scale() == 2.0**99
    assert trainer.guard.consecutive_skips == 0, "a routine overflow is not counted toward a rollback"


def test_deterministic_resume_is_bit_exact(make_cfg: tp.Callable[..., Config]) -> None:
    """Run as ``scripts/gpu_check.sh`` runs it: with ``CUBLAS_WORKSPACE_CONFIG`` set before the process
    starts, since an earlier test may have made cuBLAS's first handle."""
    cfg = make_cfg(*RUN, "trainer.deterministic=true")
    straight = on_gpu(cfg)
    straight.fit()
    expected = {k: v.clone() for k, v in straight.model.state_dict().items()}
    shutil.rmtree(cfg.results_folder / "checkpoints" / STEP4)

    resumed = on_gpu(cfg)
    resumed.fit()

    assert resumed.checkpointer.verified is not None
    assert resumed.checkpointer.verified.path == cfg.results_folder / "checkpoints" / STEP2
    got = resumed.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got
                                                               if not torch.equal(got[k], expected[k])][:4]


def test_a_guarded_step_on_cuda_reads_the_device_exactly_once(make_cfg: tp.Callable[..., Config]) -> None:
    trainer = on_gpu(make_cfg(*FAST))
    steps = 6
    stepped, where = guarded_steps_syncs(trainer, steps)
    assert stepped == steps
    assert len(where) == steps, "\n".join(where)
