"""What a trainer trains and carries across a restart: a bundle of parts, each one the owner of its
own ``state_dict`` (model, optimizer, EMA, LR schedule, counters, data position, guard, loss scale;
the RNGs per rank), composed into the checkpoint's named components as torchtitan composes its
checkpoint from its parts. The loop that moves them lives in :mod:`radiodiff_resume.trainer.base`.
"""

from __future__ import annotations

import logging
import typing as tp
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset

from radiodiff_resume.config import GuardConfig, LoopConfig
from radiodiff_resume.data.stream import BatchStream
from radiodiff_resume.dist import Ranks
from radiodiff_resume.events import EventLog
from radiodiff_resume.guard.policy import Guard
from radiodiff_resume.trainer.ema import RadioDiffEMA, new_ema
from radiodiff_resume.trainer.lr import lr_multiplier
from radiodiff_resume.trainer.state import TrainState, capture_rng, derive_seed, restore_rng

logger = logging.getLogger(__name__)

T = tp.TypeVar("T")


@dataclass
class Parts:
    """The state of one stage: the shared parts (saved by rank 0 under named keys) and each rank's
    own random streams (``noise`` and the global RNGs)."""

    stage: str
    seed: int
    loop: LoopConfig
    accelerator: Accelerator
    model: nn.Module
    """The prepared (DDP-wrapped when distributed) model."""
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    """The trainable parameters the optimizer and EMA see."""
    lr_schedule: LambdaLR
    ema: RadioDiffEMA | None
    train_stream: BatchStream
    noise: torch.Generator
    guard: Guard
    state: TrainState = field(default_factory=TrainState)
    validation_deferred: int | None = None
    """The step whose validation a stop skipped (kept in that step's checkpoint): it runs when the
    run resumes there, before the next step, so the run's metrics are those of an uninterrupted run."""

    @property
    def unwrapped(self) -> nn.Module:
        return tp.cast(nn.Module, self.accelerator.unwrap_model(self.model))

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, ``scale_factor``).

        DDP broadcasts buffers at the start of each forward, so after the last
        forward each rank holds statistics of its own batch; evaluation and saved
        state must not depend on which rank ran them.
        """
        if self.accelerator.num_processes > 1:
            for buffer in self.unwrapped.buffers():
                torch.distributed.broadcast(buffer, src=0)

    # ----- shared state ------------------------------------------------------------
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
        if self.guard.enabled:
            state["guard"] = self.guard.state_dict()
        if self.validation_deferred == self.state.step:  # in train_state: the format's own components
            state["train_state"]["validation_deferred"] = True
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
        self._load_guard(state.get("guard"))
        deferred = state["train_state"].get("validation_deferred")
        self.validation_deferred = self.state.step if deferred else None
        self.apply_loop_settings()

    def apply_loop_settings(self) -> None:
        """Put this run's loop settings on the restored optimizer, schedule and EMA.

        The LR schedule is a function of (config, step), so it is rebuilt at the restored
        step rather than loaded: the same floats as an uninterrupted run when nothing changed.
        """
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.loop.lr * self.guard.lr_scale
            group["weight_decay"] = self.loop.weight_decay
        optimizer = tp.cast(torch.optim.Optimizer, getattr(self.optimizer, "optimizer", self.optimizer))
        self.lr_schedule = LambdaLR(optimizer, lr_multiplier(self.loop), last_epoch=self.state.step - 1)
        if self.ema is not None:
            self.ema.decay = self.loop.ema_decay
            self.ema.update_after_step = self.loop.ema_update_after_step
            self.ema.update_every = self.loop.ema_update_every

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
            self.ema = new_ema(self.params, self.loop, self.stage)
            if main:
                logger.warning("%s: the checkpoint has no EMA (saved with use_ema false); the EMA starts "
                               "from the restored weights", self.stage)
        else:
            self.ema.load_state_dict(dict(saved))
            # load_state_dict keeps the tensors where they were read (the CPU); ema.step needs them
            # beside the parameters (a GPU resume would otherwise fail on its first step).
            self.ema.to(device=self.accelerator.device)
        # It counts optimizer steps (checkpoints written before this counted EMA updates).
        self.ema.optimization_step = self.state.step

    def _load_guard(self, saved: tp.Mapping[str, tp.Any] | None) -> None:
        if saved is not None:
            self.guard.load_state_dict(saved)
        elif self.guard.enabled and self.accelerator.is_main_process:
            logger.warning("%s: the checkpoint has no guard state (saved before guards, or with them off): "
                           "loss and gradient-norm statistics start afresh", self.stage)

    def _load_scaler(self, saved: tp.Mapping[str, tp.Any] | None) -> None:
        scaler = self.accelerator.scaler
        if scaler is not None and saved is not None:
            scaler.load_state_dict(dict(saved))
        elif scaler is not None and self.accelerator.is_main_process:
            logger.warning("%s: the checkpoint has no fp16 loss scale; it starts afresh", self.stage)

    # ----- this rank's state -------------------------------------------------------
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


def build_parts(stage: str, loop: LoopConfig, model: nn.Module,
                trainable_module: tp.Callable[[nn.Module], nn.Module], *, accelerator: Accelerator, seed: int,
                train_set: Dataset, batch_size: int, num_workers: int, guard: GuardConfig, events: EventLog,
                ranks: Ranks) -> Parts:
    """A fresh stage's parts: ``model`` on the device and prepared, AdamW over the trainable
    parameters of ``trainable_module(model)``, this stage's own loss scale and random streams."""
    accelerator.gradient_accumulation_steps = loop.gradient_accumulate_every
    if accelerator.scaler is not None:
        # Each stage starts with its own loss scale; the optimizer wrapper takes this object in prepare.
        accelerator.scaler = fresh_grad_scaler(accelerator.scaler)
    model.to(accelerator.device)
    params = [p for p in trainable_module(model).parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=loop.lr, weight_decay=loop.weight_decay)
    lr_schedule = LambdaLR(optimizer, lr_multiplier(loop))
    model, optimizer = accelerator.prepare(model, optimizer)
    # After prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts equal.
    ema = new_ema(params, loop, stage) if loop.use_ema else None
    rank, world = accelerator.process_index, accelerator.num_processes
    # Runtime randomness (e.g. dropout) differs per rank; model init above did not.
    set_seed(derive_seed(seed, stage, "global", rank) % 2**32)
    stream = BatchStream(train_set, batch_size, rank, world, seed, num_workers)
    noise = torch.Generator(accelerator.device).manual_seed(derive_seed(seed, stage, "noise", rank))
    checks = Guard(guard, accelerator=accelerator, module=tp.cast(nn.Module, accelerator.unwrap_model(model)),
                   params=params, max_grad_norm=loop.max_grad_norm, events=events, ranks=ranks, stage=stage)
    return Parts(stage, seed, loop, accelerator, model, optimizer, params, lr_schedule, ema, stream, noise,
                 checks)


def fresh_grad_scaler(used: torch.amp.GradScaler) -> torch.amp.GradScaler:
    """A GradScaler with ``used``'s settings and none of its history (a new stage's own loss scale)."""
    return torch.amp.GradScaler(
        used._device, init_scale=used._init_scale, growth_factor=used.get_growth_factor(),
        backoff_factor=used.get_backoff_factor(), growth_interval=used.get_growth_interval(),
        enabled=used.is_enabled(),
    )


class Part(tp.Generic[T]):
    """A trainer attribute that is one of its parts: reads and writes go to ``owner.parts``, so the
    loop, the subclasses and the tools hold the very object the checkpoint saves (even one a load
    replaced, such as the EMA or the LR schedule)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, owner: tp.Any, kind: type | None = None) -> T:
        if owner is None:  # looked up on the class: the descriptor itself, as a property is
            return tp.cast(T, self)
        return tp.cast(T, getattr(owner.parts, self.name))

    def __set__(self, owner: tp.Any, value: T) -> None:
        setattr(owner.parts, self.name, value)
