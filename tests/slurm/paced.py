"""A denoiser plug-in (``model.unet.target``) that paces training by the wall clock.

The SLURM tests need jobs that outlive a time-limit signal, whatever the speed or the load of the
machine: with ``step_s`` each training step takes that long (at least), so a job of ``n`` steps
trains for ``n * step_s`` seconds. Pacing only sleeps: the numbers computed are exactly those of
``diffusers.UNet2DModel`` (same parameters, same initialisation, same state dict), so a paced job
still matches an uninterrupted run of the plain model bit for bit.
"""

from __future__ import annotations

import time
import typing as tp

from diffusers import UNet2DModel


class PacedUNet(UNet2DModel):
    """A diffusers ``UNet2DModel`` whose training forwards start at least ``step_s`` seconds apart
    (one forward per step: the rest of the step is slept before the next one)."""

    def __init__(self, *args: tp.Any, step_s: float = 0.0, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_s = step_s
        self._next_forward = 0.0

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        if self.training and self.step_s > 0:
            now = time.monotonic()
            if now < self._next_forward:
                time.sleep(self._next_forward - now)
            self._next_forward = max(now, self._next_forward) + self.step_s
        return super().forward(*args, **kwargs)
