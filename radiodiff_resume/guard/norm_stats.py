"""Running statistics (BatchNorm, SyncBatchNorm, anything with ``running_mean``/``running_var``).

They change in the forward pass, so a skipped step does not protect them: one overflowing
batch turns them Inf, every eval-mode forward is then NaN and every save is refused. Here
they are snapshotted before each forward and put back when the batch or the step is
rejected (on the device, no host sync), checked at a few points, and repaired when broken.
"""

from __future__ import annotations

import typing as tp

import torch
from torch import nn

STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")


def stat_modules(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module that keeps running mean and variance tensors."""
    return [(name, m) for name, m in module.named_modules()
            if isinstance(getattr(m, "running_mean", None), torch.Tensor)
            and isinstance(getattr(m, "running_var", None), torch.Tensor)]


def apply_stability_settings(module: nn.Module, momentum: float | None, eps: float | None) -> int:
    """Set BatchNorm ``momentum`` / ``eps`` where given; returns how many layers changed."""
    changed = 0
    if momentum is None and eps is None:
        return 0
    for _, m in stat_modules(module):
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if momentum is not None:
                m.momentum = momentum
            if eps is not None:
                m.eps = eps
            changed += 1
    return changed


class NormStats:
    """The running statistics of one module tree."""

    def __init__(self, module: nn.Module) -> None:
        self.modules = stat_modules(module)
        self.buffers: list[torch.Tensor] = [
            b for _, m in self.modules for n in STAT_NAMES
            if isinstance(b := getattr(m, n, None), torch.Tensor)]

    def __bool__(self) -> bool:
        return bool(self.modules)

    def snapshot(self, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Copies of every statistic (reusing ``into``'s memory when given)."""
        if into is None:
            return [b.clone() for b in self.buffers]
        for dst, src in zip(into, self.buffers, strict=True):
            dst.copy_(src)
        return into

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for dst, src in zip(self.buffers, snapshot, strict=True):
            dst.copy_(src)

    def restore_where(self, bad: torch.Tensor, snapshot: list[torch.Tensor]) -> None:
        """Put ``snapshot`` back where the 0-dim ``bad`` is true; a device-side select, no sync
        (a blend would turn Inf into NaN: ``0 * inf``)."""
        for dst, src in zip(self.buffers, snapshot, strict=True):
            dst.copy_(torch.where(bad, src, dst))

    def nonfinite(self) -> list[str]:
        """Names of the modules whose statistics hold a non-finite value (one host sync)."""
        if not self.modules:
            return []
        flags = torch.stack([
            ~(torch.isfinite(m.running_mean).all() & torch.isfinite(m.running_var).all()
              & (m.running_var >= 0).all())
            for _, m in self.modules]).cpu()
        return [name for (name, _), bad in zip(self.modules, flags.tolist(), strict=True) if bad]

    def recompute(self, root: nn.Module, names: tp.Collection[str], forward: tp.Callable[[], None]) -> None:
        """Recompute the statistics of the ``names`` modules as a plain average over the batches
        ``forward`` runs through ``root`` (``momentum=None``); everything else in eval mode, untouched."""
        chosen = [m for n, m in self.modules if n in names]
        saved = [(m, m.momentum) for m in chosen]
        was_training = root.training
        try:
            root.eval()
            for m in chosen:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            forward()
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            root.train(was_training)

    def reset(self, names: tp.Collection[str]) -> None:
        """Back to their initial values (mean 0, variance 1)."""
        for n, m in self.modules:
            if n in names:
                m.reset_running_stats()
