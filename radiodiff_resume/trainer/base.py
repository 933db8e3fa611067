"""The training loop. It reads top to bottom and holds no policy of its own:
subclasses say what a loss, a prediction and a sample grid are.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import typing as tp
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from radiodiff_resume.checkpoint.checkpointer import Checkpointer
from radiodiff_resume.checkpoint.manifest import Manifest
from radiodiff_resume.config import CheckpointConfig, Config, LoopConfig, to_dict, to_yaml
from radiodiff_resume.data.stream import BatchStream
from radiodiff_resume.dist import Ranks
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.events import EventLog
from radiodiff_resume.images import save_grid
from radiodiff_resume.trainer.runlog import RunLog
from radiodiff_resume.trainer.state import TrainState, capture_rng, derive_seed, restore_rng
from radiodiff_resume.trainer.validation import ValidationResult, evaluate

logger = logging.getLogger(__name__)

Batch = dict[str, tp.Any]
PROBE_SAMPLES = 2


def warmup_cosine(loop: LoopConfig) -> tp.Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
    floor = loop.min_lr / loop.lr

    def factor(step: int) -> float:
        if step < loop.lr_warmup_steps:
            return (step + 1) / (loop.lr_warmup_steps + 1)
        span = max(1, loop.train_num_steps - loop.lr_warmup_steps)
        progress = min(1.0, (step - loop.lr_warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Accelerate-based loop: accumulation, mixed precision, EMA, validation, samples.

    Subclasses implement :meth:`training_loss`, :meth:`predict` and
    :meth:`sample_columns`, and may hook :meth:`on_fit_start` / :meth:`on_fit_end`.
    """

    stage = "train"

    def __init__(
        self,
        loop: LoopConfig,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        *,
        accelerator: Accelerator,
        results_folder: Path,
        seed: int,
        batch_size: int,
        num_workers: int = 0,
        checkpoint: CheckpointConfig | None = None,
        config: Config | None = None,
    ) -> None:
        self.loop = loop
        self.accelerator = accelerator
        self.results_folder = Path(results_folder)
        self.seed = seed
        self.batch_size = batch_size
        self.state = TrainState()
        self.run_config: dict[str, tp.Any] = to_dict(config) if config is not None else {}
        """The resolved config of the whole run; each checkpoint keeps a copy to diff against on resume."""
        self.config_yaml = to_yaml(config) if config is not None else "{}\n"
        self.config_hash = hashlib.sha256(self.config_yaml.encode()).hexdigest()[:16]
        accelerator.gradient_accumulation_steps = loop.gradient_accumulate_every
        if accelerator.scaler is not None:
            # Each stage starts with its own loss scale; the optimizer wrapper takes this object in prepare.
            accelerator.scaler = fresh_grad_scaler(accelerator.scaler)

        model.to(accelerator.device)
        self.params = [p for p in self.trainable_module(model).parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=loop.lr, weight_decay=loop.weight_decay)
        self.lr_schedule = LambdaLR(optimizer, warmup_cosine(loop))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        # After prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts equal.
        self.ema = self.new_ema() if loop.use_ema else None
        # Runtime randomness (e.g. dropout) differs per rank; model init above did not.
        set_seed(derive_seed(seed, self.stage, "global", accelerator.process_index) % 2**32)

        rank, world = accelerator.process_index, accelerator.num_processes
        self.train_stream = BatchStream(train_set, batch_size, rank, world, seed, num_workers)
        self.val_set = val_set
        self.num_workers = num_workers
        self.noise = torch.Generator(accelerator.device).manual_seed(
            derive_seed(seed, self.stage, "noise", rank)
        )
        self.log = RunLog(self.results_folder, accelerator, self.stage)
        self.events = EventLog(self.results_folder / "events.jsonl", accelerator.is_main_process)
        self.ranks = Ranks(accelerator)
        self.checkpointer = Checkpointer(self, checkpoint or CheckpointConfig(), self.events, self.ranks)
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._loss_count = 0
        self._stop_reason: str | None = None
        self._probe_inputs: dict[str, torch.Tensor] | None = None

    # ----- what subclasses provide -------------------------------------------------
    def trainable_module(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` that the optimizer and EMA see."""
        return model

    def loss_with(self, module: nn.Module, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Loss of ``batch`` through ``module``'s forward, all randomness from ``generator``."""
        raise NotImplementedError

    def training_loss(self, batch: Batch) -> torch.Tensor:
        """Loss of one micro-batch through the prepared (DDP) module, from the noise stream."""
        return self.loss_with(self.model, batch, self.noise)

    def make_probe_inputs(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Inputs of the probe (CPU tensors) from a few validation samples and ``generator``."""
        raise NotImplementedError

    def probe_with(self, module: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A fixed scalar function of every part of ``module``'s state on ``inputs``, independent of
        the loss settings in the config (so a checkpoint is probed as it was saved)."""
        raise NotImplementedError

    def scale_factor_value(self) -> float | None:
        """The latent scale a checkpoint records (None for stages without one)."""
        return None

    def resume_conflict(self, manifest: Manifest) -> str | None:
        """Why this run must not resume from ``manifest`` given its config (None: fine)."""
        return None

    def predict(self, batch: Batch) -> torch.Tensor:
        """The model's output map for ``batch`` (validation), in [-1, 1]."""
        raise NotImplementedError

    def sample_columns(self, batch: Batch) -> list[torch.Tensor]:
        """Images shown side by side in a sample grid."""
        raise NotImplementedError

    def on_fit_start(self) -> None:
        """Runs before the first step of :meth:`fit` (after any restore)."""

    def on_fit_end(self) -> None:
        """Runs after the last step of :meth:`fit`."""

    # ----- the loop ----------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return tp.cast(nn.Module, self.accelerator.unwrap_model(self.model))

    def fit(self) -> None:
        total = self.loop.train_num_steps
        self.checkpointer.resume()
        self.model.train()
        self.on_fit_start()
        logger.info("%s: training steps %d..%d", self.stage, self.state.step, total)
        bar = tqdm(
            total=total, initial=self.state.step, desc=self.stage, dynamic_ncols=True,
            disable=not self.accelerator.is_main_process,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        while self.state.step < total:
            loss = self.train_step()
            self.state.step += 1
            bar.update(1)
            self.after_step(loss, bar)
            if self.stop_agreed():
                bar.close()
                self.stop()
        bar.close()
        if self.checkpointer.last_saved_step != self.state.step:
            self.checkpointer.save()
        self.sync_buffers()
        self.on_fit_end()
        self.log.plot(self.results_folder / "curves.png")

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulate_every`` micro-batches."""
        losses = []
        for _ in range(self.loop.gradient_accumulate_every):
            batch = self.to_device(next(self.train_stream))
            with self.accelerator.accumulate(self.model):
                loss = self.training_loss(batch)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients and self.loop.max_grad_norm is not None:
                    self.accelerator.clip_grad_norm_(self.params, self.loop.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        self.lr_schedule.step()
        next_step = self.state.step + 1
        if self.ema is not None and next_step % self.loop.ema_update_every == 0:
            self.ema.step(self.params)
        self.state.samples_seen += (
            self.batch_size * self.loop.gradient_accumulate_every * self.accelerator.num_processes
        )
        return torch.stack(losses).mean()

    def after_step(self, loss: torch.Tensor, bar: tqdm) -> None:
        """Logging, validation and samples on their schedules (one host sync per log)."""
        step = self.state.step
        self._loss_sum += loss
        self._loss_count += 1
        if step % self.loop.log_freq == 0 or step == self.loop.train_num_steps:
            mean = self.accelerator.reduce(self._loss_sum / self._loss_count, "mean").item()
            self._loss_sum.zero_()
            self._loss_count = 0
            lr = self.lr_schedule.get_last_lr()[0]
            self.log.write(step, {"loss": mean, "lr": lr})
            bar.set_postfix(loss=f"{mean:.4g}", lr=f"{lr:.2e}")
        if step % self.loop.save_and_sample_every == 0 or step == self.loop.train_num_steps:
            self.validate_and_sample()
        if self.checkpointer.due(step):
            self.checkpointer.save()

    # ----- stopping ----------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        """Ask the run to stop at the next step boundary (safe from a signal handler: sets a flag)."""
        self._stop_reason = reason

    def stop_agreed(self) -> bool:
        """Whether any rank asked to stop; every rank gets the same answer at the same step.

        The flag travels over a CPU (gloo) group, so this never syncs the GPU stream.
        """
        return self.ranks.any(self._stop_reason is not None)

    def stop(self) -> tp.NoReturn:
        """Save (all ranks together) and raise :class:`StopRequested`."""
        step = self.state.step
        if self.checkpointer.last_saved_step != step:
            self.checkpointer.save()
        self.events.emit("stopped", stage=self.stage, step=step, reason=self._stop_reason or "another rank")
        logger.warning("%s: stop requested (%s); checkpoint of step %d committed",
                       self.stage, self._stop_reason or "by another rank", step)
        raise StopRequested(f"{self.stage} stopped at step {step} ({self._stop_reason or 'another rank'})")

    def to_device(self, batch: Batch) -> Batch:
        return {
            k: v.to(self.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    # ----- evaluation --------------------------------------------------------------
    def val_batches(self) -> list[Batch]:
        """This rank's share of the first ``val_batches`` validation batches."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        n = len(self.val_set)  # type: ignore[arg-type]
        indices = list(range(rank, n, world))[: self.loop.val_batches * self.batch_size]
        loader = DataLoader(Subset(self.val_set, indices), batch_size=self.batch_size,
                            num_workers=self.num_workers, generator=torch.Generator().manual_seed(0))
        return [self.to_device(b) for b in loader]

    def validate_and_sample(self) -> ValidationResult | None:
        """Validate with EMA weights (if any), log the result, write a sample grid."""
        self.sync_buffers()
        with self.ema_weights():
            self.model.eval()
            result = None
            if self.loop.val_batches > 0:
                result = evaluate(
                    self.val_batches(), self.predict,
                    lambda t: self.accelerator.reduce(t, "sum"), self.accelerator.device,
                )
                logger.info("%s step %d: %s", self.stage, self.state.step, result.describe())
                self.log.write(self.state.step, result.log_values())
            if self.accelerator.is_main_process:
                self.write_samples()
            self.model.train()
        self.accelerator.wait_for_everyone()
        return result

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, ``scale_factor``).

        DDP broadcasts buffers at the start of each forward, so after the last
        forward each rank holds statistics of its own batch; evaluation and saved
        state must not depend on which rank ran them.
        """
        if self.accelerator.num_processes > 1:
            for buffer in self.unwrapped.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def write_samples(self) -> None:
        n = min(self.loop.num_sample_images, len(self.val_set))  # type: ignore[arg-type]
        batch = self.to_device(
            torch.utils.data.default_collate([self.val_set[i] for i in range(n)])
        )
        path = self.results_folder / "samples" / f"step-{self.state.step:08d}.png"
        save_grid(path, self.sample_columns(batch))
        logger.info("%s step %d: samples written to %s", self.stage, self.state.step, path)

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """What the probe runs on: the first validation samples and fixed noise (CPU tensors).

        Stored in every checkpoint, so verifying it never depends on today's data or config.
        Two samples are enough for a fingerprint and keep the probe cheap at save and load.
        """
        if self._probe_inputs is None:
            n = min(PROBE_SAMPLES, len(self.val_set))  # type: ignore[arg-type]
            batch = torch.utils.data.default_collate([self.val_set[i] for i in range(n)])
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.stage, "probe"))
            self._probe_inputs = self.make_probe_inputs(batch, generator)
        return self._probe_inputs

    def probe_dtype(self) -> str:
        """The autocast dtype the probe really ran in (accelerate ignores fp16 on a CPU)."""
        if not self.accelerator.native_amp:
            return "float32"
        return {"fp16": "float16", "bf16": "bfloat16"}.get(self.accelerator.mixed_precision, "float32")

    def probe_value(self, inputs: tp.Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The probe of the current state on ``inputs``, in eval mode under the run's autocast."""
        module = self.unwrapped
        was_training = module.training
        module.eval()
        on_device = {k: v.to(self.accelerator.device) for k, v in inputs.items()}
        with torch.no_grad(), self.accelerator.autocast():
            value = self.probe_with(module, on_device).double()
        module.train(was_training)
        return value

    def sample_generator(self) -> torch.Generator:
        """A fresh generator for samples: never touches the training noise stream."""
        return torch.Generator(self.accelerator.device).manual_seed(
            derive_seed(self.seed, self.stage, "sample")
        )

    def ema_weights(self) -> tp.ContextManager[None]:
        return _SwapEMA(self.ema, self.params)

    def new_ema(self) -> EMAModel:
        """An EMA of the trainable parameters as they are now, with the loop's settings."""
        loop = self.loop
        return EMAModel(self.params, decay=loop.ema_decay, update_after_step=loop.ema_update_after_step)

    # ----- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, tp.Any]:
        """State shared by all ranks, under named keys (rank 0 saves it)."""
        state = {
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_state": self.state.state_dict(),
            "data": self.train_stream.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.accelerator.scaler is not None:
            state["grad_scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        """Restore shared state; loop settings (LR schedule, weight decay, EMA decay) come from the
        config of this run, so a changed setting applies from the restored step on."""
        self.unwrapped.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.state.load_state_dict(state["train_state"])
        self._load_data_position(state["data"])
        self._load_ema(state.get("ema"))
        self._load_scaler(state.get("grad_scaler"))
        self.apply_loop_settings()

    def apply_loop_settings(self) -> None:
        """Put this run's loop settings on the restored optimizer, schedule and EMA.

        The LR schedule is a function of (config, step), so it is rebuilt at the restored
        step rather than loaded: the same floats as an uninterrupted run when nothing changed.
        """
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.loop.lr
            group["weight_decay"] = self.loop.weight_decay
        optimizer = tp.cast(torch.optim.Optimizer, getattr(self.optimizer, "optimizer", self.optimizer))
        self.lr_schedule = LambdaLR(optimizer, warmup_cosine(self.loop), last_epoch=self.state.step - 1)
        if self.ema is not None:
            self.ema.decay = self.loop.ema_decay
            self.ema.update_after_step = self.loop.ema_update_after_step

    def _load_data_position(self, data: tp.Mapping[str, int]) -> None:
        if data["offset"] > self.train_stream.n:
            if self.accelerator.is_main_process:
                logger.warning("%s: the checkpoint's data position (epoch %d, %d samples in) lies beyond "
                               "the %d samples of this training set (the data changed since): continuing "
                               "with the next epoch", self.stage, data["epoch"], data["offset"],
                               self.train_stream.n)
            data = {"epoch": data["epoch"] + 1, "offset": 0}
        self.train_stream.load_state_dict(data)

    def _load_ema(self, saved: tp.Mapping[str, tp.Any] | None) -> None:
        main = self.accelerator.is_main_process
        if self.ema is None:
            if saved is not None and main:
                logger.warning("%s: trainer.use_ema is false: the checkpoint's EMA weights are not used "
                               "(they stay in that checkpoint)", self.stage)
            return
        if saved is None:
            self.ema = self.new_ema()
            if main:
                logger.warning("%s: the checkpoint has no EMA (saved with use_ema false); the EMA starts "
                               "from the restored weights", self.stage)
            return
        self.ema.load_state_dict(dict(saved))
        # load_state_dict keeps the tensors where they were read (the CPU); ema.step needs them
        # beside the parameters (a GPU resume would otherwise fail on its first step).
        self.ema.to(device=self.accelerator.device)

    def _load_scaler(self, saved: tp.Mapping[str, tp.Any] | None) -> None:
        scaler = self.accelerator.scaler
        if scaler is not None and saved is not None:
            scaler.load_state_dict(dict(saved))
        elif scaler is not None and self.accelerator.is_main_process:
            logger.warning("%s: the checkpoint has no fp16 loss scale; it starts afresh", self.stage)

    def rank_state_dict(self) -> dict[str, tp.Any]:
        """State of this rank only: its RNGs (the data position is shared, see ``state_dict``)."""
        return {"rng": capture_rng(self.accelerator.device), "noise_rng": self.noise.get_state()}

    def load_rank_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        restore_rng(state["rng"], self.accelerator.device)
        self.noise.set_state(state["noise_rng"])

    def reseed_rank(self, step: int) -> None:
        """Fresh per-rank random streams for a resume that cannot restore this rank's own
        (another number of processes or another device type), derived from seed, rank and step."""
        rank = self.accelerator.process_index
        set_seed(derive_seed(self.seed, self.stage, "global", rank, "resume", step) % 2**32)
        self.noise.manual_seed(derive_seed(self.seed, self.stage, "noise", rank, "resume", step))


def fresh_grad_scaler(used: torch.amp.GradScaler) -> torch.amp.GradScaler:
    """A GradScaler with ``used``'s settings and none of its history (a new stage's own loss scale)."""
    return torch.amp.GradScaler(
        used._device, init_scale=used._init_scale, growth_factor=used.get_growth_factor(),
        backoff_factor=used.get_backoff_factor(), growth_interval=used.get_growth_interval(),
        enabled=used.is_enabled(),
    )


class _SwapEMA:
    """Context manager: EMA weights in, online weights back out (even on error)."""

    def __init__(self, ema: EMAModel | None, params: list[nn.Parameter]) -> None:
        self.ema = ema
        self.params = params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc: object) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)
