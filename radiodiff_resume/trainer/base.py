"""The training loop. It reads top to bottom and holds no policy of its own: subclasses say what a
loss, a prediction and a sample grid are; the state it moves is a bundle of parts
(:mod:`~radiodiff_resume.trainer.parts`), the probe, the rollback policy and the validation pass live
in their own modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
import typing as tp
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from radiodiff_resume.checkpoint.checkpointer import Checkpointer
from radiodiff_resume.checkpoint.manifest import Manifest
from radiodiff_resume.checkpoint.protocol import ProbeOf
from radiodiff_resume.config import CheckpointConfig, Config, GuardConfig, LoopConfig, to_dict, to_yaml
from radiodiff_resume.data.stream import BatchStream
from radiodiff_resume.dist import Ranks
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.events import EventLog
from radiodiff_resume.guard.policy import Guard, StepOutcome, refuse_sharded
from radiodiff_resume.slurm.budget import CLOCK, StopBudget, ask_time_left
from radiodiff_resume.slurm.environment import job_id
from radiodiff_resume.slurm.signals import STOP, agreed_reason
from radiodiff_resume.trainer import samples
from radiodiff_resume.trainer.calibration import Calibration
from radiodiff_resume.trainer.ema import RadioDiffEMA, ema_weights
from radiodiff_resume.trainer.parts import Part, build_parts
from radiodiff_resume.trainer.probe import Probe
from radiodiff_resume.trainer.rollback import Rollback
from radiodiff_resume.trainer.runlog import LogInterval, RunLog
from radiodiff_resume.trainer.state import TrainState

logger = logging.getLogger(__name__)

Batch = dict[str, tp.Any]


class Trainer:
    """Accelerate-based loop: accumulation, mixed precision, EMA, validation, samples.

    Subclasses implement :meth:`training_loss`, :meth:`predict` and
    :meth:`sample_columns`, and may hook :meth:`on_fit_start` / :meth:`on_fit_end`.
    """

    stage = "train"
    # The parts the loop moves, by name (each one lives in ``self.parts``, which the checkpoint saves).
    model = Part[nn.Module]()
    optimizer = Part[torch.optim.Optimizer]()
    params = Part[list[nn.Parameter]]()
    lr_schedule = Part[LambdaLR]()
    ema = Part[RadioDiffEMA | None]()
    state = Part[TrainState]()
    train_stream = Part[BatchStream]()
    noise = Part[torch.Generator]()
    guard = Part[Guard]()

    def __init__(self, loop: LoopConfig, model: nn.Module, train_set: Dataset, val_set: Dataset, *,
                 accelerator: Accelerator, results_folder: Path, seed: int, batch_size: int,
                 num_workers: int = 0, checkpoint: CheckpointConfig | None = None,
                 config: Config | None = None, read_only: bool = False) -> None:
        refuse_sharded(accelerator, self.stage)
        self.loop = loop
        self.read_only = read_only
        """Writes nothing to the results folder (no metrics, events or checkpoint housekeeping): the
        dry-run builds the same trainer as the real resume."""
        self.accelerator = accelerator
        self.results_folder = Path(results_folder)
        self.seed = seed
        self.batch_size = batch_size
        self.run_config: dict[str, tp.Any] = to_dict(config) if config is not None else {}
        """The resolved config of the whole run; each checkpoint keeps a copy to diff against on resume."""
        self.config_yaml = to_yaml(config) if config is not None else "{}\n"
        self.config_hash = hashlib.sha256(self.config_yaml.encode()).hexdigest()[:16]
        self.val_set = val_set
        self.num_workers = num_workers
        writes = accelerator.is_main_process and not read_only
        self.log = RunLog(self.results_folder, accelerator, self.stage, enabled=writes)
        self.events = EventLog(self.results_folder / "events.jsonl", writes)
        self.ranks = Ranks(accelerator)
        self.parts = build_parts(
            self.stage, loop, model, self.trainable_module, accelerator=accelerator, seed=seed,
            train_set=train_set, batch_size=batch_size, num_workers=num_workers,
            guard=config.guard if config is not None else GuardConfig(), events=self.events, ranks=self.ranks)
        self.probe = Probe(accelerator, val_set, seed, self.stage, self.make_probe_inputs, self.probe_with)
        self.checkpointer = Checkpointer(self, checkpoint or CheckpointConfig(), self.events, self.ranks,
                                         read_only=read_only)
        self.rollback = Rollback(self.parts, self.checkpointer, self.events, batch_size, self.rolled_back)
        slurm = config.slurm if config is not None else None
        self.budget = StopBudget(self.stage, slurm.signal_lead_s if slurm else None,
                                 under_slurm=job_id() is not None,
                                 margin_s=slurm.stop_margin_s if slurm and not read_only else None)
        self.interval = LogInterval(accelerator.device)
        self.calibration = Calibration(self.parts, self.loss_with, self.to_device)

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
        return self.parts.unwrapped

    def fit(self) -> None:
        try:
            self._fit()
        except BaseException:
            self.checkpointer.settle_quietly()
            raise
        finally:
            self.train_stream.close()

    def _fit(self) -> None:
        total = self.loop.train_num_steps
        self.restore()
        logger.info("%s: training steps %d..%d", self.stage, self.state.step, total)
        bar = tqdm(
            total=total, initial=self.state.step, desc=self.stage, dynamic_ncols=True,
            disable=not self.accelerator.is_main_process,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        self.budget.time_left(ask_time_left(self.ranks, self.budget))
        if self.stop_agreed():  # a signal during start-up: the only separate agreement outside validations
            bar.close()
            self.stop()
        self.run_deferred_validation()
        while self.state.step < total:
            started = time.perf_counter()
            outcome = self.train_step()
            stop = outcome.stop
            if outcome.stepped:
                self.budget.step(time.perf_counter() - started)
                self.state.step += 1
                bar.update(1)
                stop = bool(self.after_step(outcome, bar)) or stop  # a subclass may return None
            elif self.guard.wants_rollback:
                self.roll_back(self.guard.skip_run(), spikes=self.guard.spike_driven)
                bar.n = self.state.step
                bar.refresh()
            if stop:
                bar.close()
                self.stop()
        bar.close()
        while self.checkpointer.last_saved_step != self.state.step:
            self.save_checkpoint(background=False)
        self.checkpointer.settle()  # the last checkpoint is committed before the run ends
        self.checkpointer.ended_cleanly()
        self.sync_buffers()
        self.on_fit_end()
        if self.state.step >= total:  # the report tells a finished run extended later from a crash
            self.events.emit("finished", stage=self.stage, step=self.state.step, train_num_steps=total)
        self.log.plot(self.results_folder / "curves.png")

    def restore(self, mode: str | None = None) -> Path | None:
        """Resume from the verified checkpoint (``mode`` as :meth:`Checkpointer.resume`), repair its
        running statistics, and make the model ready to train; the path, or None on a fresh start."""
        if self.guard.norm_stats:
            self.calibration.batches()
        path = self.checkpointer.resume(mode)
        if path is not None:
            self.check_state("after load", weights=False)
        self.model.train()
        self.on_fit_start()
        return path

    def train_step(self) -> StepOutcome:
        """One optimizer step over ``gradient_accumulate_every`` micro-batches, or a skipped one.

        The LR schedule, the EMA and the step counter (advanced by :meth:`fit`) move only when the
        optimizer really stepped; the data position moves either way.
        """
        for _ in range(self.loop.gradient_accumulate_every):
            batch = self.guard.check_batch(self.to_device(next(self.train_stream)))
            with self.accelerator.accumulate(self.model):
                loss = self.guard.check_loss(self.training_loss(batch))
                self.accelerator.backward(loss)
        outcome = self.guard.optimizer_step(self.optimizer, self.state.step + 1, self.wants_stop)
        self.optimizer.zero_grad(set_to_none=True)
        if outcome.stepped:
            self.lr_schedule.step()
            if self.ema is not None:
                self.ema.step(self.params)
        self.state.samples_seen += (
            self.batch_size * self.loop.gradient_accumulate_every * self.accelerator.num_processes
        )
        return outcome

    def after_step(self, outcome: StepOutcome, bar: tqdm) -> bool:
        """Logging, checks, validation and checkpoints on their schedules (host syncs only there).
        True when the ranks agreed to stop after this step: the stop saves, and a validation due here is
        deferred to the resume. The stop is agreed again just before a validation (a signal after the
        step's all-reduce still skips it) and just after one (a signal during it stops before the next
        step)."""
        step = self.state.step
        self.checkpointer.progressed(step, stop_seen=STOP.reason is not None)
        self.interval.add(outcome.loss, outcome.grad_norm)
        if step % self.loop.log_freq == 0 or step == self.loop.train_num_steps:
            self.write_log(step, bar)
        if step % (self.guard.cfg.norm_stats.check_every or self.loop.log_freq) == 0:
            if not self.check_state("interval"):
                return outcome.stop
        if self.validation_due(step):
            if outcome.stop or self.stop_agreed(validation_due=True):
                self.defer_validation(step)
                return True
            started = time.perf_counter()
            samples.validate_and_sample(self)
            self.budget.validated(time.perf_counter() - started)
            if self.stop_agreed():  # a signal during the validation: stop before the next step
                return True
        if self.checkpointer.due(step):
            self.save_checkpoint(background=True)
        return outcome.stop

    def validation_due(self, step: int) -> bool:
        return step % self.loop.save_and_sample_every == 0 or step == self.loop.train_num_steps

    def defer_validation(self, step: int) -> None:
        """A stop comes before the validation of ``step``: its checkpoint records the validation as due."""
        self.parts.validation_deferred = step
        self.events.emit("validation_deferred", stage=self.stage, step=step)
        logger.warning("%s step %d: the validation due here runs when the run resumes (stopping first)",
                       self.stage, step)

    def run_deferred_validation(self) -> None:
        """The validation a stop skipped at the restored step, before the first step of this run."""
        if self.parts.validation_deferred == self.state.step:
            logger.info("%s step %d: the validation deferred by the last stop", self.stage, self.state.step)
            started = time.perf_counter()
            samples.validate_and_sample(self)
            self.budget.validated(time.perf_counter() - started)
        self.parts.validation_deferred = None

    def write_log(self, step: int, bar: tqdm) -> None:
        means = self.interval.means(self.accelerator)
        mean, lr = means.pop("loss"), self.lr_schedule.get_last_lr()[0]
        values = {"loss": mean, "lr": lr, **means}
        self.interval.clear()
        guard = self.guard.log_values() if self.guard.enabled else {}
        self.log.write(step, {**values, **guard})
        shown = {k.removeprefix("guard/"): v for k, v in guard.items() if v}
        bar.set_postfix(loss=f"{mean:.4g}", lr=f"{lr:.2e}", **shown)

    def save_checkpoint(self, background: bool = False) -> None:
        """Check the state, then commit it; a state that fails the check is rolled back instead.
        ``background`` (with ``checkpoint.async_save``): training goes on once the state is copied;
        otherwise the checkpoint is committed when this returns.
        The job's clock learns the time from the start of the save to its commit either way."""
        if self.check_state("before save"):
            started = time.perf_counter()
            self.guard.saved()  # before the state is taken: the checkpoint records no rollback since itself
            self.checkpointer.save(background=background and self.checkpointer.cfg.async_save,
                                   done=lambda: self.budget.saved(time.perf_counter() - started))
            self.budget.time_left(ask_time_left(self.ranks, self.budget))  # the limit may have changed

    # ----- guards ------------------------------------------------------------------
    def check_state(self, when: str, weights: bool = True) -> bool:
        """Repair non-finite running statistics; roll back non-finite weights (``weights``).
        False when it rolled back. Every rank reaches the same answer: buffers are synced first
        and weights are identical on every rank."""
        if not self.guard.enabled:
            return True
        self.sync_buffers()
        if self.guard.repair_norm_stats(self.unwrapped, self.calibration.forward, when, self.state.step):
            self.sync_buffers()
        if weights and self.guard.nonfinite_weights():
            self.roll_back("non-finite weights")
            return False
        return True

    def roll_back(self, why: str, spikes: bool = False) -> None:
        """Go back to the newest verified checkpoint (the policy: :meth:`Rollback.roll_back`)."""
        self.rollback.roll_back(why, spikes)

    def rolled_back(self, step: int) -> None:
        """The steps since the checkpoint rolled back to (from ``step``) are gone from the log interval."""
        self.interval.clear()
        self.log.trackers.rolled_back(step, self.state.step)

    # ----- stopping ----------------------------------------------------------------
    def request_stop(self, reason: str = "requested") -> None:
        """Ask the run to stop at the next step boundary (the process-wide flag signals set)."""
        STOP.request(reason)

    def wants_stop(self, validation_due: bool | None = None) -> bool:
        """Whether this rank wants to stop after the step under way: a signal came, or the job's clock
        leaves no time for another step, the validation due after this one (``validation_due``; None:
        whether the next step has one) and a save (host arithmetic only, no sync)."""
        if validation_due is None:
            validation_due = self.validation_due(self.state.step + 1)
        if STOP.reason is None and self.budget.out_of_time(validation_due):
            STOP.request(CLOCK)
        return STOP.reason is not None or self.checkpointer.failed  # a failed background save: stop

    def stop_agreed(self, validation_due: bool = False) -> bool:
        """Whether any rank wants to stop; every rank gets the same answer at the same step.

        A separate collective (CPU, gloo: never syncs the GPU stream), asked only before the first step
        and around a validation; each step's own agreement rides on the guard's all-reduce.
        """
        return self.ranks.any(self.wants_stop(validation_due))

    def stop(self) -> tp.NoReturn:
        """Save (all ranks together, unless nothing was trained yet), clear the flag and raise
        :class:`StopRequested`."""
        self.checkpointer.settle()  # a background save that failed raises here, on every rank
        reason, rank = agreed_reason(self.ranks.gather(STOP.reason))
        step, seen = self.state.step, f"{reason} on rank {rank}" if self.ranks.world > 1 else reason
        self.checkpointer.progressed(step, stop_seen=True)  # a death while saving is not the checkpoint's
        if step > 0 and self.checkpointer.last_saved_step != step:
            self.save_checkpoint(background=False)
        self.checkpointer.ended_cleanly()
        STOP.clear()
        self.events.emit("stopped", stage=self.stage, step=step, reason=reason, rank=rank)
        saved = f"checkpoint of step {step} committed" if step else "nothing trained yet, nothing to save"
        logger.warning("%s: stop requested (%s); %s", self.stage, seen, saved)
        raise StopRequested(f"{self.stage} stopped at step {step} ({seen})", reason)

    def to_device(self, batch: Batch) -> Batch:
        return {
            k: v.to(self.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    # ----- evaluation (:mod:`~radiodiff_resume.trainer.samples`) -------------------
    def val_batches(self) -> list[Batch]:
        """This rank's share of the first ``val_batches`` validation batches."""
        return samples.val_batches(self)

    def write_samples(self) -> None:
        """The sample grid of this step (main process)."""
        samples.write_samples(self)

    def ema_weights(self) -> contextlib.AbstractContextManager[None]:
        """EMA weights in for the block, everything back out after (see :func:`ema.ema_weights`)."""
        return ema_weights(self.ema, self.params, self.guard, self.unwrapped, self.calibration.forward,
                           self.sync_buffers)

    # ----- what the checkpointer saves and verifies (:class:`Checkpointable`) -------
    def sync_buffers(self) -> None:
        self.parts.sync_buffers()

    def state_dict(self) -> dict[str, tp.Any]:
        return self.parts.state_dict()

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        self.parts.load_state_dict(state)

    def rank_state_dict(self) -> dict[str, tp.Any]:
        return self.parts.rank_state_dict()

    def load_rank_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        self.parts.load_rank_state_dict(state)

    def reseed_rank(self, step: int) -> None:
        self.parts.reseed_rank(step)

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        return self.probe.inputs()

    def probe_value(self, inputs: tp.Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.probe.value(self.unwrapped, inputs)

    def probe_later(self) -> ProbeOf:
        self.probe.twin(self.unwrapped)
        return self.probe.value_of

    def probe_dtype(self) -> str:
        return self.probe.dtype()
