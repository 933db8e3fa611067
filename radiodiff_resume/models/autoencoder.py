"""First stage: an autoencoder (diffusers ``AutoencoderKL`` by default) and its training loss.

The first stage must follow the diffusers contract: ``encode(x).latent_dist`` with
``sample(generator)``, ``mode()`` and ``kl()``, and ``decode(z).sample``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from radiodiff_resume.config import FirstStageLossConfig

logger = logging.getLogger(__name__)

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Smooth L1-like loss; robust to the outliers of sharp radio-map edges."""
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()


def ms_ssim_betas(size: int) -> tuple[float, ...]:
    """The most MS-SSIM scales an image of side ``size`` supports, weights renormalised.

    torchmetrics needs ``size // max(1, n - 1) ** 2 > kernel - 1`` for ``n`` scales.
    """
    n = max(
        (k for k in range(1, len(MS_SSIM_BETAS) + 1)
         if size // max(1, k - 1) ** 2 > MS_SSIM_KERNEL - 1),
        default=1,
    )
    betas = MS_SSIM_BETAS[:n]
    total = sum(betas)
    return tuple(b / total for b in betas)


def ms_ssim_kernel(size: int) -> int | None:
    """The Gaussian window for images of side ``size``: 11, or the largest odd window that fits
    a smaller image (one scale); None below 3 pixels, where the term is dropped."""
    if size > MS_SSIM_KERNEL - 1:
        return MS_SSIM_KERNEL
    kernel = size if size % 2 else size - 1
    return kernel if kernel >= 3 else None


class AutoencoderWithLoss(nn.Module):
    """Wraps the autoencoder so the training loss comes out of ``forward``.

    Going through ``forward`` keeps the loss inside the DDP wrapper, so gradients are
    all-reduced (RadioDiff's ``model.module.training_step`` bypassed it).
    """

    def __init__(self, autoencoder: nn.Module, loss: FirstStageLossConfig, image_size: int) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.loss_cfg = loss
        self.betas = ms_ssim_betas(image_size)
        self.kernel = ms_ssim_kernel(image_size)
        if loss.ms_ssim_weight > 0 and self.kernel != MS_SSIM_KERNEL:
            fallback = (f"one scale with a {self.kernel}-pixel window" if self.kernel
                        else "the MS-SSIM term is dropped")
            logger.warning("first stage: %d-pixel images are too small for MS-SSIM's 11-pixel window: %s",
                           image_size, fallback)

    def forward(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.autoencoder.encode(image).latent_dist
        recon = self.autoencoder.decode(posterior.sample(generator=generator)).sample
        if self.loss_cfg.type == "charbonnier":
            loss = charbonnier(recon.float(), image.float())
        else:
            loss = F.l1_loss(recon.float(), image.float())
        if self.loss_cfg.kl_weight > 0:
            loss = loss + self.loss_cfg.kl_weight * posterior.kl().float().mean()
        if self.loss_cfg.ms_ssim_weight > 0 and self.kernel is not None:
            ms = multiscale_structural_similarity_index_measure(
                (recon.float().clamp(-1, 1) + 1) / 2,
                (image.float() + 1) / 2,
                data_range=1.0,
                betas=self.betas,
                kernel_size=self.kernel,
                normalize="relu",
            )
            # A non-finite MS-SSIM (flat images, fp16) falls back to the reconstruction terms alone; the
            # selected-away branch gets an exactly zero gradient (a non-finite one is the guards' job).
            term = self.loss_cfg.ms_ssim_weight * (1 - ms)
            loss = loss + torch.where(torch.isfinite(term), term, torch.zeros_like(term))
        return loss

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (posterior mode), for validation and samples."""
        latent = self.autoencoder.encode(image).latent_dist.mode()
        return self.autoencoder.decode(latent).sample.clamp(-1, 1)

    @torch.no_grad()
    def probe(self, image: torch.Tensor) -> torch.Tensor:
        """A fixed function of the autoencoder's state, independent of the loss settings: the
        reconstruction error through the posterior mode, plus the posterior's moments."""
        posterior = self.autoencoder.encode(image).latent_dist
        recon = self.autoencoder.decode(posterior.mode()).sample
        error = (recon.double() - image.double()).square().mean()
        return error + posterior.mean.double().square().mean() + posterior.logvar.double().mean()
