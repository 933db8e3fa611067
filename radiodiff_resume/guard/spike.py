"""Loss spikes: the z-score of a step's loss against a rolling window of accepted losses.

Only losses of steps that were taken enter the window, so a NaN or a spike never poisons
the statistics it is judged by. All on the device. A lasting change of the loss level would then
be skipped forever, so a run of spikes with healthy gradients refills the window with their losses.
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
        self.spike_run: list[float] = []
        """Losses of the latest steps skipped in a row as spikes with healthy gradients."""

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
        self.spike_run.clear()

    def skipped_spike(self, loss: float, healthy: bool) -> float | None:
        """Note a step skipped as a spike (``healthy``: its gradient norm was finite and not clipped).
        The ``rebaseline_after``-th healthy one in a row refills the window with the run's losses, the
        new level (counted as the accepted ones, so the warm-up applies again if they are fewer);
        returns their mean then, else None. Host floats only: no read from the device."""
        after = self.cfg.rebaseline_after
        if not healthy or after is None:
            self.spike_run.clear()
            return None
        self.spike_run.append(loss)
        if len(self.spike_run) < after:
            return None
        recent = self.spike_run[-self.cfg.window:]
        self.values.zero_()
        self.values[: len(recent)] = torch.tensor(recent, device=self.values.device)
        self.count = len(recent)
        self.spike_run.clear()
        return sum(recent) / len(recent)

    def state_dict(self) -> dict[str, tp.Any]:
        """The accepted losses in the window, oldest first, and the current run of healthy spikes."""
        n = min(self.count, self.cfg.window)
        order = torch.arange(self.count - n, self.count) % self.cfg.window
        return {"losses": self.values.detach().cpu()[order], "count": self.count,
                "spike_run": list(self.spike_run)}

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
        self.spike_run = [float(v) for v in state.get("spike_run", [])]  # absent before re-baselining
