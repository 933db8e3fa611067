"""The training loop. It reads top to bottom and holds no policy of its own:
subclasses say what a loss, a prediction and a sample grid are.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import time
import typing as tp
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from radiodiff_resume.checkpoint.checkpointer import Checkpointer
from radiodiff_resume.checkpoint.manifest import Manifest, parse_step
from radiodiff_resume.config import CheckpointConfig, Config, GuardConfig, LoopConfig, to_dict, to_yaml
from radiodiff_resume.data.stream import BatchStream
from radiodiff_resume.dist import Ranks
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.events import EventLog
from radiodiff_resume.guard.policy import Guard, GuardHalt, StepOutcome, refuse_sharded
from radiodiff_resume.guard.sanitize import finite_batch
from radiodiff_resume.images import save_grid
from radiodiff_resume.slurm.budget import CLOCK, StopBudget, ask_time_left
from radiodiff_resume.slurm.environment import job_id
from radiodiff_resume.slurm.signals import STOP, agreed_reason
from radiodiff_resume.trainer.ema import RadioDiffEMA, first_average
from radiodiff_resume.trainer.lr import lr_multiplier
from radiodiff_resume.trainer.runlog import RunLog
from radiodiff_resume.trainer.state import TrainState, capture_rng, derive_seed, restore_rng
from radiodiff_resume.trainer.validation import ValidationResult, evaluate

logger = logging.getLogger(__name__)

Batch = dict[str, tp.Any]
PROBE_SAMPLES = 2


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
        read_only: bool = False,
    ) -> None:
        refuse_sharded(accelerator, self.stage)
        self.loop = loop
        self.read_only = read_only
        """Writes nothing to the results folder (no metrics, events or checkpoint housekeeping): the
        dry-run builds the same trainer as the real resume."""
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
        self.lr_schedule = LambdaLR(optimizer, lr_multiplier(loop))
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
        writes = accelerator.is_main_process and not read_only
        self.log = RunLog(self.results_folder, accelerator, self.stage, enabled=writes)
        self.events = EventLog(self.results_folder / "events.jsonl", writes)
        self.ranks = Ranks(accelerator)
        self.checkpointer = Checkpointer(self, checkpoint or CheckpointConfig(), self.events, self.ranks,
                                         read_only=read_only)
        self.guard = Guard(
            config.guard if config is not None else GuardConfig(), accelerator=accelerator,
            module=self.unwrapped, params=self.params, max_grad_norm=loop.max_grad_norm,
            events=self.events, ranks=self.ranks, stage=self.stage,
        )
        slurm = config.slurm if config is not None else None
        self.budget = StopBudget(self.stage, slurm.signal_lead_s if slurm else None,
                                 under_slurm=job_id() is not None,
                                 margin_s=slurm.stop_margin_s if slurm and not read_only else None)
        self.validation_deferred: int | None = None
        """The step whose validation a stop skipped (kept in that step's checkpoint): it runs when the
        run resumes there, before the next step, so the run's metrics are those of an uninterrupted run."""
        self._loss_sum = torch.zeros((), device=accelerator.device)
        self._loss_count = 0
        self._grad_norms: list[float] = []
        self._probe_inputs: dict[str, torch.Tensor] | None = None
        self._calibration: list[Batch] | None = None

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
        try:
            self._fit()
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
            self.save_checkpoint()
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
            self.calibration_batches()
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
        self._loss_sum += outcome.loss
        self._loss_count += 1
        if outcome.grad_norm is not None and math.isfinite(outcome.grad_norm):
            self._grad_norms.append(outcome.grad_norm)
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
            self.validate_and_sample()
            self.budget.validated(time.perf_counter() - started)
            if self.stop_agreed():  # a signal during the validation: stop before the next step
                return True
        if self.checkpointer.due(step):
            self.save_checkpoint()
        return outcome.stop

    def validation_due(self, step: int) -> bool:
        return step % self.loop.save_and_sample_every == 0 or step == self.loop.train_num_steps

    def defer_validation(self, step: int) -> None:
        """A stop comes before the validation of ``step``: its checkpoint records the validation as due."""
        self.validation_deferred = step
        self.events.emit("validation_deferred", stage=self.stage, step=step)
        logger.warning("%s step %d: the validation due here runs when the run resumes (stopping first)",
                       self.stage, step)

    def run_deferred_validation(self) -> None:
        """The validation a stop skipped at the restored step, before the first step of this run."""
        if self.validation_deferred == self.state.step:
            logger.info("%s step %d: the validation deferred by the last stop", self.stage, self.state.step)
            started = time.perf_counter()
            self.validate_and_sample()
            self.budget.validated(time.perf_counter() - started)
        self.validation_deferred = None

    def write_log(self, step: int, bar: tqdm) -> None:
        mean = self.accelerator.reduce(self._loss_sum / self._loss_count, "mean").item()
        lr = self.lr_schedule.get_last_lr()[0]
        values: dict[str, float | int] = {"loss": mean, "lr": lr}
        if self._grad_norms:
            values["grad_norm"] = sum(self._grad_norms) / len(self._grad_norms)
        self.new_log_interval()
        guard = self.guard.log_values() if self.guard.enabled else {}
        self.log.write(step, {**values, **guard})
        shown = {k.removeprefix("guard/"): v for k, v in guard.items() if v}
        bar.set_postfix(loss=f"{mean:.4g}", lr=f"{lr:.2e}", **shown)

    def new_log_interval(self) -> None:
        """Empty the loss and grad-norm sums of the log interval (after a log line, and after a rollback
        discarded the steps they hold)."""
        self._loss_sum.zero_()
        self._loss_count = 0
        self._grad_norms.clear()

    def save_checkpoint(self) -> None:
        """Check the state, then commit it; a state that fails the check is rolled back instead."""
        if self.check_state("before save"):
            started = time.perf_counter()
            self.guard.saved()  # before the state is taken: the checkpoint records no rollback since itself
            self.checkpointer.save()
            self.budget.saved(time.perf_counter() - started)
            self.budget.time_left(ask_time_left(self.ranks, self.budget))  # the limit may have changed

    # ----- guards ------------------------------------------------------------------
    def check_state(self, when: str, weights: bool = True) -> bool:
        """Repair non-finite running statistics; roll back non-finite weights (``weights``).
        False when it rolled back. Every rank reaches the same answer: buffers are synced first
        and weights are identical on every rank."""
        if not self.guard.enabled:
            return True
        self.sync_buffers()
        if self.guard.repair_norm_stats(self.unwrapped, self.calibration_forward, when, self.state.step):
            self.sync_buffers()
        if weights and self.guard.nonfinite_weights():
            self.roll_back("non-finite weights")
            return False
        return True

    def calibration_forward(self) -> None:
        """Forward passes over this rank's first ``recalibrate_batches`` training batches of epoch 0
        (the data stream and the run's random streams are not touched)."""
        generator = torch.Generator(self.accelerator.device).manual_seed(
            derive_seed(self.seed, self.stage, "calibrate", self.accelerator.process_index))
        with torch.no_grad(), self.accelerator.autocast():
            for batch in self.calibration_batches():
                self.loss_with(self.unwrapped, self.to_device(batch), generator)

    def calibration_batches(self) -> list[Batch]:
        """The batches running statistics are recomputed over, NaN/Inf set to 0; read once, and by
        :meth:`fit` before training, so that during training the data is read only by the stream."""
        if self._calibration is None:
            dataset, count = self.train_stream.dataset, self.guard.cfg.norm_stats.recalibrate_batches
            self._calibration = [
                finite_batch(torch.utils.data.default_collate([dataset[i] for i in indices]),
                             self.guard.cfg.max_abs_input)[0]
                for indices in self.train_stream.rank_batches(0)[:count]]
        return self._calibration

    def roll_back(self, why: str, spikes: bool = False) -> None:
        """Reload the newest verified checkpoint (nothing is quarantined for this) and go on past
        the data that led here. A checkpoint rolled back to that leads straight back here (nothing
        committed since) is not good: the next rollback goes to an older one. After ``max_rollbacks``
        without a new checkpoint, or with none older left, stop, naming the checkpoint still believed
        good (or saying that none is). ``spikes``: every skip that led here was a loss spike."""
        guard, step = self.guard, self.state.step
        led_back = list(guard.rolled_back_to)
        older_than = parse_step(led_back[-1].name) if led_back else None
        good = self.checkpointer.newest(older_than)
        if good is None or not guard.may_roll_back():
            self.halt(why, good, led_back, spikes)
        data, rank_state, carried = self.train_stream.state_dict(), self.rank_state_dict(), guard.carried()
        consumed = self.state.samples_seen
        path = tp.cast(Path, self.checkpointer.resume(mode="auto", rollback=True, older_than=older_than))
        guard.rolled_back(carried, path)
        skip = guard.cfg.rollback.skip_batches
        if skip is None:
            self.train_stream.load_state_dict(data)
        else:
            for _ in range(skip):
                next(self.train_stream)
            consumed += skip * self.batch_size * self.accelerator.num_processes
        self.state.samples_seen = consumed  # samples consumed, rolled back or not: never behind the data
        self.load_rank_state_dict(rank_state)
        self.apply_loop_settings()
        self.new_log_interval()
        self.log.trackers.rolled_back(step, self.state.step)
        self.events.emit("rolled_back", stage=self.stage, step=step, to_step=self.state.step, path=str(path),
                         reason=why, lr_scale=guard.lr_scale, skipped_batches="all since" if skip is None
                         else skip)
        logger.warning("%s step %d: %s: rolled back to %s (step %d%s), %s, LR x%g", self.stage, step, why,
                       path, self.state.step, f"; {led_back[-1].name} led straight back here" if led_back
                       else "", "continuing with the data that comes next" if skip is None
                       else f"skipping {skip} batch(es) past it", guard.lr_scale)

    def halt(self, why: str, good: Path | None, led_back: list[Path], spikes: bool = False) -> tp.NoReturn:
        """Stop the run for good (exit 4): why, which checkpoints rolled back to led straight back
        here, the newest one not proven bad (``good``), if any, and advice that fits (``spikes``: the
        skips were all loss spikes)."""
        if good is None and not led_back:
            cause, last = "there is nothing to roll back to", "no checkpoint was committed yet"
        else:
            cause = f"{self.guard.rollbacks_since_save} rollback(s) since the last checkpoint did not help"
            if led_back:
                cause += f" (rolling back to {', '.join(p.name for p in led_back)} led straight back to this)"
            last = (f"the last good checkpoint is {good}" if good is not None
                    else f"no checkpoint is believed good (none is older than {led_back[-1].name})")
        self.events.emit("halted", stage=self.stage, step=self.state.step, reason=why,
                         last_good=None if good is None else str(good), led_back=[str(p) for p in led_back])
        advice = (self.guard.spike_advice() if spikes
                  else "lower trainer.lr, try trainer.mixed_precision=bf16 or check the data")
        raise GuardHalt(
            f"{self.stage} step {self.state.step}: {why}, and {cause}; {last}. Look at {self.events.path} "
            f"for what was skipped; {advice}, then run the same command to resume.")

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
        return STOP.reason is not None

    def stop_agreed(self, validation_due: bool = False) -> bool:
        """Whether any rank wants to stop; every rank gets the same answer at the same step.

        A separate collective (CPU, gloo: never syncs the GPU stream), asked only before the first step
        and around a validation; each step's own agreement rides on the guard's all-reduce.
        """
        return self.ranks.any(self.wants_stop(validation_due))

    def stop(self) -> tp.NoReturn:
        """Save (all ranks together, unless nothing was trained yet), clear the flag and raise
        :class:`StopRequested`."""
        reason, rank = agreed_reason(self.ranks.gather(STOP.reason))
        step, seen = self.state.step, f"{reason} on rank {rank}" if self.ranks.world > 1 else reason
        self.checkpointer.progressed(step, stop_seen=True)  # a death while saving is not the checkpoint's
        if step > 0 and self.checkpointer.last_saved_step != step:
            self.save_checkpoint()
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

    # ----- evaluation --------------------------------------------------------------
    def val_batches(self) -> list[Batch]:
        """This rank's share of the first ``val_batches`` validation batches."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        n = len(self.val_set)  # type: ignore[arg-type]
        indices = list(range(rank, n, world))[: self.loop.val_batches * self.batch_size]
        loader = DataLoader(Subset(self.val_set, indices), batch_size=self.batch_size,
                            num_workers=self.num_workers, worker_init_fn=STOP.worker_init_fn(),
                            generator=torch.Generator().manual_seed(0))
        return [self.to_device(b) for b in loader]

    def validate_and_sample(self) -> ValidationResult | None:
        """Validate with EMA weights (if any), log the result, write a sample grid."""
        self.check_state("before validation", weights=False)
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
        batch = finite_batch(self.to_device(
            torch.utils.data.default_collate(self._finite_val_samples(self.loop.num_sample_images))
        ))[0]
        path = self.results_folder / "samples" / f"step-{self.state.step:08d}.png"
        save_grid(path, self.sample_columns(batch))
        logger.info("%s step %d: samples written to %s", self.stage, self.state.step, path)

    def probe_inputs(self) -> dict[str, torch.Tensor]:
        """What the probe runs on: the first validation samples and fixed noise (CPU tensors).

        Stored in every checkpoint, so verifying it never depends on today's data or config.
        Two samples are enough for a fingerprint and keep the probe cheap at save and load.
        """
        if self._probe_inputs is None:
            batch = finite_batch(torch.utils.data.default_collate(self._finite_val_samples(PROBE_SAMPLES)))[0]
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.stage, "probe"))
            self._probe_inputs = self.make_probe_inputs(batch, generator)
        return self._probe_inputs

    def _finite_val_samples(self, n: int) -> list[dict[str, tp.Any]]:
        """The first ``n`` validation samples without NaN/Inf (the first ``n`` if there are not enough)."""
        size = len(self.val_set)  # type: ignore[arg-type]
        chosen = []
        for i in range(size):
            item = self.val_set[i]
            floats = [v for v in item.values() if torch.is_tensor(v) and v.is_floating_point()]
            if all(torch.isfinite(v).all() for v in floats):
                chosen.append(item)
            if len(chosen) == n:
                return chosen
        return [self.val_set[i] for i in range(min(n, size))]

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

    @contextlib.contextmanager
    def ema_weights(self) -> tp.Iterator[None]:
        """EMA weights in (with running statistics recomputed for them, when the model has any and
        ``guard.norm_stats.ema_statistics``), everything back out after, even on error.
        Every rank must enter it together (the statistics are synced)."""
        if self.ema is None:
            yield
            return
        stats = self.guard.norm_stats
        own = stats and self.guard.cfg.norm_stats.ema_statistics
        saved = stats.snapshot() if own else None
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            if own:
                stats.recompute(self.unwrapped, [n for n, _ in stats.modules], self.calibration_forward)
                self.sync_buffers()
            yield
        finally:
            self.ema.restore(self.params)
            if saved is not None:
                stats.restore(saved)

    def new_ema(self) -> RadioDiffEMA:
        """An EMA of the trainable parameters as they are now, with the loop's settings."""
        loop = self.loop
        first = first_average(loop.ema_update_after_step, loop.ema_update_every)
        if first > loop.train_num_steps:
            logger.warning(
                "%s: with ema_update_after_step=%d and ema_update_every=%d the EMA first averages after step "
                "%d, beyond train_num_steps=%d: the EMA weights will be a copy of the online weights",
                self.stage, loop.ema_update_after_step, loop.ema_update_every, first, loop.train_num_steps)
        return RadioDiffEMA(self.params, decay=loop.ema_decay, update_after_step=loop.ema_update_after_step,
                            update_every=loop.ema_update_every)

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
            self.ema = self.new_ema()
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
