"""First stage: loss terms and the MS-SSIM scale choice for small images."""

from __future__ import annotations

import pytest
import torch

from radiodiff_resume.build import build_first_stage
from radiodiff_resume.config import FirstStageLossConfig
from radiodiff_resume.models.autoencoder import AutoencoderWithLoss, charbonnier, ms_ssim_betas


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
