"""RadioDiff's decoupled constant-SDE diffusion (``model.objective: radiodiff`` / ``radiodiff_paper``).

Continuous time ``t`` in ``[eps, 1]``: ``x_t = x_0 + C t + sqrt(t) noise`` with the constant drift
``C = -x_0``, so ``x_1`` is pure noise. The denoiser predicts ``C`` and the noise; sampling starts from
noise at ``t = 1`` and removes the predicted drift and noise step by step, with a last step from ``eps``
to 0 (RadioDiff's ``denoise``). The arithmetic follows upstream's ``LatentDiffusion`` (commit 14c4a8c)
operation for operation in float32, so the same weights and the same random draws give upstream's numbers
(``tests/models/test_radiodiff_parity.py`` checks them against upstream's own outputs).
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass

import torch

Predict = tp.Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``(x_t, t) -> (drift C, noise)``, ``t`` the continuous time of each sample."""

NETWORK_TIME_FLOOR = 1e-4
"""RadioDiff's default ``eps``: :func:`network_time` maps ``[NETWORK_TIME_FLOOR, 1]`` onto ``[0, 1000]``."""

WEIGHTINGS = ("radiodiff", "paper")
"""Loss weights of the drift and noise terms: ``radiodiff`` is upstream's current ``LatentDiffusion``
(``2 exp(1 - t)`` and ``exp(sqrt t)``, applied when ``weighting_loss`` is true); ``paper`` is the code
released with the paper (``(t + 1)/sqrt t`` and ``sqrt(2 - t)/sqrt(1 - t + eps)``)."""


def network_time(t: torch.Tensor) -> torch.Tensor:
    """The timestep a diffusers U-Net sees for continuous ``t`` (RadioDiff's own network takes ``t``).

    RadioDiff conditions its U-Net on ``log(t) / 4``; this is the same quantity mapped affinely onto
    the ``[0, 1000]`` range that diffusers' sinusoidal timestep embedding is built for (``t = 1``
    → 1000, ``t = 1e-4`` → 0), so the noisiest input has the largest timestep as in DDPM. The map is
    fixed (not taken from ``model.eps``): the network's input must not change with a loss setting.
    """
    return 1000.0 * (1.0 + torch.log(t) / -math.log(NETWORK_TIME_FLOOR))


def split(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, noise)`` halves of a one-tensor denoiser's output channels."""
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


def schedule(steps: int, eps: float) -> list[tuple[float, float]]:
    """``(t, s)`` of each denoiser call: the time it sees and the stride taken from there, in float32.

    ``steps`` strides of ``1/steps`` from 1, the last one shortened by ``eps``, then one more call that
    takes whatever time is left (about ``eps``) down to 0: ``steps + 1`` calls. The times are float32
    subtractions as upstream makes them (``0.40000004`` for 0.4 at 5 steps), not exact decimals.
    """
    stride = 1.0 / steps
    strides = torch.tensor([stride] * (steps - 1) + [stride - eps, eps], dtype=torch.float32)
    now = torch.ones((), dtype=torch.float32)
    calls = []
    for i, s in enumerate(strides):
        s = now.clone() if i == len(strides) - 1 else s
        calls.append((float(now), float(s)))
        now = now - s
    return calls


def step(x: torch.Tensor, drift: torch.Tensor, noise: torch.Tensor, t: float, s: float,
         generator: torch.Generator | None) -> torch.Tensor:
    """One reverse step of RadioDiff's pred_KC sampler from ``t`` by ``s``.

    The drift is re-derived from the implied clean latent (``C = -x_0``), the predicted noise is removed in
    proportion ``s / sqrt(t)`` and fresh noise of variance ``s (t - s) / t`` restores the marginal
    variance; on the last step (``s = t``) that variance is 0. Fresh noise is drawn on every step, the
    last included, as upstream does, so a seeded stream stays aligned with upstream's.
    """
    time = torch.full((x.shape[0], *([1] * (x.dim() - 1))), t, device=x.device, dtype=x.dtype)
    stride = torch.full_like(time, s)
    drift = -(x - drift * time - torch.sqrt(time) * noise)
    mean = x - drift * stride - stride / torch.sqrt(time) * noise
    fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return mean + torch.sqrt(stride * (time - stride) / time) * fresh


def sample(predict: Predict, shape: tuple[int, ...], steps: int, eps: float,
           generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Latents from noise at ``t = 1``; all randomness from ``generator``, the trajectory in fp32."""
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    for t, s in schedule(steps, eps):
        drift, noise = predict(x, torch.full((shape[0],), t, device=device, dtype=torch.float32))
        x = step(x, drift.float(), noise.float(), t, s, generator)
    return x


@dataclass(frozen=True)
class ConstantSDE:
    """The training objective: upstream's ``LatentDiffusion.p_losses`` for ``objective: pred_KC``."""

    eps: float = 1e-4
    """Smallest training time (``t ~ U[eps, 1]``) and the time of the last sampling step."""
    loss_type: str = "l2"
    """Distance of each prediction to its target: ``l2`` (squared) or ``l1``."""
    weighting_loss: bool = True
    """Weigh the drift and noise terms by time (``weighting``); False: both weights 1."""
    use_l1: bool = True
    """Average the ``loss_type`` terms with the same terms in L1."""
    weighting: str = "radiodiff"
    """Which weights (:data:`WEIGHTINGS`)."""

    def sample_time(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``n`` times uniform in ``[eps, 1)``."""
        u = torch.rand((n,), generator=generator, device=device)
        return u * (1.0 - self.eps) + self.eps

    def weights(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample weights of the drift and the noise term."""
        if not self.weighting_loss:
            return torch.ones_like(t), torch.ones_like(t)
        if self.weighting == "paper":
            return (t + 1) / t.sqrt(), (2 - t).sqrt() / (1 - t + self.eps).sqrt()
        return 2 * torch.exp(1 - t), torch.exp(torch.sqrt(t))

    def loss(self, drift: torch.Tensor, noise_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
             t: torch.Tensor) -> torch.Tensor:
        """Weighted error of the predicted drift (target ``-x_0``) and noise, averaged per sample
        and then over the batch, all in fp32."""
        drift_error, noise_error = drift.float() + x0.float(), noise_pred.float() - noise.float()
        drift_weight, noise_weight = self.weights(t.float())

        def weighted(distance: tp.Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
            return (drift_weight * distance(drift_error).flatten(1).mean(1)
                    + noise_weight * distance(noise_error).flatten(1).mean(1))

        total = weighted(torch.square if self.loss_type == "l2" else torch.abs)
        if self.use_l1:
            total = (total + weighted(torch.abs)) / 2
        return total.mean()
