"""A denoiser plug-in (``model.unet.target``) whose own weights go non-finite for real mid-run, as
a bit flip or an overflow that slipped past every gradient check would leave them.
"""

from __future__ import annotations

import os
import typing as tp

import torch
from diffusers import UNet2DModel


class PoisonedUNet(UNet2DModel):
    """A diffusers ``UNet2DModel`` that, after its training-mode forward number ``poison_at`` (1-based,
    counted in this process) or every one from ``poison_from`` on, writes NaN into its own
    ``conv_out.bias[0]`` in place (under ``torch.no_grad()``).

    The write comes after the output is computed and the bias is not saved for backward, so that
    step's loss and gradients are finite and the optimizer steps with a NaN weight: only a check of
    the weights themselves can see it. ``only_rank`` limits the fault to one process.
    """

    def __init__(self, *args: tp.Any, poison_at: tp.Sequence[int] = (), poison_from: int | None = None,
                 only_rank: int | None = None, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.poison_at = set(poison_at)
        self.poison_from = poison_from
        self.only_rank = only_rank
        self.training_calls = 0
        self.poisoned: list[int] = []
        """The training forwards that wrote the NaN."""

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        out = super().forward(*args, **kwargs)
        if not self.training:
            return out
        self.training_calls += 1
        n = self.training_calls
        if self.only_rank is not None and int(os.environ.get("RANK", "0")) != self.only_rank:
            return out
        if n in self.poison_at or (self.poison_from is not None and n >= self.poison_from):
            with torch.no_grad():
                self.conv_out.bias[0] = float("nan")
            self.poisoned.append(n)
        return out
