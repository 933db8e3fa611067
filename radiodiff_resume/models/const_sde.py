"""RadioDiff's decoupled constant-SDE diffusion (``model.objective: radiodiff``).

Continuous time ``t`` in ``[eps, 1]``: ``x_t = x_0 + C t + sqrt(t) noise`` with the constant drift
``C = -x_0``, so ``x_1`` is pure noise. The denoiser predicts ``C`` and the noise as two halves of its
output channels; sampling starts from noise at ``t = 1`` and removes the predicted drift and noise
step by step, with a last step from ``eps`` to 0 (RadioDiff's ``denoise``).
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass

import torch

Predict = tp.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x_t, t) -> prediction`` with ``2 * channels`` channels: the drift ``C``, then the noise."""

NETWORK_TIME_FLOOR = 1e-4
"""RadioDiff's default ``eps``: :func:`network_time` maps ``[NETWORK_TIME_FLOOR, 1]`` onto ``[0, 1000]``."""


def network_time(t: torch.Tensor) -> torch.Tensor:
    """The timestep the denoiser sees for continuous ``t``.

    RadioDiff conditions its UNet on ``log(t) / 4``; this is the same quantity mapped affinely onto
    the ``[0, 1000]`` range that diffusers' sinusoidal timestep embedding is built for (``t = 1``
    → 1000, ``t = 1e-4`` → 0), so the noisiest input has the largest timestep as in DDPM. The map is
    fixed (not taken from ``model.eps``): the network's input must not change with a loss setting.
    """
    return 1000.0 * (1.0 + torch.log(t) / -math.log(NETWORK_TIME_FLOOR))


def split(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, noise)`` halves of the denoiser's output channels."""
    drift, noise = pred.chunk(2, dim=1)
    return drift, noise


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = x_0 + C t + sqrt(t) noise`` with ``C = -x_0``; ``t`` holds one time per sample."""
    time = _per_sample(t, x0)
    return x0 + (-x0) * time + time.sqrt() * noise


def x0_from(x: torch.Tensor, drift: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by ``x_t`` and a predicted drift and noise (inverse of :func:`q_sample`)."""
    time = _per_sample(t, x)
    return x - drift * time - time.sqrt() * noise


def time_grid(steps: int, eps: float) -> list[float]:
    """Times the sampler visits: ``1, 1 - 1/steps, ..., 1/steps, eps, 0``.

    ``steps`` equal strides from 1 down to ``eps`` (the last one shortened by ``eps``), then
    RadioDiff's final denoising step from ``eps`` to 0: ``steps + 1`` denoiser calls in all.
    """
    return [1.0 - k / steps for k in range(steps)] + [eps, 0.0]


def step(x: torch.Tensor, pred: torch.Tensor, t: float, t_next: float,
         generator: torch.Generator | None) -> torch.Tensor:
    """One reverse step of RadioDiff's pred_KC sampler from ``t`` to ``t_next``.

    The drift is re-derived from the implied clean latent (``C = -x_0``), the predicted noise is
    removed in proportion ``s / sqrt(t)`` (``s = t - t_next``) and fresh noise of variance
    ``s t_next / t`` restores the marginal variance ``t_next``; the step to 0 adds none.
    """
    drift, noise = split(pred)
    s = t - t_next
    x0 = x0_from(x, drift, noise, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
    mean = x + x0 * s - (s / math.sqrt(t)) * noise
    if t_next == 0.0:
        return mean
    fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + math.sqrt(s * t_next / t) * fresh


def sample(predict: Predict, shape: tuple[int, ...], steps: int, eps: float,
           generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Latents from noise at ``t = 1``; all randomness from ``generator``, the trajectory in fp32."""
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    times = time_grid(steps, eps)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        pred = predict(x, torch.full((shape[0],), t, device=device, dtype=torch.float32))
        x = step(x, pred.float(), t, t_next, generator)
    return x


@dataclass(frozen=True)
class ConstantSDE:
    """The training objective: RadioDiff's ``p_losses`` for ``objective: pred_KC``."""

    eps: float = 1e-4
    """Smallest training time (``t ~ U[eps, 1]``) and the time of the last sampling step."""
    loss_type: str = "l2"
    """Distance of each prediction to its target: ``l2`` (squared) or ``l1``."""
    weighting_loss: bool = True
    """Weigh the drift term by ``(t + 1) / sqrt(t)`` and the noise term by
    ``sqrt(2 - t) / sqrt(1 - t + eps)``: the weights RadioDiff's ``LatentDiffusion.p_losses`` always
    applies (its ``weighting_loss`` flag only switches the pixel-space ``DDPM`` class's). False: 1."""
    use_l1: bool = True
    """Average the ``loss_type`` terms with the same terms in L1."""

    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``n`` times uniform in ``[eps, 1)``."""
        u = torch.rand((n,), generator=generator, device=device)
        return u * (1.0 - self.eps) + self.eps

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        """Weighted error of the predicted drift (target ``-x_0``) and noise, averaged per sample
        and then over the batch, all in fp32."""
        drift, eps_pred = split(pred.float())
        drift_error, noise_error = drift + x0.float(), eps_pred - noise.float()
        if self.weighting_loss:
            drift_weight, noise_weight = (t + 1) / t.sqrt(), (2 - t).sqrt() / (1 - t + self.eps).sqrt()
        else:
            drift_weight, noise_weight = torch.ones_like(t), torch.ones_like(t)

        def weighted(distance: tp.Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            return (drift_weight * distance(drift_error).flatten(1).mean(1)
                    + noise_weight * distance(noise_error).flatten(1).mean(1))

        total = weighted(torch.square if self.loss_type == "l2" else torch.abs)
        if self.use_l1:
            total = (total + weighted(torch.abs)) / 2
        return total.mean()
