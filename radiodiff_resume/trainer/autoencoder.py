"""Stage 1: the first-stage autoencoder, whose weights the LDM then loads frozen."""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import torch
from torch import nn

from radiodiff_resume.io import save_tensors_atomic
from radiodiff_resume.models.autoencoder import AutoencoderWithLoss
from radiodiff_resume.trainer.base import Batch, Trainer

logger = logging.getLogger(__name__)


class AutoencoderTrainer(Trainer):
    """Reconstruction (+ KL, + optional MS-SSIM) training; exports weights at the end."""

    stage = "first_stage"

    def __init__(self, *args: tp.Any, export_path: Path, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.export_path = Path(export_path)

    @property
    def wrapper(self) -> AutoencoderWithLoss:
        return tp.cast(AutoencoderWithLoss, self.unwrapped)

    def trainable_module(self, model: nn.Module) -> nn.Module:
        return tp.cast(AutoencoderWithLoss, model).autoencoder

    def loss_with(self, module: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return tp.cast(torch.Tensor, module(batch["image"], generator=generator))

    def make_probe_inputs(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image": batch["image"]}

    def probe_with(self, module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return tp.cast(AutoencoderWithLoss, module).probe(inputs["image"])

    def predict(self, batch: Batch) -> torch.Tensor:
        with self.accelerator.autocast():
            return self.wrapper.reconstruct(batch["image"])

    def sample_columns(self, batch: Batch) -> list[torch.Tensor]:
        return [batch["image"], self.predict(batch)]

    def on_fit_end(self) -> None:
        """Write the (EMA, if kept) autoencoder weights atomically, from the main process."""
        with self.ema_weights():  # every rank: the EMA's statistics are recomputed and synced
            state = {k: v.clone() for k, v in self.wrapper.autoencoder.state_dict().items()}
        if self.accelerator.is_main_process:
            save_tensors_atomic(self.export_path, state, {"step": str(self.state.step)})
            logger.info("first stage: weights written to %s", self.export_path)
        self.accelerator.wait_for_everyone()
