"""Stage 2: the conditional latent diffusion model."""

from __future__ import annotations

import logging
import typing as tp

import torch
from torch import nn

from radiodiff_resume.checkpoint.manifest import Manifest
from radiodiff_resume.errors import DataError
from radiodiff_resume.io import save_tensors_atomic
from radiodiff_resume.models.ldm import ConditionalLDM
from radiodiff_resume.trainer.base import Batch, Trainer
from radiodiff_resume.trainer.samples import sample_generator
from radiodiff_resume.trainer.state import derive_seed

logger = logging.getLogger(__name__)


class LatentDiffusionTrainer(Trainer):
    """Trains condition encoder + denoiser on latents of the frozen first stage."""

    stage = "ldm"

    def __init__(self, *args: tp.Any, measure_scale: bool, configured_scale_factor: float,
                 **kwargs: tp.Any) -> None:
        super().__init__(*args, **kwargs)
        self.measure_scale = measure_scale
        self.configured_scale_factor = configured_scale_factor

    @property
    def ldm(self) -> ConditionalLDM:
        return tp.cast(ConditionalLDM, self.unwrapped)

    def trainable_module(self, model: nn.Module) -> nn.Module:
        return tp.cast(ConditionalLDM, model).trainable_modules()

    def on_fit_start(self) -> None:
        """On a fresh run: load the denoiser's pretrained part, if it has one, and, when it is measured
        (``scale_by_std`` without ``default_scale``), set ``scale_factor`` once, from all ranks.

        A restored run keeps the weights and the value it was trained with, even at step 0 (a RadioDiff
        ``{'model'}`` file imported as a fine-tune): only a run that loaded nothing is fresh.
        """
        if self.state.step > 0 or self.checkpointer.resumed_from is not None:
            logger.info(
                "ldm: scale_factor %.6g restored from the checkpoint (the checkpoint's value wins on "
                "resume; it is never recomputed)", float(self.ldm.scale_factor),
            )
            return
        self.initialise_denoiser()
        if not self.measure_scale:
            logger.info("ldm: scale_factor %.6g from model.scale_factor%s", float(self.ldm.scale_factor),
                        "" if float(self.ldm.scale_factor) != 1.0 else " (latents unscaled)")
            return
        self.measure_scale_factor()

    def initialise_denoiser(self) -> None:
        """A fresh run's pretrained start (RadioDiff's ImageNet Swin, ``cond_weights``), on every rank from
        the same file; the EMA starts from the loaded weights too."""
        initialise = getattr(self.ldm.unet, "initialise", None)
        if initialise is None:
            return
        initialise()
        if self.ema is not None:
            with torch.no_grad():
                for shadow, param in zip(self.ema.shadow_params, self.params, strict=True):
                    shadow.copy_(param.detach())

    def measure_scale_factor(self) -> float:
        """Set ``scale_factor`` to 1/std of the latents of every rank's next training batch (the first
        one on a fresh start; non-finite samples left out); returns it."""
        batch = self.to_device(self.train_stream.peek())
        generator = torch.Generator(self.accelerator.device).manual_seed(
            derive_seed(self.seed, self.stage, "scale_by_std", self.accelerator.process_index)
        )
        moments = self.accelerator.reduce(self.ldm.latent_moments(batch["image"], generator), "sum")
        total, squares, count, left_out = moments.tolist()
        if count == 0:
            raise DataError(
                "model.scale_by_std: every sample of the first training batch (on every process) has a "
                "non-finite latent, so no scale can be measured; check the data (NaN/Inf in the images) "
                "or set model.default_scale=true and model.scale_factor to a known value")
        mean = total / count
        std = (squares / count - mean * mean) ** 0.5
        self.ldm.set_scale_factor(1.0 / std)
        logger.info(
            "ldm: scale_by_std set scale_factor = 1/std = %.6g (first batch of every rank, %d values%s)",
            1.0 / std, int(count), f"; {int(left_out)} sample(s) with non-finite latents left out"
            if left_out else "",
        )
        return 1.0 / std

    def on_fit_end(self) -> None:
        """Write final weights (online and EMA) for inference, from the main process."""
        online = dict(self.ldm.state_dict())
        ema = None
        if self.ema is not None:
            with self.ema_weights():  # every rank: the EMA's statistics are recomputed and synced
                ema = {k: v.clone() for k, v in self.ldm.state_dict().items()}
        if self.accelerator.is_main_process:
            meta = {"step": str(self.state.step), "scale_factor": repr(float(self.ldm.scale_factor))}
            folder = self.results_folder / "final"
            save_tensors_atomic(folder / "model.safetensors", online, meta)
            if ema is not None:
                save_tensors_atomic(folder / "model_ema.safetensors", ema, meta)
            logger.info("ldm: final weights written to %s", folder)
        self.accelerator.wait_for_everyone()

    def loss_with(self, module: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return tp.cast(torch.Tensor, module(batch["image"], batch["cond"], generator=generator))

    def make_probe_inputs(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.ldm.probe_inputs(batch["image"], batch["cond"], generator)

    def probe_with(self, module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return tp.cast(ConditionalLDM, module).probe(**inputs)

    def scale_factor_value(self) -> float:
        return float(self.ldm.scale_factor)

    def resume_conflict(self, manifest: Manifest) -> str | None:
        """A fixed ``model.scale_factor`` that differs from the checkpoint's cannot be resumed."""
        saved = manifest.scale_factor
        configured = torch.tensor(self.configured_scale_factor, dtype=self.ldm.scale_factor.dtype).item()
        if self.measure_scale or saved is None or saved == configured:
            return None
        return (
            f"model.scale_factor is {self.configured_scale_factor!r} in the config but the checkpoint "
            f"{manifest.step} was trained with {saved!r}. On resume the checkpoint's value wins, so the "
            f"config must agree: set model.scale_factor={saved!r} to resume, or start a new run with "
            "checkpoint.resume=never (or another trainer.results_folder) to train with the new value."
        )

    def predict(self, batch: Batch) -> torch.Tensor:
        generator = sample_generator(self.seed, self.stage, self.accelerator.device)
        with self.accelerator.autocast():
            return self.ldm.sample(batch["cond"], generator=generator)

    def sample_columns(self, batch: Batch) -> list[torch.Tensor]:
        return [batch["cond"], batch["image"], self.predict(batch)]
