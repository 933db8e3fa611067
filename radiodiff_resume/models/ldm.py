"""Conditional latent diffusion: a frozen first stage, a condition path and a denoiser.

Two kinds of denoiser: one that sees the noisy latent concatenated with an encoded condition (buildings,
transmitter, buildings) from ``cond_encoder`` (diffusers' ``UNet2DModel`` by default), or one that
encodes the raw condition itself (``takes_condition = True``: RadioDiff's Swin-conditioned U-Net,
:mod:`.radiodiff_unet`, called as ``unet(x_t, t, cond) -> (drift, noise)`` with continuous ``t``).
``scale_factor`` is a persistent buffer, so it travels with ``state_dict`` and a strict load cannot
silently drop it. Two objectives: DDPM with DDIM sampling (``noise_scheduler``), or RadioDiff's constant
SDE (``const_sde``, see :mod:`.const_sde`).
"""

from __future__ import annotations

import math
import typing as tp

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from radiodiff_resume.models import const_sde as sde
from radiodiff_resume.models.const_sde import ConstantSDE


class ConditionEncoder(nn.Module):
    """A small CNN with BatchNorm that maps the condition to the latent grid.

    BatchNorm is deliberate: its running statistics are the state that fp16 overflow
    corrupts in the field, and the guards must protect something real.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 4,
        hidden_channels: tp.Sequence[int] = (32, 64),
        downsample: int = 4,
    ) -> None:
        super().__init__()
        n_down = int(math.log2(downsample))
        if 2**n_down != downsample:
            raise ValueError(f"downsample must be a power of two, got {downsample}")
        widths = list(hidden_channels)
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(max(len(widths), n_down)):
            width = widths[min(i, len(widths) - 1)]
            stride = 2 if i < n_down else 1
            layers += [
                nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.SiLU(),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.net(cond)


def _sample_of(output: tp.Any) -> torch.Tensor:
    """Accept diffusers outputs (``.sample``), tuples, or plain tensors from plugged denoisers."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return tp.cast(torch.Tensor, output.sample)
    return tp.cast(torch.Tensor, output[0])


class ConditionalLDM(nn.Module):
    """Frozen first stage + trainable condition encoder and denoiser.

    ``forward`` returns the training loss so the loss always flows through the
    (possibly DDP-wrapped) module's forward. With ``const_sde`` the model trains and samples
    RadioDiff's objective and ``noise_scheduler`` is unused.
    """

    def __init__(
        self,
        first_stage: nn.Module,
        unet: nn.Module,
        cond_encoder: nn.Module,
        noise_scheduler: DDPMScheduler,
        latent_shape: tuple[int, int, int],
        scale_factor: float = 1.0,
        loss_type: str = "l2",
        sampling_timesteps: int = 50,
        const_sde: ConstantSDE | None = None,
    ) -> None:
        super().__init__()
        self.first_stage = first_stage.requires_grad_(False).eval()
        self.unet = unet
        self.cond_encoder = cond_encoder
        self.noise_scheduler = noise_scheduler
        self.latent_shape = latent_shape
        self.loss_type = loss_type
        self.sampling_timesteps = sampling_timesteps
        self.const_sde = const_sde
        self.takes_condition = bool(getattr(unet, "takes_condition", False))
        if self.takes_condition and const_sde is None:
            raise ValueError(f"{type(unet).__name__} predicts RadioDiff's drift and noise: it needs "
                             "model.objective radiodiff or radiodiff_paper")
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)), persistent=True)

    def train(self, mode: bool = True) -> ConditionalLDM:
        """Keep the frozen first stage in eval mode whatever the trainer asks."""
        super().train(mode)
        self.first_stage.eval()
        return self

    def trainable_modules(self) -> nn.ModuleList:
        """What the optimizer and the EMA see; the first stage is excluded."""
        return nn.ModuleList([self.cond_encoder, self.unet])

    def _first_stage_precision(self, device: torch.device) -> tp.ContextManager[None]:
        """Autocast off: the frozen autoencoder runs in its own dtype (fp32), where it cannot overflow
        the way fp16 autoencoders do, and ``scale_factor`` was measured in that precision."""
        return torch.autocast(device.type, enabled=False)

    @property
    def _first_stage_dtype(self) -> torch.dtype:
        return next(self.first_stage.parameters()).dtype

    @torch.no_grad()
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent of ``image`` (a posterior sample, as in LDM), in fp32."""
        with self._first_stage_precision(image.device):
            posterior = self.first_stage.encode(image.to(self._first_stage_dtype)).latent_dist
            latent = posterior.sample(generator=generator)
        return latent.float() * self.scale_factor

    @torch.no_grad()
    def encode_mode(self, image: torch.Tensor) -> torch.Tensor:
        """Scaled posterior mode of ``image`` (deterministic), in fp32."""
        with self._first_stage_precision(image.device):
            latent = self.first_stage.encode(image.to(self._first_stage_dtype)).latent_dist.mode()
        return latent.float() * self.scale_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with self._first_stage_precision(latent.device):
            unscaled = (latent.float() / self.scale_factor).to(self._first_stage_dtype)
            return self.first_stage.decode(unscaled).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def latent_moments(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[sum, sum of squares, count, samples left out]`` of the unscaled latents, for
        ``scale_by_std``, over the samples whose latent is entirely finite (one NaN pixel must not
        make ``scale_factor`` NaN). Returned as sums so ranks can add them before the std is taken.
        """
        with self._first_stage_precision(image.device):
            posterior = self.first_stage.encode(image.to(self._first_stage_dtype)).latent_dist
            z = posterior.sample(generator=generator).double()
        ok = torch.isfinite(z).flatten(1).all(1)
        z = torch.where(ok.view(-1, *([1] * (z.dim() - 1))), z, 0.0)
        count = ok.sum().double() * z[0].numel()
        return torch.stack([z.sum(), (z * z).sum(), count, (~ok).sum().double()])

    def set_scale_factor(self, value: torch.Tensor | float) -> None:
        self.scale_factor.copy_(torch.as_tensor(value, dtype=self.scale_factor.dtype))

    def denoise(self, noisy: torch.Tensor, cond_features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _sample_of(self.unet(torch.cat([noisy, cond_features], dim=1), t))

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """What the denoiser is conditioned on: the raw maps, or their encoding by ``cond_encoder``."""
        return cond if self.takes_condition else self.cond_encoder(cond)

    def predict(self, x: torch.Tensor, t: torch.Tensor,
                condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RadioDiff's drift and noise at continuous times ``t``: from a network that takes them, or
        from the two halves of a concatenating denoiser fed :func:`~.const_sde.network_time`."""
        if self.takes_condition:
            drift, noise = self.unet(x, t, condition)
            return drift, noise
        return sde.split(self.denoise(x, condition, sde.network_time(t)))

    def forward(
        self, image: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training loss of one batch; all randomness comes from ``generator``."""
        z = self.encode(image, generator)
        if self.const_sde is not None:
            # upstream's order of draws: posterior sample, times, noise
            time = self.const_sde.sample_time(z.shape[0], generator, z.device)
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            drift, noise_pred = self.predict(sde.q_sample(z, noise, time), time, self.condition(cond))
            return self.const_sde.loss(drift, noise_pred, z, noise, time)
        features = self.cond_encoder(cond)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (z.shape[0],),
            generator=generator, device=z.device,
        )
        noisy = self.noise_scheduler.add_noise(z, noise, t)
        pred = self.denoise(noisy, features, t)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(z, noise, t)
        else:
            target = z
        if self.loss_type == "l1":
            return F.l1_loss(pred.float(), target.float())
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample(
        self, cond: torch.Tensor, generator: torch.Generator | None = None, steps: int | None = None
    ) -> torch.Tensor:
        """Deterministic DDIM sampling (eta=0), or RadioDiff's sampler with ``const_sde``; noise only
        from ``generator``. The latent trajectory stays in fp32 under any autocast; only the
        denoiser's forward runs in the autocast dtype."""
        if self.const_sde is not None:
            condition = self.condition(cond)

            def predict(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return self.predict(x, t, condition)

            z = sde.sample(predict, (cond.shape[0], *self.latent_shape), steps or self.sampling_timesteps,
                           self.const_sde.eps, generator, cond.device)
            return self.decode(z)
        ddim = DDIMScheduler.from_config(self.noise_scheduler.config)
        ddim.set_timesteps(steps or self.sampling_timesteps, device=cond.device)
        features = self.cond_encoder(cond)
        z = torch.randn(
            (cond.shape[0], *self.latent_shape), generator=generator, device=cond.device, dtype=torch.float32,
        )
        for t in ddim.timesteps:
            pred = self.denoise(z, features, t.expand(cond.shape[0]))
            z = ddim.step(pred.float(), t, z).prev_sample
        return self.decode(z)

    def probe_inputs(self, image: torch.Tensor, cond: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Probe inputs for a batch: the maps, fixed latent noise and timesteps (from ``generator``).
        With ``const_sde`` the timesteps are what the denoiser sees for continuous times in
        ``[eps, 1]`` (the times themselves for a network that takes them), so :meth:`probe` stays the
        same function for both objectives."""
        n = image.shape[0]
        noise = torch.randn((n, *self.latent_shape), generator=generator)
        if self.const_sde is not None:
            time = self.const_sde.sample_time(n, generator, noise.device)
            timestep = time if self.takes_condition else sde.network_time(time)
            return {"image": image, "cond": cond, "noise": noise, "timestep": timestep}
        steps = self.noise_scheduler.config.num_train_timesteps
        timestep = torch.randint(0, steps, (n,), generator=generator)
        return {"image": image, "cond": cond, "noise": noise, "timestep": timestep}

    @torch.no_grad()
    def probe(self, image: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor,
              timestep: torch.Tensor) -> torch.Tensor:
        """A fixed function of the whole state: first stage (both halves), ``scale_factor``, condition
        encoder (with its running statistics in eval mode) and denoiser. It uses none of the loss
        settings (loss type, prediction type, noise schedule), so it measures the state, not the config."""
        z = self.encode_mode(image)
        if self.takes_condition:
            pred = torch.cat(self.unet(0.8 * z + 0.6 * noise, timestep, cond), dim=1)
        else:
            pred = self.denoise(0.8 * z + 0.6 * noise, self.cond_encoder(cond), timestep)
        return pred.double().square().mean() + self.decode(z).double().square().mean()
