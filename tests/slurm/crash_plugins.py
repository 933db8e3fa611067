"""A denoiser plug-in (``model.unet.target``) whose state makes every run that resumes from it die,
as a checkpoint that triggers a crash on each restart would (paced as :class:`~.paced.PacedUNet`)."""

from __future__ import annotations

import os
import signal
import typing as tp

import torch

from tests.slurm.paced import PacedUNet


class DiesAfterResumeUNet(PacedUNet):
    """A diffusers ``UNet2DModel`` (paced by ``step_s``) that SIGKILLs its own process at the first
    training forward after its weights were loaded, when those weights had seen at least
    ``die_from`` training forwards.

    The count is a persistent buffer, so it travels with the checkpoints: resuming from an older
    checkpoint (fewer forwards) trains on; an uninterrupted run never loads and never dies.
    """

    def __init__(self, *args: tp.Any, die_from: int = 1, **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.die_from = die_from
        self.register_buffer("trained_forwards", torch.zeros((), dtype=torch.int64))
        self.loaded = False

    def _load_from_state_dict(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.loaded = True

    def forward(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        if self.training:
            if self.loaded and int(self.trained_forwards) >= self.die_from:
                os.kill(os.getpid(), signal.SIGKILL)
            self.loaded = False  # only the first training forward after a load can die
            self.trained_forwards += 1
        return super().forward(*args, **kwargs)
