"""Batches with bad values: which samples are bad and why, and a copy that is safe to run."""

from __future__ import annotations

import typing as tp

import torch

CLEAN, TOO_LARGE, NONFINITE = 0, 1, 2
"""Per-sample fault codes, the worst over the sample's floating values: a magnitude beyond the bound
(all finite), a NaN/Inf."""


def checked_batch(batch: tp.Mapping[str, tp.Any],
                  max_abs: float | None = None) -> tuple[dict[str, tp.Any], torch.Tensor | None]:
    """``(batch with every NaN/Inf and every value beyond max_abs set to 0, per-sample fault codes)``,
    on the device, no sync.

    The codes (uint8) cover every floating tensor (None when there is none); values within the bound
    come out unchanged, so a clean batch is bit for bit the same. Zeroing keeps the forward of a
    sample that is left out finite (its zero gradient must not turn NaN on the way back).
    """
    codes: torch.Tensor | None = None
    clean = dict(batch)
    for key, value in batch.items():
        if torch.is_tensor(value) and value.is_floating_point():
            finite = torch.isfinite(value)
            ok = finite if max_abs is None else value.abs() <= max_abs  # False for NaN and ±Inf too
            code = _per_sample(~ok).to(torch.uint8) + _per_sample(~finite).to(torch.uint8)
            codes = code if codes is None else torch.maximum(codes, code)
            clean[key] = torch.where(ok, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return clean, codes


def finite_batch(batch: tp.Mapping[str, tp.Any],
                 max_abs: float | None = None) -> tuple[dict[str, tp.Any], torch.Tensor | None]:
    """``(batch as in checked_batch, per-sample "all values good" mask)``."""
    clean, codes = checked_batch(batch, max_abs)
    return clean, None if codes is None else codes == CLEAN


def _per_sample(bad: torch.Tensor) -> torch.Tensor:
    """Whether each sample (first dimension) holds a ``bad`` entry; a 0/1-dim tensor is its own."""
    return bad.flatten(1).any(1) if bad.dim() > 1 else bad
