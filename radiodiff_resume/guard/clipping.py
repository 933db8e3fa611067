"""Gradient clipping from a norm computed once per step: fixed, z-score (ZClip) and AGC.

Every decision is a device-side tensor op; nothing here reads a value back to the host.
"""

from __future__ import annotations

import typing as tp

import torch

from radiodiff_resume.config import ClipConfig

NORM_EPS = 1e-6
"""As ``torch.nn.utils.clip_grad_norm_``: coefficient = threshold / (norm + 1e-6), at most 1."""


def grads_of(params: tp.Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients as one vector, accumulated in fp32 (the same floats as
    ``clip_grad_norm_`` for fp32 gradients)."""
    if not grads:
        return torch.zeros(())
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    first = grads[0].device
    norms = [n.to(first) for n in torch._foreach_norm(grads, 2, dtype=torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def scale_grads(grads: list[torch.Tensor], factor: torch.Tensor) -> None:
    """Multiply every gradient by the 0-dim ``factor``, per device and dtype with foreach."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in groups.items():
        torch._foreach_mul_(group, factor.to(device))


def scrub_grads(grads: list[torch.Tensor]) -> None:
    """NaN, +Inf and -Inf entries to 0 (``nan_to_num`` alone would map ±Inf to ±3.4e38)."""
    for g in grads:
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


class Clipper:
    """Decides the clip threshold from the norm, applies it, and keeps ZClip's statistics.

    ``zscore``: ``max_norm`` (if any) is a ceiling; after ``warmup`` steps a norm whose z-score
    against the running mean and variance exceeds ``zscore`` is clipped to ``mean + zscore * std``.
    The statistics are fed the norm after clipping, only on steps that were taken.
    """

    def __init__(self, cfg: ClipConfig, max_norm: float | None, device: torch.device) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        self.max_norm = max_norm if cfg.mode in ("zscore", "fixed") else None
        self.mean = torch.zeros((), device=device)
        self.var = torch.zeros((), device=device)
        self.count = 0

    @property
    def adaptive(self) -> bool:
        return self.mode == "zscore" and self.count >= self.cfg.warmup

    def threshold(self, norm: torch.Tensor) -> torch.Tensor:
        """The norm gradients are clipped to this step (inf: no clipping), on the device."""
        ceiling = torch.full_like(norm, float("inf") if self.max_norm is None else self.max_norm)
        if not self.adaptive:
            return ceiling
        limit = self.mean + self.cfg.zscore * self.var.clamp_min(0).sqrt()
        return torch.minimum(ceiling, limit)

    def coefficient(self, norm: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return (threshold / (norm + NORM_EPS)).clamp(max=1.0)

    def apply_agc(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Unit-wise clipping (Brock et al. 2021): each output unit's gradient norm at most
        ``agc_lambda`` times its weight norm (floored at ``agc_eps``). Returns the count of clipped
        units, on the device."""
        clipped = torch.zeros((), dtype=torch.int64, device=self.mean.device)
        for p in params:
            if p.grad is None:
                continue
            dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
            w = torch.linalg.vector_norm(p.detach().float(), dim=dims, keepdim=p.ndim > 1)
            g = torch.linalg.vector_norm(p.grad.float(), dim=dims, keepdim=p.ndim > 1)
            limit = w.clamp_min(self.cfg.agc_eps) * self.cfg.agc_lambda
            over = g > limit
            p.grad.mul_(torch.where(over, limit / g.clamp_min(NORM_EPS), 1.0).to(p.grad.dtype))
            clipped += over.sum().to(clipped.device)
        return clipped

    def observe(self, clipped_norm: torch.Tensor) -> None:
        """Feed the norm a taken step was clipped to: exact mean / variance during warm-up
        (Welford), then exponential smoothing (``alpha``)."""
        if self.mode != "zscore":
            return
        self.count += 1
        if self.count <= self.cfg.warmup:
            delta = clipped_norm - self.mean
            self.mean = self.mean + delta / self.count
            self.var = self.var + (delta * (clipped_norm - self.mean) - self.var) / self.count
            return
        a = self.cfg.alpha
        self.mean = a * self.mean + (1 - a) * clipped_norm
        self.var = a * self.var + (1 - a) * (clipped_norm - self.mean).square()

    def state_dict(self) -> dict[str, tp.Any]:
        return {"mean": self.mean.detach().cpu(), "var": self.var.detach().cpu(), "count": self.count}

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        self.mean = state["mean"].to(self.mean.device, torch.float32)
        self.var = state["var"].to(self.var.device, torch.float32)
        self.count = int(state["count"])
