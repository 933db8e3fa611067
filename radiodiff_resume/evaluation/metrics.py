"""Per-map NMSE, RMSE, SSIM and PSNR under two named conventions, because RadioDiff's published numbers
depend on a data range that its code leaves to the installed torchmetrics.

Maps are compared in [0, 1]: the prediction is the sampler's map ``(x + 1) / 2`` (RadioDiff's
``LatentDiffusion.sample`` clamps it to [0, 1] too), the target ``(image + 1) / 2`` (RadioDiff's
``GT * 0.5 + 0.5``). NMSE = mean((p − t)²) / mean(t²) and RMSE = √mean((p − t)²) are the same in both
conventions; SSIM and PSNR need a *data range*, and there they differ:

``radiodiff``
    RadioDiff's ``sample_cond_ldm.py`` (``calc_loss_test``) calls torchmetrics'
    ``structural_similarity_index_measure(pred, target)`` and ``peak_signal_noise_ratio(pred, target)``
    without ``data_range``, on batches of ``sampler.batch_size`` maps (1 in its ``radio_sample.yaml``, so
    per map), and averages over the maps. The range then comes from the data: PSNR takes
    ``t.max() − t.min()``, SSIM ``max(p.max() − p.min(), t.max() − t.min())``. SSIM (Gaussian window 11,
    σ 1.5, k1 0.01, k2 0.03) is averaged over the valid region, where the window lies inside the map, as
    torchmetrics up to 1.4 crops it. Computed here in float64 without torchmetrics, so the numbers do not
    move with the installed version: torchmetrics 1.5 to 1.7 average SSIM over the whole reflect-padded map,
    and from 1.8 on ``peak_signal_noise_ratio`` requires ``data_range`` (RadioDiff's call fails).
``fixed``
    The full [0, 1] scale: data range 1 for PSNR and SSIM, SSIM over the whole map as the installed
    torchmetrics computes it — the numbers this package's validation logs
    (:func:`~radiodiff_resume.trainer.validation.radio_map_metrics`).
"""

from __future__ import annotations

import math
import typing as tp

import torch
import torch.nn.functional as F

from radiodiff_resume.trainer.validation import radio_map_metrics

METRICS = ("nmse", "rmse", "ssim", "psnr")


COLUMNS = {
    "radiodiff": {"nmse": "nmse", "rmse": "rmse", "ssim": "ssim_radiodiff", "psnr": "psnr_radiodiff"},
    "fixed": {"nmse": "nmse", "rmse": "rmse", "ssim": "ssim_fixed", "psnr": "psnr_fixed"},
}
"""Which value of a map's record each convention reports as each metric."""

FIELDS = ("nmse", "rmse", "ssim_radiodiff", "psnr_radiodiff", "ssim_fixed", "psnr_fixed",
          "psnr_range_radiodiff", "ssim_range_radiodiff")
"""The values recorded for every map: both conventions at once, so either can be reported later
without sampling again."""

WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03
"""torchmetrics' SSIM defaults, which RadioDiff's call keeps."""


def map_metrics(pred: torch.Tensor, target: torch.Tensor) -> list[dict[str, float | None]]:
    """:data:`FIELDS` of every map of a batch (``[B, 1, H, W]`` in [-1, 1]); a value that is not finite
    (a NaN map, a constant target's PSNR) is None."""
    pred, target = pred.detach().cpu(), target.detach().cpu()  # one device, whatever sampled
    p = (pred.double().clamp(-1, 1) + 1) / 2
    t = (target.double() + 1) / 2
    mse = (p - t).pow(2).flatten(1).mean(1)
    psnr_range = _span(t)
    ssim_range = torch.maximum(_span(p), psnr_range)
    fixed = radio_map_metrics(pred, target)
    columns = {
        "nmse": mse / t.pow(2).flatten(1).mean(1),
        "rmse": mse.sqrt(),
        "ssim_radiodiff": ssim_valid(p, t, ssim_range),
        "psnr_radiodiff": 10 * torch.log10(psnr_range.pow(2) / mse),
        "ssim_fixed": fixed["ssim"].double(),
        "psnr_fixed": fixed["psnr"].double(),
        "psnr_range_radiodiff": psnr_range,
        "ssim_range_radiodiff": ssim_range,
    }
    return [{k: _finite(float(v[i])) for k, v in columns.items()} for i in range(p.shape[0])]


def ssim_valid(p: torch.Tensor, t: torch.Tensor, data_range: torch.Tensor) -> torch.Tensor:
    """Per-map SSIM of ``[B, 1, H, W]`` maps with a per-map ``data_range``, averaged over the positions
    where the Gaussian window lies inside the map (torchmetrics ≤ 1.4: reflect-pad, then crop the pad)."""
    if min(p.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs maps of at least {WINDOW}×{WINDOW} pixels, got {tuple(p.shape[-2:])}")
    x = torch.arange(WINDOW, dtype=p.dtype) - (WINDOW - 1) / 2
    g = torch.exp(-((x / SIGMA) ** 2) / 2)
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]
    b = p.shape[0]
    stack = torch.cat([p, t, p * p, t * t, p * t], dim=1).reshape(b * 5, 1, *p.shape[-2:])
    mu_p, mu_t, pp, tt, pt = F.conv2d(stack, window).reshape(b, 5, -1).unbind(1)
    var_p, var_t, cov = pp - mu_p**2, tt - mu_t**2, pt - mu_p * mu_t
    c1, c2 = ((K1 * data_range) ** 2)[:, None], ((K2 * data_range) ** 2)[:, None]
    index = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return index.mean(1)


def summarize(records: tp.Iterable[tp.Mapping[str, tp.Any]], convention: str) -> dict[str, dict[str, float]]:
    """Metric → mean, std (population) and count over the maps whose value is finite."""
    rows = list(records)
    out = {}
    for metric, key in COLUMNS[convention].items():
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        n = len(values)
        mean = sum(values) / n if n else math.nan
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / n) if n else math.nan
        out[metric] = {"mean": mean, "std": std, "count": n}
    return out


def _span(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    return flat.amax(1) - flat.amin(1)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
