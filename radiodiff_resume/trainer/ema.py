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

from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel


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
