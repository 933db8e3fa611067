"""Loss spikes: the z-score of a step's loss against a rolling window of accepted losses.

Only losses of steps that were taken enter the window, so a NaN or a spike never poisons
the statistics it is judged by. All on the device.
"""

from __future__ import annotations

import typing as tp

import torch

from radiodiff_resume.config import LossGuardConfig

MIN_RELATIVE_STD = 0.01
"""The deviation is floored at 1% of the mean: a near-constant loss must not turn every small
wobble into a spike."""


class LossWindow:
    def __init__(self, cfg: LossGuardConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.values = torch.zeros(cfg.window, device=device)
        self.count = 0
        """Accepted losses seen (the window holds the last ``min(count, window)``)."""

    @property
    def active(self) -> bool:
        return self.cfg.spike_zscore is not None and self.count >= self.cfg.warmup

    def is_spike(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool on the device: ``loss`` is a spike (always False before the warm-up)."""
        if not self.active:
            return torch.zeros((), dtype=torch.bool, device=loss.device)
        filled = self.values[: min(self.count, self.cfg.window)]
        mean = filled.mean()
        std = torch.maximum(filled.std(correction=0), MIN_RELATIVE_STD * mean.abs())
        return (loss - mean) > tp.cast(float, self.cfg.spike_zscore) * std

    def accept(self, loss: torch.Tensor) -> None:
        self.values[self.count % self.cfg.window] = loss
        self.count += 1

    def state_dict(self) -> dict[str, tp.Any]:
        """The accepted losses in the window, oldest first."""
        n = min(self.count, self.cfg.window)
        order = torch.arange(self.count - n, self.count) % self.cfg.window
        return {"losses": self.values.detach().cpu()[order], "count": self.count}

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        """Accepts a window saved with another ``window`` size (keeps the newest that fit)."""
        losses = state["losses"].to(torch.float32)[-self.cfg.window:]
        self.values.zero_()
        self.count = int(state["count"])
        n = len(losses)
        if n < min(self.count, self.cfg.window):  # a larger window than the saving run's: only n known
            self.count = n
        order = torch.arange(self.count - n, self.count) % self.cfg.window
        self.values[order.to(self.values.device)] = losses.to(self.values.device)
