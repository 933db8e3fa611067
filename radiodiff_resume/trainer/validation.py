"""Validation that cannot lie: non-finite samples are skipped and counted, and a
validation in which nothing could be evaluated is reported as invalid, never as 0.0.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

METRICS = ("rmse", "nmse", "psnr", "ssim")


def radio_map_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample RMSE, NMSE, PSNR and SSIM of maps in [-1, 1], computed on [0, 1]."""
    p = (pred.float().clamp(-1, 1) + 1) / 2
    t = (target.float() + 1) / 2
    err = (p - t).flatten(1)
    mse = err.pow(2).mean(1)
    return {
        "rmse": mse.sqrt(),
        "nmse": err.pow(2).sum(1) / t.flatten(1).pow(2).sum(1),
        "psnr": peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(p, t, data_range=1.0, reduction="none"),
    }


@dataclass
class ValidationResult:
    """Means over the samples that could be evaluated, and how many those were."""

    metrics: dict[str, float] | None
    evaluated: int
    total: int

    @property
    def valid(self) -> bool:
        return self.metrics is not None

    def log_values(self, prefix: str = "val") -> dict[str, float | int | bool]:
        values: dict[str, float | int | bool] = {
            f"{prefix}/evaluated": self.evaluated,
            f"{prefix}/total": self.total,
            f"{prefix}/valid": self.valid,
        }
        for k, v in (self.metrics or {}).items():
            values[f"{prefix}/{k}"] = v
        return values

    def describe(self) -> str:
        if self.metrics is None:
            return f"validation INVALID: evaluated 0/{self.total} samples (all non-finite)"
        parts = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items())
        return f"validation evaluated {self.evaluated}/{self.total} samples: {parts}"


def evaluate(
    batches: tp.Iterable[dict[str, tp.Any]],
    predict: tp.Callable[[dict[str, tp.Any]], torch.Tensor],
    reduce: tp.Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> ValidationResult:
    """Run ``predict`` on each batch; ``reduce`` sums the totals over ranks."""
    totals = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=device)
    for batch in batches:
        pred = predict(batch)
        values = radio_map_metrics(pred, batch["image"].to(pred.device))
        stacked = torch.stack([values[k].double() for k in METRICS])
        ok = torch.isfinite(stacked).all(0)
        totals[: len(METRICS)] += torch.where(ok, stacked, 0.0).sum(1).to(device)
        totals[-2] += ok.sum().to(device)
        totals[-1] += ok.numel()
    totals = reduce(totals).cpu()
    evaluated, total = int(totals[-2]), int(totals[-1])
    if evaluated == 0:
        return ValidationResult(None, 0, total)
    means = {k: float(totals[i] / evaluated) for i, k in enumerate(METRICS)}
    return ValidationResult(means, evaluated, total)
