"""The EMA of the trainable weights, with RadioDiff's schedule (``ema-pytorch``'s ``EMA``, which
RadioDiff's trainer uses with ``beta=0.999``, ``inv_gamma=1``, ``power=2/3``).

RadioDiff calls ``ema.update()`` after every optimizer step; with ``c`` the number of earlier calls,
a call does something only when ``c % update_every == 0``: it copies the online weights while
``c <= update_after_step`` and at the first update after that, then averages with decay
``min(1 - (1 + c - update_after_step) ** -2/3, beta)``. Both thresholds count optimizer steps.

diffusers' ``EMAModel`` (whose state format the checkpoints keep) counts its own calls instead,
so ``update_after_step`` meant EMA updates there: a RadioDiff config with ``update_every: 10`` and
``update_after_step: 10000`` over 50 000 steps never averaged at all. Here :meth:`RadioDiffEMA.step`
is called after every optimizer step and ``optimization_step`` counts them, as RadioDiff counts.
"""

from __future__ import annotations

import contextlib
import logging
import typing as tp
from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from radiodiff_resume.config import LoopConfig
from radiodiff_resume.guard.policy import Guard

logger = logging.getLogger(__name__)


class RadioDiffEMA(EMAModel):
    """diffusers' EMA state, RadioDiff's schedule (see the module docstring)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float, update_after_step: int,
                 update_every: int) -> None:
        super().__init__(parameters, decay=decay, min_decay=0.0, update_after_step=update_after_step,
                         use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
        self.update_every = update_every

    def get_decay(self, optimization_step: int) -> float:
        """The decay of the call after ``optimization_step - 1`` earlier ones (0.0: a copy)."""
        calls = optimization_step - 1
        if calls - self.update_every <= self.update_after_step:
            return 0.0
        epoch = calls - self.update_after_step
        return min(1 - (1 + epoch / self.inv_gamma) ** -self.power, self.decay)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Called after every optimizer step; updates on every ``update_every``-th call."""
        calls = self.optimization_step
        if calls % self.update_every != 0:
            self.optimization_step += 1
            return
        params = list(parameters)
        if self.get_decay(calls + 1) == 0.0:  # an exact copy, as RadioDiff's: s - (s - p) need not be p
            self.optimization_step += 1
            self.cur_decay_value = 0.0
            for shadow, param in zip(self.shadow_params, params, strict=True):
                shadow.copy_(param.detach())
            return
        super().step(params)


def first_average(update_after_step: int, update_every: int) -> int:
    """The optimizer step after which an EMA with these settings first averages rather than copies."""
    return update_every * (update_after_step // update_every + 2) + 1


def new_ema(params: list[nn.Parameter], loop: LoopConfig, stage: str) -> RadioDiffEMA:
    """An EMA of ``params`` as they are now, with the loop's settings."""
    first = first_average(loop.ema_update_after_step, loop.ema_update_every)
    if first > loop.train_num_steps:
        logger.warning(
            "%s: with ema_update_after_step=%d and ema_update_every=%d the EMA first averages after step "
            "%d, beyond train_num_steps=%d: the EMA weights will be a copy of the online weights",
            stage, loop.ema_update_after_step, loop.ema_update_every, first, loop.train_num_steps)
    return RadioDiffEMA(params, decay=loop.ema_decay, update_after_step=loop.ema_update_after_step,
                        update_every=loop.ema_update_every)


@contextlib.contextmanager
def ema_weights(ema: RadioDiffEMA | None, params: list[nn.Parameter], guard: Guard, module: nn.Module,
                calibration_forward: tp.Callable[[], None],
                sync_buffers: tp.Callable[[], None]) -> tp.Iterator[None]:
    """``ema``'s weights in ``params`` (with ``module``'s running statistics recomputed for them by
    ``calibration_forward``, when it has any and ``guard.norm_stats.ema_statistics``), everything back
    out after, even on error. Every rank must enter it together (the statistics are synced)."""
    if ema is None:
        yield
        return
    stats = guard.norm_stats
    own = stats and guard.cfg.norm_stats.ema_statistics
    saved = stats.snapshot() if own else None
    ema.store(params)
    ema.copy_to(params)
    try:
        if own:
            stats.recompute(module, [n for n, _ in stats.modules], calibration_forward)
            sync_buffers()
        yield
    finally:
        ema.restore(params)
        if saved is not None:
            stats.restore(saved)
