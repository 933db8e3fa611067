"""Save and resume policy for one trainer: what to save when, which checkpoint to trust.

Discovery: rank 0 tries checkpoints newest first. A checkpoint whose files are damaged
(integrity levels) is quarantined with a reason and the next older is tried. A sound
checkpoint that this run cannot use as configured (keys, probe, stage, format) stops the
run with the difference and the override that accepts it — nothing is moved, because
nothing is wrong with it. If checkpoints exist but none verifies, the run stops with an
error; it never silently starts from scratch. Rank 0 broadcasts its choice; every rank
then loads it, hash-checking its own reads, and all ranks agree on success.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import math
import typing as tp
import uuid
from pathlib import Path

import torch
import yaml

from radiodiff_resume.checkpoint.actions import Act, Actions, Record
from radiodiff_resume.checkpoint.background import HostBuffers, Writer
from radiodiff_resume.checkpoint.environment import differences, fingerprint, library_versions
from radiodiff_resume.checkpoint.files import (
    CheckpointCorrupt,
    read_manifest,
    write_component,
    write_components,
)
from radiodiff_resume.checkpoint.manifest import (
    FileRecord,
    Manifest,
    ManifestError,
    parse_step,
    probe_from,
    step_dirname,
)
from radiodiff_resume.checkpoint.protocol import Checkpointable
from radiodiff_resume.checkpoint.restarts import RestartLedger, batch_job
from radiodiff_resume.checkpoint.store import REASON_SUFFIX, CheckpointStore, rank_component
from radiodiff_resume.checkpoint.verify import (
    CONFIG_FILE,
    Checkpoint,
    Report,
    check_finite,
    check_keys,
    check_scale_factor,
    nonfinite_names,
    open_checkpoint,
)
from radiodiff_resume.config import ABSENT, CheckpointConfig, config_changes, jsonable
from radiodiff_resume.dist import Ranks
from radiodiff_resume.errors import HaltError, UserError
from radiodiff_resume.events import EventLog
from radiodiff_resume.slurm.environment import job_id

logger = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, trainer: Checkpointable, cfg: CheckpointConfig, events: EventLog,
                 ranks: Ranks, read_only: bool = False) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.events = events
        self.ranks = ranks
        self.store = CheckpointStore(
            trainer.results_folder / "checkpoints", ranks, cfg.keep_last, cfg.keep_every)
        self.every = cfg.every or trainer.loop.save_and_sample_every
        self.restarts = RestartLedger(trainer.results_folder)
        self.counted_from: int | None = None
        """The step of the checkpoint this run was counted against, until the run made progress
        (rank 0)."""
        self.last_saved_step: int | None = None
        self.resumed_from: Path | None = None
        self.verified: Report | None = None
        self.read_only = read_only
        """Resume as usual but move, delete and count nothing (the dry-run): ``actions`` records instead,
        listing what would have been done in ``would``, and the reports of checkpoints found damaged or
        refused in ``rejected`` (rank 0)."""
        self.actions: Actions = (Record(self.store) if read_only else
                                 Act(self.store, self.restarts, events, trainer.stage))
        self.branch: str | None = None
        """The line of a run resumed from a checkpoint named by ``checkpoint.resume`` (rank 0)."""
        self._writer = Writer()
        self._writing: int | None = None
        """The step the writer thread is committing (None: no background save under way)."""
        self._shared_buffers = HostBuffers()
        self._rank_buffers = HostBuffers()

    @property
    def line(self) -> str | None:
        return self.store.line

    @property
    def would(self) -> list[str]:
        return self.actions.would

    @property
    def rejected(self) -> list[Report]:
        return self.actions.rejected

    @functools.cached_property
    def crash_limit(self) -> int | None:
        """Runs in a row that may die after resuming from one checkpoint before it is set aside, on
        rank 0 of a SLURM batch job (or one the controller cannot describe); None elsewhere: an
        unattended requeue loop is what needs the brake, a person rerunning by hand sees the crash."""
        if self.cfg.crash_loop_restarts is None or not self.ranks.is_main:
            return None
        batch, job = batch_job(), job_id()
        if batch is False:
            if job is not None:
                logger.info("%s: SLURM job %s is an interactive allocation, not a batch job: runs that "
                            "die after resuming are not counted (the crash-loop brake is for requeue "
                            "loops)", self.trainer.stage, job)
            return None
        if batch is None:
            logger.info("%s: the controller cannot say whether SLURM job %s is a batch job: runs that die "
                        "after resuming are counted, as in one", self.trainer.stage, job)
        return self.cfg.crash_loop_restarts

    def progressed(self, step: int, stop_seen: bool) -> None:
        """After every optimizer step, and when a stop begins (host values only; nothing is read or
        written until it acts, once): a run ``crash_loop_progress_steps`` past the checkpoint it was
        counted against, or one that has seen a stop signal, did not die of that checkpoint, so the
        counts are cleared."""
        if self.counted_from is None:
            return
        if stop_seen or step - self.counted_from >= self.cfg.crash_loop_progress_steps:
            self.ended_cleanly()

    # ----- saving ------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.trainer.loop.train_num_steps

    def save(self, provenance: tp.Sequence[str] = (), background: bool = False,
             done: tp.Callable[[], None] = lambda: None) -> Path:
        """Commit a checkpoint of the current step on every rank, or refuse poisoned state (all ranks).
        ``provenance`` says how the state came to be, when not by training alone (an import); ``done``
        is called once it is committed (in the writer thread for a background save).

        ``background``: return once the state is copied into host buffers; a writer thread commits it
        (:meth:`settle` waits for that and raises its error; :attr:`failed` says it failed). The
        non-finite check and the probe then run in the writer, on the snapshot: that is exactly what is
        written, and either on the training thread would block it about as long as the copy. On a CPU
        run the writer computes the probe with a twin of the model that shares the snapshot's tensors
        (:meth:`Probe.twin`). On a GPU the probe forward is enqueued on the training stream, which runs
        it before the next step changes the weights, and the writer reads its value from a pinned
        buffer: a twin there would be a second copy of the model in device memory, and the probe must
        be computed on the device that will resume. A non-finite probe is refused like a non-finite
        tensor.
        """
        self.settle()
        t = self.trainer
        step = t.state.step
        t.sync_buffers()
        shared = t.state_dict()
        if self.store.line is None:
            self.store.line = uuid.uuid4().hex
        probe_inputs = t.probe_inputs() if self.ranks.is_main else None
        if not background:
            manifest, refusal = None, None
            if self.ranks.is_main:
                refusal = self._refusal_to_save(step, shared)
                if refusal is None:
                    value = float(t.probe_value(tp.cast(dict, probe_inputs)))
                    manifest, refusal = self._manifest(step, value, provenance)
            refusal = self.ranks.broadcast(refusal)
            if refusal is not None:
                raise HaltError(refusal)
            path = self.store.save(step, self._shared_files({**shared, "probe": probe_inputs}),
                                   self._own_files(t.rank_state_dict()), manifest)
            self._committed(step, path)
            done()
            self.ended_cleanly()  # progress: no checkpoint is suspect any more
            return path
        ranks = self.ranks.background()
        probe_of, shared_copy, probe_copy = None, {}, None
        if ranks.is_main:
            on_device = t.accelerator.device.type != "cpu"
            probe_of = None if on_device else t.probe_later()
            probe_value = t.probe_value(tp.cast(dict, probe_inputs)) if on_device else None
            snapshot = self._shared_buffers.snapshot({"state": {**shared, "probe": probe_inputs},
                                                      "probe_value": probe_value})
            shared_copy, probe_copy = snapshot["state"], snapshot["probe_value"]
        own_copy = self._rank_buffers.snapshot(t.rank_state_dict())
        threads = torch.get_num_threads()

        def commit() -> None:
            self._shared_buffers.ready()
            self._rank_buffers.ready()
            manifest, refusal = None, None
            if ranks.is_main:
                refusal = self._refusal_to_save(step, shared_copy)
                if refusal is None:
                    if probe_of is not None:
                        torch.set_num_threads(threads)  # the same reductions as the training thread's
                        value = probe_of(shared_copy["model"], tp.cast(dict, probe_inputs))
                    else:
                        value = tp.cast(torch.Tensor, probe_copy)
                    manifest, refusal = self._manifest(step, float(value), provenance)
            refusal = ranks.broadcast(refusal)
            if refusal is not None:
                raise HaltError(refusal)
            path = self.store.save(step, self._shared_files(shared_copy), self._own_files(own_copy), manifest,
                                   ranks)
            self._committed(step, path)
            done()

        self._writer.start(commit, name=f"checkpoint-writer-{t.stage}-{step}")
        self._writing = step
        self.last_saved_step = step
        return self.store.folder / step_dirname(step)

    @property
    def failed(self) -> bool:
        """The background commit failed on some rank (a host flag: no sync). Every rank's writer learns
        it in the same commit phase, and the per-step stop agreement turns it into a stop."""
        return self._writer.failed

    def settle(self) -> None:
        """Wait for the background commit, if one is under way, and raise its error (the same on every
        rank: the writers agree on each phase). Called before the next save, a resume or rollback, a
        stop and at the end of training."""
        if self._writing is None:
            return
        step, self._writing = self._writing, None
        try:
            self._writer.wait()
        except UserError:
            self.last_saved_step = None
            self.events.emit("save_failed", stage=self.trainer.stage, step=step,
                             noticed_at=self.trainer.state.step)
            raise
        self.ended_cleanly()  # progress: no checkpoint is suspect any more

    def settle_quietly(self) -> None:
        """On an error exit: let a background commit under way finish before the error goes on (and the
        run lock is released); a checkpoint it commits is good. Its own failure is logged, not raised
        over the error already on its way."""
        try:
            self.settle()
        except UserError as exc:
            logger.error("%s: the background save also failed: %s", self.trainer.stage, exc)

    def _shared_files(self, trees: dict[str, tp.Any]) -> tp.Callable[[Path], dict[str, FileRecord]]:
        config = self.trainer.config_yaml.encode()

        return lambda folder: write_components(folder, trees, {CONFIG_FILE: config})

    def _own_files(self, tree: dict[str, tp.Any]) -> tp.Callable[[Path], dict[str, FileRecord]]:
        return lambda folder: write_component(folder, rank_component(self.ranks.rank), tree)

    def _committed(self, step: int, path: Path) -> None:
        self.last_saved_step = step
        self.events.emit("checkpoint_saved", stage=self.trainer.stage, step=step, path=str(path))
        logger.info("%s step %d: checkpoint committed to %s", self.trainer.stage, step, path)

    def ended_cleanly(self) -> None:
        """Progress, a commit, a stop or the end of training: clear the crash-loop counts (rank 0)."""
        self.counted_from = None
        if self.ranks.is_main:
            self.actions.clear_counts()

    def _refusal_to_save(self, step: int, shared: dict[str, tp.Any]) -> str | None:
        t = self.trainer
        bad = nonfinite_names({k: shared[k] for k in ("model", "ema", "optimizer") if k in shared})
        if not bad:
            return None
        self.events.emit("save_refused", stage=t.stage, step=step, nonfinite=bad[:20])
        return (
            f"{t.stage}: refusing to save step {step}: non-finite values in {len(bad)} tensor(s) or "
            "number(s) "
            f"({', '.join(bad[:4])}); the previous checkpoints are untouched. Rerun to resume "
            "from the last verified checkpoint, with a lower trainer.lr or "
            "trainer.mixed_precision=bf16 if this repeats."
        )

    def _manifest(self, step: int, value: float,
                  provenance: tp.Sequence[str]) -> tuple[Manifest | None, str | None]:
        """The manifest of ``step`` whose state computes the probe ``value``, or why it is refused.
        In a background save this runs in the writer: reading ``scale_factor`` (fixed before the first
        step, changed only by a load, which waits for the commit) would be a host sync on a GPU."""
        t = self.trainer
        if not math.isfinite(value):
            self.events.emit("save_refused", stage=t.stage, step=step, probe=repr(value))
            return None, (f"{t.stage}: refusing to save step {step}: the state computes a non-finite "
                          f"probe ({value!r}) although every tensor is finite; the previous checkpoints "
                          "are untouched")
        probe = probe_from(value, t.probe_dtype(), fingerprint(t.accelerator.device))
        manifest = Manifest(
            step=step, stage=t.stage, world_size=self.ranks.world, line=tp.cast(str, self.store.line),
            config_hash=t.config_hash, scale_factor=t.scale_factor_value(), probe=probe,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            versions=library_versions(), provenance=list(provenance),
        )
        return manifest, None

    # ----- resuming ----------------------------------------------------------------
    def newest(self, older_than: int | None = None) -> Path | None:
        """The newest committed checkpoint folder (of a step below ``older_than``; not yet verified),
        on every rank."""
        committed = _older(self.store.committed(), older_than) if self.ranks.is_main else []
        return self.ranks.broadcast(committed[0] if committed else None)

    def resume(self, mode: str | None = None, rollback: bool = False,
               older_than: int | None = None) -> Path | None:
        """Restore the newest verified checkpoint (or the one named; ``mode`` overrides
        ``checkpoint.resume``; ``older_than``: only checkpoints of a lower step); None when starting
        fresh. A ``rollback`` within a live run is not a restart: the crash-loop counts leave it alone."""
        self.settle()
        t = self.trainer
        chosen, failure, message = None, None, None
        self.branch = None
        if self.ranks.is_main:
            try:
                chosen = self._choose(mode or self.cfg.resume, count=not rollback, older_than=older_than)
            except Exception as exc:  # re-raised below on this rank; every other rank learns of it
                failure = exc
                message = str(exc) if isinstance(exc, UserError) else f"rank 0 failed: {exc!r}"
        line = uuid.uuid4().hex if chosen is None else self.branch or chosen.manifest.line
        if rollback and self.store.line is not None:
            line = self.store.line  # the same run goes on: its checkpoints stay one line
        path, line, records, message = self.ranks.broadcast(
            (chosen and str(chosen.path), line, chosen and chosen.manifest.files, message))
        if failure is not None:
            raise failure
        if message is not None:
            raise UserError(message)
        self.store.line = line
        if path is None:
            return None
        self._load_everywhere(Path(path), chosen, records)
        self.resumed_from = Path(path)
        self.store.protected.add(Path(path).resolve())
        self.last_saved_step = t.state.step
        levels = self.verified.summary() if self.verified else "verified on rank 0"
        self.events.emit("resumed", stage=t.stage, step=t.state.step, path=path, levels=levels,
                         rollback=rollback)
        logger.info("%s: resumed from verified checkpoint %s (step %d; %s)", t.stage, path, t.state.step,
                    levels)
        if self.verified is not None:
            logger.info("%s: probe %s", t.stage, self.verified.levels["probe"].detail)
        for line in chosen.manifest.provenance if chosen is not None else ():
            logger.info("%s: %s was not written by training alone: %s", t.stage, Path(path).name, line)
        return Path(path)

    def _load_everywhere(self, path: Path, chosen: Checkpoint | None, records: tp.Any) -> None:
        """Rank 0 holds ``chosen`` already; the others read it (hash-checked), then all restore their
        own rank state; every rank learns whether any failed."""
        t = self.trainer
        error = None
        try:
            if chosen is None:
                chosen = open_checkpoint(path, t.stage, rank=self.ranks.rank)
                if chosen.manifest.files != records:
                    raise CheckpointCorrupt("the checkpoint changed while it was being loaded")
                t.load_state_dict(chosen.shared)
            self._restore_rank(chosen)
        except (CheckpointCorrupt, ManifestError, OSError, UserError, ValueError, TypeError, KeyError,
                IndexError, RuntimeError) as exc:  # reported on every rank below, never left waiting
            error = f"{type(exc).__name__}: {exc}"
        failed = self.ranks.failures(error)
        if failed:
            raise UserError(f"{t.stage}: resuming from {path} failed on {'; '.join(failed)}; nothing "
                            "was changed on disk. Run the same command again; if this repeats, inspect "
                            "that folder.")

    def _restore_rank(self, ckpt: Checkpoint) -> None:
        t = self.trainer
        was_world = ckpt.manifest.world_size
        was_device = ckpt.manifest.probe.environment.get("device_type")
        if was_world == self.ranks.world and was_device == t.accelerator.device.type:
            t.load_rank_state_dict(ckpt.ranks[self.ranks.rank])
            return
        t.reseed_rank(ckpt.manifest.step)
        if self.ranks.is_main:
            why = (f"saved by {was_world} process(es), resumed by {self.ranks.world}"
                   if was_world != self.ranks.world else f"saved on {was_device}, resumed on "
                   f"{t.accelerator.device.type}")
            logger.warning(
                "%s: %s: the data position continues exactly (no sample of the epoch is skipped or "
                "repeated), the per-rank random streams are re-derived from the seed and step, so this "
                "resume is exact in data but not bit-exact in noise", t.stage, why)
            self.events.emit("resharded", stage=t.stage, step=ckpt.manifest.step, reason=why)

    def _choose(self, mode: str, count: bool = True, older_than: int | None = None) -> Checkpoint | None:
        t = self.trainer
        self.actions.remove_leftovers()
        if mode == "never":
            self.actions.set_aside_all(self.store.candidates())
            self.events.emit("fresh_start", stage=t.stage, reason="checkpoint.resume=never")
            return None
        if mode != "auto":
            return self._choose_named(Path(mode).expanduser(), mode, count)
        candidates = _older(self.store.candidates(), older_than)
        if count:
            candidates = self._past_crash_loops(candidates)
        if not candidates and self.store.crash_looped():
            raise UserError(
                f"{t.stage}: every checkpoint of {self.store.folder} was set aside because runs kept "
                "dying after resuming from it, before their next save: "
                f"{', '.join(str(p) for p in self.store.crash_looped())} (each with SET_ASIDE.txt). Not "
                "requeueing again and refusing to start from scratch: look at those runs' logs; pass "
                "checkpoint.resume=<one of those folders>/<step-…> to try one again, or "
                "checkpoint.resume=never to start fresh deliberately."
            )
        if not candidates and self.store.quarantined():
            raise UserError(
                f"{t.stage}: {self.store.folder} holds no checkpoint, only quarantined ones in "
                f"{self.store.folder / 'quarantine'} (each with a *{REASON_SUFFIX} beside it). Refusing to "
                "start from scratch: pass checkpoint.resume=<folder> to use one, or checkpoint.resume=never "
                "to start fresh deliberately."
            )
        if not candidates:
            logger.info("%s: no checkpoint in %s, starting fresh", t.stage, self.store.folder)
            self.events.emit("fresh_start", stage=t.stage, reason="no checkpoint")
            return None
        return self._newest_verified(candidates, count)

    def _newest_verified(self, candidates: list[Path], count: bool) -> Checkpoint:
        """The first of ``candidates`` (newest first) that verifies; the damaged ones before it are
        quarantined; a sound one this run cannot use stops the run."""
        t = self.trainer
        rejected = []
        for path in candidates:
            report = self.verify_and_load(path)
            if report.ok:
                if count and self.crash_limit is not None:
                    self.counted_from = self.actions.count_restart(path.name, self.crash_limit)
                return self._accept(report)
            if not report.damaged:
                raise self._refusal(report, "checkpoint.resume=auto")
            rejected.append(f"{path.name}: {tp.cast(tp.Any, report.failure).name}")
            self.actions.quarantine(report)
        raise UserError(
            f"{t.stage}: checkpoints exist in {self.store.folder} but none verifies "
            f"({'; '.join(rejected)}); they {self.actions.moved} moved to "
            f"{self.store.folder / 'quarantine'} with "
            f"their reasons (*{REASON_SUFFIX}). Refusing to start from scratch: repair one and pass "
            "checkpoint.resume=<its folder>, or pass checkpoint.resume=never to start fresh deliberately."
        )

    def _past_crash_loops(self, candidates: list[Path]) -> list[Path]:
        """``candidates`` less those runs kept dying from: each is set aside, unchanged, with its reason."""
        if self.crash_limit is None:
            return candidates
        kept = []
        for path in candidates:
            runs = self.restarts.count(path.name)
            if runs < self.crash_limit:
                kept.append(path)
                continue
            reason = (f"crash loop: {runs} runs in a row resumed from {path.name} and died before their next "
                      f"save (checkpoint.crash_loop_restarts={self.crash_limit}); the checkpoint itself "
                      "verified. Pass checkpoint.resume=<this folder>/" + path.name + " to try it again.")
            self.actions.set_aside_crash_loop(path, reason)
        return kept

    def _choose_named(self, path: Path, mode: str, count: bool) -> Checkpoint:
        """``checkpoint.resume=<folder>``: exactly that one, and this run writes a new line branching
        from it; newer checkpoints (and other lines) are set aside. When checkpoints of that branch
        exist, a run resumed from it before and went on (a requeued job still carries the override):
        the newest of them is resumed instead, so a restart never throws that progress away."""
        if not path.is_dir():
            raise UserError(f"checkpoint.resume={mode}: no such checkpoint folder")
        inside = sorted(path.glob("step-*"))
        if inside and not (path / "manifest.json").exists():
            raise UserError(f"checkpoint.resume={mode} is a folder of checkpoints, not one checkpoint: name "
                            f"one of them (the newest there is {inside[-1]}), or checkpoint.resume=auto for "
                            "the newest that verifies")
        branch = self._branch_of(path)
        descendants = [p for p in self.store.candidates() if branch and self.store.line_of(p) == branch]
        if descendants:
            logger.warning("%s: checkpoint.resume=%s: a run resumed from it before and committed %s since; "
                           "continuing from the newest of those (the override can be dropped now)",
                           self.trainer.stage, mode, ", ".join(p.name for p in descendants))
            return self._newest_verified(descendants, count)
        report = self.verify_and_load(path)
        if report.damaged:
            raise UserError(f"checkpoint.resume={mode} does not verify (it is damaged; a "
                            f"checkpoint you name is never moved):\n{report.describe()}")
        if not report.ok:
            raise self._refusal(report, f"checkpoint.resume={mode}")
        ckpt = self._accept(report)
        chosen, step, line = path.resolve(), ckpt.manifest.step, ckpt.manifest.line
        others = [p for p in self.store.candidates() if p.resolve() != chosen and (
            tp.cast(int, parse_step(p.name)) >= step or self.store.line_of(p) not in (None, line))]
        self.actions.set_aside_others(others, path, step)
        self.branch = branch
        return ckpt

    def _branch_of(self, path: Path) -> str | None:
        """The line a run resumed from the named checkpoint ``path`` writes: derived from that
        checkpoint's identity, so every restart with the same override finds the same line."""
        try:
            m = read_manifest(path)
        except (OSError, ManifestError):
            return None
        return hashlib.sha256(f"{m.line}/{m.step}/{m.probe.loss_hex}/{m.created}".encode()).hexdigest()[:32]

    def _accept(self, report: Report) -> Checkpoint:
        self.verified = report
        ckpt = tp.cast(Checkpoint, report.checkpoint)
        self._log_config_changes(ckpt)
        return ckpt

    def _log_config_changes(self, ckpt: Checkpoint) -> None:
        t = self.trainer
        changes = config_changes(_yaml_mapping(ckpt.config), t.run_config)
        for key, was, now in changes:
            logger.warning("%s: config changed since %s: %s: %r → %r (the new value applies)",
                           t.stage, ckpt.path.name, key, was, now)
        if changes:
            records = [{"key": k, "was": jsonable(w), "now": jsonable(n)} for k, w, n in changes]
            self.events.emit("config_changed", stage=t.stage, path=str(ckpt.path), changes=records)

    def _refusal(self, report: Report, how: str) -> UserError:
        """A sound checkpoint this run cannot use: what differs, and what to type."""
        t = self.trainer
        failure = tp.cast(tp.Any, report.failure)
        advice = {
            "keys": self._keys_advice(report),
            "probe": ("If you changed the model code, the probe inputs or the numerics deliberately, pass "
                      "checkpoint.accept_probe_mismatch=true to resume anyway (the difference is logged)."),
        }.get(failure.name, "")
        self.events.emit("resume_refused", stage=t.stage, path=str(report.path), level=failure.name,
                         reason=report.describe())
        self.actions.refused(report)
        return UserError(
            f"{t.stage}: {how}: {report.path} is intact but cannot be resumed as configured (nothing was "
            f"moved):\n{report.describe()}\n{advice}".rstrip()
        )

    def _keys_advice(self, report: Report) -> str:
        try:
            saved = _yaml_mapping((report.path / CONFIG_FILE).read_text())
        except OSError:
            saved = {}
        # The checkpoint holds the first-stage weights itself: their path never explains a mismatch.
        changed = [(k, w, n) for k, w, n in config_changes(saved, self.trainer.run_config)
                   if k.startswith("model.") and k != "model.first_stage.ckpt_path"]
        if not changed:
            return ("No model.* config key changed since that checkpoint, so the model code did: resume "
                    "with the radiodiff_resume version that wrote it, or start fresh with "
                    "checkpoint.resume=never.")
        def line(key: str, was: tp.Any, now: tp.Any) -> str:
            if was is ABSENT:
                return f"  {key}: not in the checkpoint's config (a key added since), {now!r} now"
            if now is ABSENT:
                return f"  {key}: {was!r} in the checkpoint, no longer a key"
            return f"  {key}: {was!r} in the checkpoint, {now!r} now"

        lines = "\n".join(line(*change) for change in changed)
        back = " ".join(f"{k}={_override(w)}" for k, w, n in changed if ABSENT not in (w, n))
        settable = (f"To resume it, set them back: {back}\n" if back else
                    "No key that both configs have changed: the code did; resume with the "
                    "radiodiff_resume version that wrote it.\n")
        return (f"The model config changed since that checkpoint:\n{lines}\n{settable}"
                "To train the new model from scratch, pass checkpoint.resume=never (the old checkpoints are "
                "set aside, not deleted) or use another trainer.results_folder.")

    def verify_and_load(self, path: Path) -> Report:
        """Run every level; on success the trainer holds the checkpoint's state and
        ``report.checkpoint`` its content."""
        t = self.trainer
        report = Report(path)
        try:
            ckpt = open_checkpoint(path, t.stage)
        except ManifestError as exc:
            report.set("structure", False, str(exc), integrity=exc.integrity)
            return report
        except CheckpointCorrupt as exc:
            report.set("structure", False, str(exc))
            return report
        report.set("structure", True, f"{len(ckpt.manifest.files)} files, hashes match")
        if not check_finite(report, ckpt.shared):
            return report
        if not check_scale_factor(report, ckpt.shared, ckpt.manifest, t.scale_factor_value() is not None):
            return report
        groups = [len(g["params"]) for g in t.optimizer.param_groups]
        if not check_keys(report, ckpt.shared, t.unwrapped.state_dict(), t.params, groups):
            return report
        conflict = t.resume_conflict(ckpt.manifest)
        if conflict:
            raise UserError(conflict)
        try:
            t.load_state_dict(ckpt.shared)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, RecursionError) as exc:
            # It decoded and matched every check, yet torch / diffusers refuse it: most likely another
            # library version's format. Not proof of damage, so it stops rather than quarantines.
            report.set("keys", False, f"the state cannot be loaded into this run's objects "
                                      f"({type(exc).__name__}: {exc}); saved with {ckpt.manifest.versions}")
            return report
        if self._check_probe(report, ckpt):
            report.checkpoint = ckpt
        return report

    def _check_probe(self, report: Report, ckpt: Checkpoint) -> bool:
        t = self.trainer
        if report.repairable:
            return report.set("probe", True, f"not compared: the checkpoint's running statistics "
                                             f"{', '.join(report.repairable[:4])} are not finite, so the "
                                             "state it computes is the one after their repair")
        was = ckpt.manifest.probe
        value = float(t.probe_value(ckpt.shared["probe"]))
        env = fingerprint(t.accelerator.device)
        changed = differences({**was.environment, "dtype": was.dtype}, {**env, "dtype": t.probe_dtype()})
        if not changed:
            ok = value.hex() == was.loss_hex
            how = "bit-exact (identical environment)"
        else:
            tol = self.cfg.probe_tolerance
            ok = abs(value - was.loss) <= tol * max(abs(was.loss), 1e-12)
            how = f"within {tol:g} relative; the environment differs: {'; '.join(changed)}"
        detail = f"{value!r} vs recorded {was.loss!r}, {how}"
        if not ok and self.cfg.accept_probe_mismatch:
            ok = True
            detail += " — MISMATCH accepted (checkpoint.accept_probe_mismatch=true)"
            logger.warning("%s: probe of %s: %s", t.stage, report.path, detail)
        elif not ok:
            detail += (f"; the {t.stage} weights, statistics or scale_factor that were loaded do not "
                       "compute what was saved")
        return report.set("probe", ok, detail)


def _older(paths: list[Path], step: int | None) -> list[Path]:
    """The ``step-*`` folders of ``paths`` below ``step`` (all of them when it is None)."""
    return paths if step is None else [p for p in paths if tp.cast(int, parse_step(p.name)) < step]


def _yaml_mapping(text: str) -> dict[str, tp.Any]:
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _override(value: tp.Any) -> str:
    """A value as it is typed in a ``key=value`` override."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip().replace(" ", "")
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)
