"""A denoiser plug-in (``model.unet.target``) that sends its own process a real SIGUSR1 at every
``every``-th training forward of the process: a stop lands inside that step, every time, whatever the
machine's speed. The numbers are exactly those of ``diffusers.UNet2DModel`` (as ``tests/slurm/paced.py``)."""

from __future__ import annotations

import os
import signal
import typing as tp

from diffusers import UNet2DModel


class SignallingUNet(UNet2DModel):
    def __init__(self, *args: tp.Any, every: int = 0, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.every = every
        self._forwards = 0

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        if self.training and self.every:
            self._forwards += 1
            if self._forwards % self.every == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
        return super().forward(*args, **kwargs)
