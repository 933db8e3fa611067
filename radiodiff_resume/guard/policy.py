"""What the training loop asks before and after each forward, and at each optimizer step.

Per optimizer step the guard reads exactly one small vector back to the host (micro-batches
kept, non-finite losses, spike flag, gradient norm, clip threshold, loss, the ranks' stop flag):
every decision is computed on the device first and taken from that one read. The fault paths
(naming bad samples, scrubbing) may read more; a clean step never does.

Per optimizer step the ranks meet in exactly one collective: the all-reduce of the micro-batch
counts, which also carries each rank's wish to stop (a signal, or the job's clock), so the stop is
agreed at the same step on every rank without a round-trip of its own.

Skip means skip: no optimizer step (so no Adam moment decay and no weight decay), no LR
schedule, EMA or step-counter advance, running statistics put back; under fp16 the
GradScaler has unscaled first, so it still sees an overflow and backs off.

Sharded training (FSDP, DeepSpeed, Megatron-LM) is refused: each rank would hold a shard of the
gradients and judge it as the whole.
"""

from __future__ import annotations

import logging
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from radiodiff_resume.config import GuardConfig
from radiodiff_resume.dist import Ranks
from radiodiff_resume.errors import HaltError, UserError
from radiodiff_resume.events import EventLog
from radiodiff_resume.guard.clipping import Clipper, grads_of, scale_grads, scrub_grads, total_norm
from radiodiff_resume.guard.norm_stats import NormStats, apply_stability_settings
from radiodiff_resume.guard.sanitize import CLEAN, NONFINITE, TOO_LARGE, checked_batch
from radiodiff_resume.guard.spike import LossWindow

logger = logging.getLogger(__name__)

COUNTERS = ("batches_skipped", "steps_skipped", "grads_scrubbed", "grads_clipped", "adaptive_clips",
            "bn_repaired", "rollbacks")
"""Cumulative counts of guard actions, kept in the train state and logged."""

ROUTINE_SCALE = 1.0
"""Non-finite gradients at an fp16 loss scale above this may be the scale's own doing (GradScaler backs
off: a routine skip); at or below it the unscaled gradients themselves do not fit."""

SHARDED = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
           DistributedType.MEGATRON_LM: "Megatron-LM"}
"""accelerate's set-ups that shard gradients across processes."""


def refuse_sharded(accelerator: Accelerator, stage: str) -> None:
    """Raise :class:`UserError` when ``accelerator`` shards gradients: the guards take one norm over,
    scrub and clip whole gradients on every rank, and would judge a shard as the whole."""
    name = SHARDED.get(accelerator.distributed_type)
    if name is not None:
        raise UserError(f"{stage}: accelerate is set up for {name}, which shards gradients across processes; "
                        "the numerical guards need whole gradients on every rank: use DDP (`accelerate "
                        f"launch --multi_gpu`, or `accelerate config` without {name})")


class GuardHalt(HaltError):
    """Guards could not keep the run healthy (rollbacks exhausted, nothing to roll back to)."""


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    stepped: bool
    loss: torch.Tensor
    """Mean loss of the micro-batches that counted (0-dim, on the device)."""
    grad_norm: float | None
    """Total gradient norm before clipping (None when the guards are off: never read)."""
    stop: bool = False
    """Some rank wants to stop after this step (agreed: the same on every rank)."""
    reason: str | None = None
    """Why the step was skipped: ``batch``, ``loss``, ``spike``, ``grads`` or ``scaler`` (a routine fp16
    loss-scale overflow)."""


class Guard:
    """Numerical guards of one trainer; see the module docstring."""

    def __init__(self, cfg: GuardConfig, *, accelerator: Accelerator, module: nn.Module,
                 params: list[nn.Parameter], max_grad_norm: float | None, events: EventLog,
                 ranks: Ranks, stage: str) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.accelerator = accelerator
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.events = events
        self.ranks = ranks
        self.stage = stage
        device = accelerator.device
        self.device = device
        changed = apply_stability_settings(module, cfg.norm_stats.momentum, cfg.norm_stats.eps)
        if changed:
            logger.info("%s: guard.norm_stats momentum=%s eps=%s set on %d BatchNorm layer(s)", stage,
                        cfg.norm_stats.momentum, cfg.norm_stats.eps, changed)
        self.norm_stats = NormStats(module)
        self.clipper = Clipper(cfg.clip, max_grad_norm, device)
        self.losses = LossWindow(cfg.loss, device)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.consecutive_skips = 0
        """Skipped steps in a row (routine loss-scale overflows not counted)."""
        self.spike_skips = 0
        """How many of those were loss spikes."""
        self.rollbacks_since_save = 0
        self.rolled_back_to: list[Path] = []
        """The checkpoints rolled back to since the last commit, oldest last. Each one but the last led
        straight back to a state that had to be rolled back again (nothing was committed in between),
        so none of them is believed good; live only (a restart starts with none)."""
        self.lr_scale = 1.0
        self._step_snapshot: list[torch.Tensor] | None = None
        self._rejected: torch.Tensor | None = None
        self._micro_snapshot: list[torch.Tensor] | None = None
        self._agc_units = torch.zeros((), dtype=torch.int64, device=device)
        self._begin()

    # ----- micro-steps -------------------------------------------------------------
    def _begin(self) -> None:
        zero = torch.zeros((), device=self.device)
        self._kept, self._loss_sum, self._loss_bad = zero.clone(), zero.clone(), zero.clone()
        self._micro = 0
        self._sample_codes: list[torch.Tensor] = []
        self._names: list[tp.Any] = []
        self._batch_ok = torch.ones((), dtype=torch.bool, device=self.device)
        self._losses: list[torch.Tensor] = []

    def check_batch(self, batch: dict[str, tp.Any]) -> dict[str, tp.Any]:
        """The batch with NaN/Inf and values beyond ``max_abs_input`` replaced by 0 (so the forward stays
        finite); whether it was clean is remembered for :meth:`check_loss`. Snapshots the running
        statistics."""
        if not self.enabled:
            return batch
        self._put_back_stats()
        if self.norm_stats:
            if self._micro == 0:
                self._step_snapshot = self.norm_stats.snapshot(self._step_snapshot)
            else:
                self._micro_snapshot = self.norm_stats.snapshot(self._micro_snapshot)
        self._micro += 1
        clean, codes = checked_batch(batch, self.cfg.max_abs_input)
        if codes is None:
            return clean
        self._sample_codes.append(codes)
        self._names.append(batch.get("name"))
        self._batch_ok = (codes == CLEAN).all()
        return clean

    def check_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` masked to zero when its batch was bad or it is not finite: backward still runs
        on every rank (DDP cannot hang) and a rejected micro-batch adds exactly zero gradient."""
        if not self.enabled:
            self._losses.append(loss.detach())
            return loss
        finite = torch.isfinite(loss)
        use = self._batch_ok & finite
        self._kept += use
        self._loss_bad += self._batch_ok & ~finite
        self._loss_sum += torch.where(use, loss.detach().float(), 0.0)
        if self.norm_stats:
            # Put back after backward (BatchNorm's backward checks its buffers were not modified).
            self._rejected = ~use
        self._batch_ok = torch.ones((), dtype=torch.bool, device=self.device)
        return torch.where(use, loss, torch.zeros_like(loss))

    def _put_back_stats(self, agreed: torch.Tensor | None = None) -> None:
        """The statistics from before the last micro-batch, where that micro-batch was rejected on any
        rank (``agreed``: that flag, already reduced; else one small all-reduce here). Every rank
        decides alike, so statistics that ranks share (SyncBatchNorm) never keep a rejected batch."""
        if self._rejected is None:
            return
        if agreed is None:
            agreed = self._rejected
            if self.ranks.world > 1:
                flag = agreed.float()
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # device collective
                agreed = flag > 0
        snapshot = self._step_snapshot if self._micro == 1 else self._micro_snapshot
        self.norm_stats.restore_where(agreed, tp.cast(list, snapshot))
        self._rejected = None

    # ----- the optimizer step ------------------------------------------------------
    def optimizer_step(self, optimizer: torch.optim.Optimizer, step: int,
                       wants_stop: tp.Callable[[], bool] = lambda: False) -> StepOutcome:
        """Decide, clip and step (or skip) once the micro-batches' gradients are in. ``wants_stop``:
        this rank's wish to stop after this step, asked just before the ranks meet; the outcome's
        ``stop`` is the agreed answer."""
        try:
            if not self.enabled:
                return self._plain_step(optimizer, wants_stop)
            return self._guarded_step(optimizer, step, wants_stop)
        finally:
            self._begin()

    def _plain_step(self, optimizer: torch.optim.Optimizer, wants_stop: tp.Callable[[], bool]) -> StepOutcome:
        """The loop without guards: clip to ``max_grad_norm`` and step through accelerate; the stop is
        agreed in a collective of its own (CPU, gloo), as there is no guard reduce to carry it."""
        if self.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        optimizer.step()
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        return StepOutcome(not skipped, torch.stack(self._losses).mean(), None, self.ranks.any(wants_stop()),
                           "scaler" if skipped else None)

    def _guarded_step(self, optimizer: torch.optim.Optimizer, step: int,
                      wants_stop: tp.Callable[[], bool]) -> StepOutcome:
        inner = tp.cast(torch.optim.Optimizer, getattr(optimizer, "optimizer", optimizer))
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.unscale_(inner)  # records found_inf: the scaler sees an overflow before any scrub
        kept, loss_sum, loss_bad, stop = self._reduce_micro_batches(wants_stop())
        micro_total = self.ranks.world * self._micro
        loss = loss_sum / kept.clamp_min(1)
        spike = self.losses.is_spike(loss)
        factor = micro_total / kept.clamp_min(1)  # the mean over kept micro-batches; 1.0 when all kept
        grads = grads_of(self.params)
        norm = total_norm(grads).to(self.device) * factor
        threshold = self.clipper.threshold(norm)
        read = [kept, loss_bad, spike.float(), norm, threshold, loss, stop]
        scale_t = None if scaler is None else scaler._get_scale_async()  # the loss scale this step ran with
        if scale_t is not None:
            read.append(scale_t.to(self.device))
        verdict = torch.stack(read).tolist()  # the one sync
        kept_n, bad_losses, is_spike, norm_v, threshold_v, loss_v, stop_v, *scale = verdict
        rejected = micro_total - int(kept_n) - int(bad_losses)
        if rejected:
            self._report_batches(step, rejected)
        reason = self._skip_reason(bad_losses, loss_v, kept_n, is_spike, norm_v, scale[0] if scale else None)
        if reason is not None:
            outcome = self._skip(step, reason, loss, norm_v, loss_v if kept_n else None, scaler, stop_v > 0)
            self._spike_run(step, reason, loss_v, math.isfinite(norm_v) and norm_v <= threshold_v)
            return outcome
        if not math.isfinite(norm_v):  # guard.nonfinite_grads=scrub
            norm, threshold = self._scrub(grads, factor, step)
            norm_v, threshold_v = torch.stack([norm, threshold]).tolist()  # the fault path reads again
        scale_grads(grads, self.clipper.coefficient(norm, threshold) * factor)
        if self.cfg.clip.mode == "agc":
            self._agc_units += self.clipper.apply_agc(self.params)
        self._note_clip(step, norm_v, threshold_v)
        self.clipper.observe(torch.minimum(norm, threshold))
        self.losses.accept(loss)
        inner.step()
        if scaler is not None:
            scaler.update()
        self.consecutive_skips = self.spike_skips = 0
        return StepOutcome(True, loss, norm_v, stop_v > 0)

    def _reduce_micro_batches(self, stop: bool) -> tuple[torch.Tensor, ...]:
        """Kept micro-batches, the sum of their losses, the non-finite losses and the ranks wanting to
        stop (``stop``: this one), over all ranks (one small all-reduce, a device collective, not a host
        sync); the last micro-batch's running statistics put back where it was rejected on any rank (the
        flag rides on the same reduce). ``torch.full`` puts the host flag in a kernel argument: no copy."""
        last = torch.zeros((), device=self.device) if self._rejected is None else self._rejected.float()
        wants = torch.full((), float(stop), device=self.device)
        stats = torch.stack([self._kept, self._loss_sum, self._loss_bad, last, wants])
        if self.ranks.world > 1:
            torch.distributed.all_reduce(stats)
        kept, loss_sum, loss_bad, rejected, stopping = stats.unbind()
        self._put_back_stats(rejected > 0)
        return kept, loss_sum, loss_bad, stopping

    def _skip_reason(self, bad_losses: float, loss: float, kept: float, spike: float, norm: float,
                     scale: float | None) -> str | None:
        """Why the step is skipped, from the one read (None: it is taken; non-finite gradients too
        under ``nonfinite_grads: scrub``)."""
        if bad_losses > 0 or not math.isfinite(loss):
            return "loss"
        if kept == 0:
            return "batch"
        if spike:
            return "spike"
        if math.isfinite(norm) or self.cfg.nonfinite_grads == "scrub":
            return None
        return "scaler" if scale is not None and scale > ROUTINE_SCALE else "grads"

    def _scrub(self, grads: list[torch.Tensor], factor: torch.Tensor,
               step: int) -> tuple[torch.Tensor, torch.Tensor]:
        scrub_grads(grads)
        self.counts["grads_scrubbed"] += 1
        self.events.emit("grads_scrubbed", stage=self.stage, step=step, rank=self.ranks.rank)
        logger.warning("%s step %d: non-finite gradients set to 0 (guard.nonfinite_grads=scrub)",
                       self.stage, step)
        norm = total_norm(grads).to(self.device) * factor
        return norm, self.clipper.threshold(norm)

    def _skip(self, step: int, reason: str, loss: torch.Tensor, norm: float, loss_v: float | None,
              scaler: torch.amp.GradScaler | None, stop: bool) -> StepOutcome:
        """Skip the step: statistics put back, the scaler updated, counted (toward a rollback too,
        unless a routine loss-scale overflow), reported."""
        if self.norm_stats and self._step_snapshot is not None:
            self.norm_stats.restore(self._step_snapshot)
        if scaler is not None:
            scaler.update()  # backs off when unscale_ found an overflow
        self.counts["steps_skipped"] += 1
        routine = reason == "scaler"
        if not routine:
            self.consecutive_skips += 1
            self.spike_skips += reason == "spike"
        self.events.emit("step_skipped", stage=self.stage, step=step, rank=self.ranks.rank, reason=reason,
                         loss=_number(loss_v), grad_norm=_number(norm),
                         consecutive=self.consecutive_skips)
        note = " (a routine fp16 loss-scale overflow, not counted: the scaler backs off)" if routine else ""
        logger.log(logging.INFO if routine else logging.WARNING,
                   "%s step %d: optimizer step skipped (%s; loss %s, grad norm %s), %d in a row%s",
                   self.stage, step, reason, _number(loss_v), _number(norm), self.consecutive_skips, note)
        return StepOutcome(False, loss, norm, stop, reason)

    def _spike_run(self, step: int, reason: str, loss: float, healthy: bool) -> None:
        """A skipped spike (``healthy``: finite, unclipped gradient norm) counts toward a new loss level,
        any other skip ends the run; say so when the window takes the new level."""
        if reason != "spike":
            self.losses.spike_run.clear()
            return
        level = self.losses.skipped_spike(loss, healthy)
        if level is not None:
            after = self.cfg.loss.rebaseline_after
            self.events.emit("loss_rebaselined", stage=self.stage, step=step, rank=self.ranks.rank,
                             spikes=after, level=level)
            logger.warning("%s step %d: %d loss spikes in a row with finite, unclipped gradients: the loss "
                           "window now holds their level (mean %.4g)", self.stage, step, after, level)

    def _note_clip(self, step: int, norm: float, threshold: float) -> None:
        if norm <= threshold:
            return
        self.counts["grads_clipped"] += 1
        ceiling = math.inf if self.clipper.max_norm is None else self.clipper.max_norm
        if self.clipper.adaptive and threshold < ceiling:
            self.counts["adaptive_clips"] += 1
            self.events.emit("grad_clipped", stage=self.stage, step=step, rank=self.ranks.rank,
                             grad_norm=norm, threshold=threshold, mode="zscore")

    def _report_batches(self, step: int, skipped: int) -> None:
        """Name the rejected samples of every rank in one event, those that were finite but too large
        apart (the fault path: reads the fault codes)."""
        local = []
        for codes, names in zip(self._sample_codes, self._names, strict=True):
            for i, code in enumerate(codes.tolist()):
                if code != CLEAN:
                    local.append((names[i] if isinstance(names, (list, tuple)) else f"sample {i}", code))
        per_rank = self.ranks.gather(local)
        self.counts["batches_skipped"] += skipped
        samples = _by_rank(per_rank, {TOO_LARGE, NONFINITE})
        too_large = _by_rank(per_rank, {TOO_LARGE})
        self.events.emit("batch_skipped", stage=self.stage, step=step, rank=self.ranks.rank,
                         micro_batches=skipped, samples=samples, too_large=too_large)
        logger.warning("%s step %d: %d micro-batch(es) left out for NaN/Inf values or values beyond "
                       "guard.max_abs_input=%s: %s (too large: %s)", self.stage, step, skipped,
                       self.cfg.max_abs_input, samples, too_large or "none")

    # ----- escalation --------------------------------------------------------------
    @property
    def wants_rollback(self) -> bool:
        return self.enabled and self.consecutive_skips >= self.cfg.rollback.max_consecutive_skips

    @property
    def spike_driven(self) -> bool:
        """Every skip of the current run of skips was a loss spike."""
        return 0 < self.consecutive_skips == self.spike_skips

    def skip_run(self) -> str:
        """Why the skips call for a rollback, in words."""
        why = f"{self.consecutive_skips} optimizer steps skipped in a row"
        return f"{why}, all as loss spikes" if self.spike_driven else why

    def spike_advice(self) -> str:
        """What to do when loss spikes alone led to a halt."""
        lo, skips = self.cfg.loss, self.cfg.rollback.max_consecutive_skips
        after = lo.rebaseline_after
        if after is None:
            accepts = "never accepts a new loss level (guard.loss.rebaseline_after is null)"
        elif after >= skips:
            accepts = (f"accepts a new loss level after {after} spikes in a row "
                       f"(guard.loss.rebaseline_after), but rolls back after {skips} "
                       "(guard.rollback.max_consecutive_skips)")
        else:
            accepts = (f"accepts a new loss level after {after} spikes in a row with a finite, unclipped "
                       "gradient norm (guard.loss.rebaseline_after)")
        return (f"each of those losses lay more than guard.loss.spike_zscore={lo.spike_zscore} deviations "
                f"above the recent ones, and the guard {accepts}; if the loss level changed for good, raise "
                "guard.loss.spike_zscore or lower guard.loss.rebaseline_after, else lower trainer.lr")

    def may_roll_back(self) -> bool:
        return self.rollbacks_since_save < self.cfg.rollback.max_rollbacks

    def rolled_back(self, carried: dict[str, tp.Any], to: Path) -> None:
        """After checkpoint ``to`` was reloaded: counters continue from ``carried`` (what they were
        before the reload), one more rollback, the LR scaled."""
        self.rolled_back_to.append(to)
        self.counts = dict(carried["counts"])
        self.counts["rollbacks"] += 1
        self.rollbacks_since_save = carried["rollbacks_since_save"] + 1
        self.lr_scale = carried["lr_scale"] * self.cfg.rollback.lr_scale
        self.consecutive_skips = self.spike_skips = 0

    def carried(self) -> dict[str, tp.Any]:
        return {"counts": dict(self.counts), "rollbacks_since_save": self.rollbacks_since_save,
                "lr_scale": self.lr_scale}

    def saved(self) -> None:
        """A new checkpoint is being committed: rollbacks are counted afresh from it (called before its
        state is taken, so it records none)."""
        self.rollbacks_since_save = 0
        self.rolled_back_to.clear()

    def nonfinite_weights(self) -> bool:
        """Whether any trainable weight is NaN/Inf (one host sync; at checks, never per step)."""
        if not self.params:
            return False
        flags = torch.stack([~torch.isfinite(p.detach()).all() for p in self.params])
        return bool(flags.any().item())

    def repair_norm_stats(self, root: nn.Module, forward: tp.Callable[[], None], when: str,
                          step: int) -> list[str]:
        """Find modules with non-finite statistics; recompute them over a few batches, or reset them
        when that fails too. Returns the repaired modules' names."""
        broken = self.norm_stats.nonfinite()
        if not broken:
            return []
        self.norm_stats.recompute(root, broken, forward)
        still = self.norm_stats.nonfinite()
        if still:
            self.norm_stats.reset(still)
        self.counts["bn_repaired"] += len(broken)
        method = {n: "reset" if n in still else "recomputed" for n in broken}
        self.events.emit("bn_repaired", stage=self.stage, step=step, rank=self.ranks.rank, when=when,
                         modules=method)
        logger.warning("%s step %d: non-finite running statistics %s (%s): %s", self.stage, step, when,
                       ", ".join(broken), ", ".join(f"{n} {m}" for n, m in method.items()))
        return broken

    # ----- reporting and state -----------------------------------------------------
    def log_values(self) -> dict[str, int]:
        values = {f"guard/{k}": v for k, v in self.counts.items()}
        if self.enabled and self.cfg.clip.mode == "agc":
            values["guard/agc_clipped_units"] = int(self._agc_units.item())
        return values

    def state_dict(self) -> dict[str, tp.Any]:
        return {"counts": dict(self.counts), "consecutive_skips": self.consecutive_skips,
                "spike_skips": self.spike_skips, "rollbacks_since_save": self.rollbacks_since_save,
                "lr_scale": self.lr_scale,
                "losses": self.losses.state_dict(), "clip": self.clipper.state_dict()}

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        self.counts = {k: int(state["counts"].get(k, 0)) for k in COUNTERS}
        self.consecutive_skips = int(state["consecutive_skips"])
        self.spike_skips = int(state.get("spike_skips", 0))  # absent in checkpoints saved before it was kept
        self.rollbacks_since_save = int(state["rollbacks_since_save"])
        self.lr_scale = float(state["lr_scale"])
        self.losses.load_state_dict(state["losses"])
        self.clipper.load_state_dict(state["clip"])


def _by_rank(per_rank: list[list[tuple[str, int]]], codes: set[int]) -> dict[str, list[str]]:
    """``{"rank r": [names]}`` of the samples with one of ``codes``, ranks with none left out."""
    found = {f"rank {r}": [name for name, code in samples if code in codes]
             for r, samples in enumerate(per_rank)}
    return {rank: names for rank, names in found.items() if names}


def _number(value: float | None) -> float | str | None:
    """A float for JSON: non-finite values as text, never passed off as numbers."""
    return value if value is None or math.isfinite(value) else repr(value)
