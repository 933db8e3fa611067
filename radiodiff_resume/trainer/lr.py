"""The learning-rate schedule: a multiplier of ``lr`` that is a pure function of the step.

Being a function of the config and the step, it is never stored in a checkpoint: a resume rebuilds
it, and a changed setting takes effect from the restored step on.
"""

from __future__ import annotations

import math
import typing as tp

from radiodiff_resume.config import LoopConfig


def lr_multiplier(loop: LoopConfig) -> tp.Callable[[int], float]:
    """Linear warm-up over ``lr_warmup_steps`` (none by default), then

    - ``radiodiff``: ``max((1 - step / train_num_steps) ** lr_decay_power, min_lr)``, RadioDiff's
      ``LambdaLR`` (its base is clamped at 0 past ``train_num_steps``, where RadioDiff's would turn
      complex);
    - ``cosine``: from 1 down to ``final_lr / lr`` at ``train_num_steps``.
    """
    warmup, total = loop.lr_warmup_steps, loop.train_num_steps

    def decay(step: int) -> float:
        if loop.lr_schedule == "radiodiff":
            return max(max(0.0, 1 - step / total) ** loop.lr_decay_power, loop.min_lr)
        floor = loop.final_lr / loop.lr
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay(step)

    return factor
