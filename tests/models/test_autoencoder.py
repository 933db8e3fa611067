"""First stage: loss terms and the MS-SSIM scale choice for small images."""

from __future__ import annotations

import pytest
import torch

from radiodiff_resume.build import build_first_stage
from radiodiff_resume.config import FirstStageLossConfig
from radiodiff_resume.models.autoencoder import (
    AutoencoderWithLoss,
    charbonnier,
    ms_ssim_betas,
    ms_ssim_kernel,
)


def test_charbonnier_is_smooth_l1() -> None:
    a, b = torch.zeros(4), torch.full((4,), 2.0)
    assert charbonnier(a, b).item() == pytest.approx(2.0, abs=1e-5)
    assert charbonnier(a, a).item() == pytest.approx(1e-3)


@pytest.mark.parametrize("size, scales", [(256, 5), (64, 3), (32, 2), (16, 2), (8, 1)])
def test_ms_ssim_scales_fit_the_image(size: int, scales: int) -> None:
    betas = ms_ssim_betas(size)
    assert len(betas) == scales
    assert sum(betas) == pytest.approx(1.0)


@pytest.mark.parametrize("loss_type, ms_ssim", [("charbonnier", 0.0), ("l1", 0.5)])
def test_loss_is_finite_and_trains_the_autoencoder(make_cfg, loss_type: str, ms_ssim: float) -> None:
    cfg = make_cfg()
    model = AutoencoderWithLoss(
        build_first_stage(cfg), FirstStageLossConfig(type=loss_type, ms_ssim_weight=ms_ssim), 32
    )
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    loss = model(image, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert model.autoencoder.encoder.conv_in.weight.grad is not None
    assert model.reconstruct(image).shape == image.shape


@pytest.mark.parametrize("size, kernel", [(64, 11), (11, 11), (10, 9), (8, 7), (4, 3), (2, None)])
def test_ms_ssim_window_shrinks_for_small_images(size: int, kernel: int | None) -> None:
    assert ms_ssim_kernel(size) == kernel


def test_ms_ssim_on_a_too_small_image_falls_back_and_stays_finite(make_cfg) -> None:
    """An 8-pixel image cannot hold MS-SSIM's 11-pixel window: one scale with a 7-pixel window."""
    cfg = make_cfg()
    model = AutoencoderWithLoss(
        build_first_stage(cfg), FirstStageLossConfig(type="l1", ms_ssim_weight=0.5), 8
    )
    image = torch.rand(2, 1, 8, 8) * 2 - 1
    loss = model(image, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    without = AutoencoderWithLoss(model.autoencoder, FirstStageLossConfig(type="l1", ms_ssim_weight=0.0), 8)
    assert loss.item() != without(image, generator=torch.Generator().manual_seed(0)).item(), \
        "the MS-SSIM term still counts"
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
