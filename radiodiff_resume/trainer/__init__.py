"""The training loop and its two subclasses (first stage, latent diffusion)."""

from radiodiff_resume.trainer.autoencoder import AutoencoderTrainer
from radiodiff_resume.trainer.base import Trainer
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer

__all__ = ["AutoencoderTrainer", "LatentDiffusionTrainer", "Trainer"]
