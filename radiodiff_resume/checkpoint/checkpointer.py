"""Save and resume policy for one trainer: what to save when, which checkpoint to trust.

Discovery: rank 0 tries checkpoints newest first; each must pass every verification
level (the probe after loading). A failing one is quarantined with a reason and the
next older is tried. If checkpoints exist but none verifies, the run stops with an
error — it never silently starts from scratch. Rank 0 broadcasts its choice, so every
rank resumes from the same checkpoint.
"""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError

from radiodiff_resume.checkpoint.codec import CodecError
from radiodiff_resume.checkpoint.manifest import Manifest, Probe, probe_from
from radiodiff_resume.checkpoint.store import CheckpointStore, rank_component, read_component
from radiodiff_resume.checkpoint.verify import (
    Report,
    check_finite,
    check_keys,
    check_scale_factor,
    check_structure,
    nonfinite_names,
)
from radiodiff_resume.config import CheckpointConfig
from radiodiff_resume.errors import HaltError, UserError
from radiodiff_resume.events import EventLog

if tp.TYPE_CHECKING:
    from radiodiff_resume.trainer.base import Trainer

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, trainer: Trainer, cfg: CheckpointConfig, config_hash: str, events: EventLog) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.config_hash = config_hash
        self.events = events
        self.store = CheckpointStore(
            trainer.results_folder / "checkpoints", trainer.accelerator, cfg.keep_last, cfg.keep_every
        )
        self.every = cfg.every or trainer.loop.save_and_sample_every
        self.last_saved_step: int | None = None
        self.resumed_from: Path | None = None
        self.verified: Report | None = None

    # ----- saving ------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.trainer.loop.train_num_steps

    def save(self) -> Path:
        """Commit a checkpoint of the current step on every rank, or refuse poisoned state."""
        t = self.trainer
        step = t.state.step
        t.sync_buffers()
        shared = t.state_dict()
        bad = nonfinite_names({k: shared[k] for k in ("model", "ema", "optimizer") if k in shared})
        if bad:
            self.events.emit("save_refused", stage=t.stage, step=step, nonfinite=bad[:20])
            raise HaltError(
                f"{t.stage}: refusing to save step {step}: non-finite values in {len(bad)} tensor(s) "
                f"({', '.join(bad[:4])}); the previous checkpoints are untouched. Rerun to resume "
                "from the last verified checkpoint, with a lower trainer.lr or "
                "trainer.mixed_precision=bf16 if this repeats."
            )
        manifest = Manifest(
            step=step, stage=t.stage, world_size=t.accelerator.num_processes,
            config_hash=self.config_hash, scale_factor=t.scale_factor_value(),
            probe=self.probe_record(),
        )
        path = self.store.save(step, shared, t.rank_state_dict(), manifest)
        self.last_saved_step = step
        self.events.emit("checkpoint_saved", stage=t.stage, step=step, path=str(path))
        logger.info("%s step %d: checkpoint committed to %s", t.stage, step, path)
        return path

    def probe_record(self) -> Probe:
        t = self.trainer
        loss = t.probe_loss()
        return probe_from(float(loss), t.accelerator.device.type, str(t.probe_dtype()))

    # ----- resuming ----------------------------------------------------------------
    def resume(self) -> Path | None:
        """Restore the newest verified checkpoint (or the one named); None when starting fresh."""
        t = self.trainer
        acc = t.accelerator
        # [chosen path or None, error message or None]; rank 0 decides, every rank learns the outcome
        # (also of a failure), so no rank is left waiting in a collective.
        outcome: list[tp.Any] = [None, None]
        failure: Exception | None = None
        if acc.is_main_process:
            try:
                outcome[0] = self._choose()
            except Exception as exc:  # re-raised below on every rank
                failure = exc
                outcome[1] = str(exc) if isinstance(exc, UserError) else f"rank 0 failed: {exc!r}"
        if acc.num_processes > 1:
            broadcast_object_list(outcome, from_process=0)
        chosen, error = outcome
        if failure is not None:
            raise failure
        if error is not None:
            raise UserError(error)
        if chosen is None:
            return None
        path = Path(chosen)
        if not acc.is_main_process:
            t.load_state_dict(read_shared(path))
        self._load_rank_state(path)
        self.resumed_from = path
        self.store.protected.add(path.resolve())
        self.last_saved_step = t.state.step
        levels = self.verified.summary() if self.verified else "verified on rank 0"
        self.events.emit("resumed", stage=t.stage, step=t.state.step, path=str(path), levels=levels)
        logger.info("%s: resumed from verified checkpoint %s (step %d; %s)", t.stage, path, t.state.step,
                    levels)
        if self.verified is not None and self.verified.levels["probe"].detail:
            logger.info("%s: probe %s", t.stage, self.verified.levels["probe"].detail)
        return path

    def _choose(self) -> str | None:
        mode = self.cfg.resume
        t = self.trainer
        leftovers = self.store.remove_leftovers()
        if leftovers:
            logger.info("%s: removed unfinished save(s) %s (the process died mid-save)",
                        t.stage, ", ".join(leftovers))
            self.events.emit("staging_removed", stage=t.stage, folders=leftovers)
        if mode == "never":
            if self.store.candidates():
                moved = self.store.set_aside()
                logger.warning("%s: checkpoint.resume=never: the previous run's checkpoints were moved to "
                               "%s, starting fresh", t.stage, moved)
                self.events.emit("checkpoints_set_aside", stage=t.stage, to=str(moved))
            self.events.emit("fresh_start", stage=t.stage, reason="checkpoint.resume=never")
            return None
        if mode != "auto":
            path = Path(mode).expanduser()
            if not path.is_dir():
                raise UserError(f"checkpoint.resume={mode}: no such checkpoint folder")
            report = self.verify_and_load(path)
            if not report.ok:
                raise UserError(f"checkpoint.resume={mode} does not verify:\n{report.describe()}")
            self.verified = report
            return str(path)
        candidates = self.store.candidates()
        if not candidates and self.store.quarantined():
            raise UserError(
                f"{t.stage}: {self.store.folder} holds no checkpoint, only quarantined ones in "
                f"{self.store.folder / 'quarantine'} (see their QUARANTINE_REASON.txt). Refusing to start "
                "from scratch: pass checkpoint.resume=<folder> to use one, or checkpoint.resume=never to "
                "start fresh deliberately."
            )
        if not candidates:
            logger.info("%s: no checkpoint in %s, starting fresh", t.stage, self.store.folder)
            self.events.emit("fresh_start", stage=t.stage, reason="no checkpoint")
            return None
        rejected = []
        for path in candidates:
            report = self.verify_and_load(path)
            if report.ok:
                self.verified = report
                return str(path)
            reason = report.describe()
            moved = self.store.quarantine(path, reason)
            rejected.append(f"{path.name}: {report.failure.name if report.failure else '?'}")
            self.events.emit("checkpoint_quarantined", stage=t.stage, path=str(path),
                             to=str(moved), reason=reason)
            logger.warning("%s: checkpoint rejected and moved to %s\n%s", t.stage, moved, reason)
        raise UserError(
            f"{t.stage}: checkpoints exist in {self.store.folder} but none verifies "
            f"({'; '.join(rejected)}); they were moved to {self.store.folder / 'quarantine'} with "
            "their reasons. Refusing to start from scratch: fix or remove them, or pass "
            "checkpoint.resume=never to start fresh deliberately."
        )

    def verify_and_load(self, path: Path) -> Report:
        """Run every level; on success the trainer holds the checkpoint's state."""
        t = self.trainer
        report = Report(path)
        manifest = check_structure(path, report)
        if manifest is None:
            return report
        try:
            state = read_shared(path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError, CodecError) as exc:
            report.set("keys", False, f"cannot read state: {type(exc).__name__}: {exc}")
            return report
        if not check_keys(report, state, t.unwrapped.state_dict(), t.params, t.ema is not None):
            return report
        if not check_finite(report, state):
            return report
        if not check_scale_factor(report, state, manifest):
            return report
        conflict = t.resume_conflict(manifest)
        if conflict:
            raise UserError(conflict)
        t.load_state_dict(state)
        self._check_probe(report, manifest)
        return report

    def _check_probe(self, report: Report, manifest: Manifest) -> bool:
        t = self.trainer
        if manifest.probe is None:
            return report.set("probe", True, "no probe recorded")
        now = self.probe_record()
        was = manifest.probe
        if (now.device_type, now.dtype) == (was.device_type, was.dtype):
            ok = now.loss_hex == was.loss_hex
            how = "bit-exact"
        else:
            ok = abs(now.loss - was.loss) <= self.cfg.probe_tolerance * max(abs(was.loss), 1e-12)
            how = f"within {self.cfg.probe_tolerance:g} relative ({was.device_type}/{was.dtype} → " \
                  f"{now.device_type}/{now.dtype})"
        detail = f"loss {now.loss!r} vs recorded {was.loss!r}, {how}"
        if not ok:
            detail += f"; {t.stage} weights, statistics or scale_factor differ from those saved"
        return report.set("probe", ok, detail)

    def _load_rank_state(self, path: Path) -> None:
        t = self.trainer
        rank = t.accelerator.process_index
        name = rank_component(rank)
        if (path / f"{name}.json").exists():
            t.load_rank_state_dict(read_component(path, name))
            return
        logger.warning(
            "%s: %s has no state for rank %d (saved with another number of processes); data order "
            "and noise continue from rank 0's position, so this resume is not bit-exact",
            t.stage, path.name, rank,
        )
        t.load_rank_state_dict(read_component(path, rank_component(0)), rank_specific=False)


SHARED = ("model", "ema", "optimizer", "lr_schedule", "train_state", "grad_scaler")


def read_shared(path: Path) -> dict[str, tp.Any]:
    return {name: read_component(path, name) for name in SHARED if (path / f"{name}.json").exists()}


def tensor_equal_trees(a: tp.Any, b: tp.Any) -> bool:
    """Exact equality of two state trees (dtypes and bits): what a restore must reproduce."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensor_equal_trees(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            tensor_equal_trees(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
