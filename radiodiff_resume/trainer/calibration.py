"""The forward passes that recompute running statistics (BatchNorm) for the guard's repair and for the
EMA weights: over this rank's first ``guard.norm_stats.recalibrate_batches`` training batches of epoch
0, read once, with a generator of their own (the data stream and the run's random streams are not
touched).
"""

from __future__ import annotations

import typing as tp

import torch
from torch import nn

from radiodiff_resume.guard.sanitize import finite_batch
from radiodiff_resume.trainer.parts import Parts
from radiodiff_resume.trainer.state import derive_seed

Batch = dict[str, tp.Any]


class Calibration:
    """``loss_with(module, batch, generator)`` (the stage's forward) over the calibration batches of
    ``parts``; ``to_device`` moves a batch where the model is."""

    def __init__(self, parts: Parts,
                 loss_with: tp.Callable[[nn.Module, Batch, torch.Generator], torch.Tensor],
                 to_device: tp.Callable[[Batch], Batch]) -> None:
        self.parts = parts
        self.loss_with = loss_with
        self.to_device = to_device
        self._batches: list[Batch] | None = None

    def forward(self) -> None:
        """Forward passes over the calibration batches (no gradients, under the run's autocast)."""
        parts, accelerator = self.parts, self.parts.accelerator
        generator = torch.Generator(accelerator.device).manual_seed(
            derive_seed(parts.seed, parts.stage, "calibrate", accelerator.process_index))
        with torch.no_grad(), accelerator.autocast():
            for batch in self.batches():
                self.loss_with(parts.unwrapped, self.to_device(batch), generator)

    def batches(self) -> list[Batch]:
        """The batches running statistics are recomputed over, NaN/Inf set to 0; read once, and by
        :meth:`Trainer.restore` before training, so that during training the data is read only by the
        stream."""
        if self._batches is None:
            stream, cfg = self.parts.train_stream, self.parts.guard.cfg
            self._batches = [
                finite_batch(torch.utils.data.default_collate([stream.dataset[i] for i in indices]),
                             cfg.max_abs_input)[0]
                for indices in stream.rank_batches(0)[:cfg.norm_stats.recalibrate_batches]]
        return self._batches
