"""A denoiser plug-in (``model.unet.target``) that kills its own process at a chosen point, as a
preemption that outruns ``KillWait``, a node failure or a checkpoint that crashes on load would.

It adds no parameter and no buffer, so it resumes checkpoints of the plain ``UNet2DModel``.
"""

from __future__ import annotations

import os
import signal
import typing as tp

from diffusers import UNet2DModel


class DiesAtForwardUNet(UNet2DModel):
    """A diffusers ``UNet2DModel`` that SIGKILLs its own process at its ``die_at``-th training
    forward in this process (1: the first step after a resume). With ``stop_at``, it sends itself
    SIGUSR1 (a stop signal) at that training forward instead, and dies at its next forward outside
    training: the probe of the checkpoint the stop is saving (a stop that outruns ``KillWait``)."""

    def __init__(self, *args: tp.Any, die_at: int = 0, stop_at: int = 0, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.die_at = die_at
        self.stop_at = stop_at
        self.forwards = 0
        self.stop_sent = False

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        if self.training:
            self.forwards += 1
            if self.forwards == self.die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.forwards == self.stop_at:
                self.stop_sent = True
                os.kill(os.getpid(), signal.SIGUSR1)
        elif self.stop_sent:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(*args, **kwargs)
