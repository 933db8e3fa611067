"""Batches with non-finite values: which samples are bad, and a copy that is safe to run."""

from __future__ import annotations

import typing as tp

import torch


def finite_batch(batch: tp.Mapping[str, tp.Any]) -> tuple[dict[str, tp.Any], torch.Tensor | None]:
    """``(batch with every NaN/Inf set to 0, per-sample "all finite" mask)``, on the device, no sync.

    The mask covers every floating tensor (None when there is none); values that are finite
    come out unchanged, so a clean batch is bit for bit the same.
    """
    ok: torch.Tensor | None = None
    clean = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.is_floating_point():
            finite = torch.isfinite(value)
            sample_ok = finite.flatten(1).all(1) if value.dim() > 1 else finite
            ok = sample_ok if ok is None else ok & sample_ok
            clean[key] = torch.where(finite, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return clean, ok
