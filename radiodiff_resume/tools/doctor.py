"""``radiodiff-resume doctor CKPT [--fix]``: what is wrong with a checkpoint, and a repaired copy.

Every non-finite tensor (and every negative Adam second moment or running variance, whose
square root is NaN) is listed with counts and where it lives, and classified: state that is
derived or can be rebuilt is repairable — running statistics (recomputed over a few training
batches), Adam moments (reset: that parameter's Adam state starts afresh), EMA weights (copied
from the online weights), guard statistics (start afresh), a missing or inconsistent
``scale_factor`` (the manifest's value, or 1/std of a training batch's latents) — learnt
weights are not. ``--fix`` writes a new checkpoint beside the original, never touching it,
through the same trainer and file format as a save, and verifies it before saying so.

``--fix`` rebuilds the run from the checkpoint's ``config.yaml``, but the code it imports and calls
(every ``target`` key) is decided by the user: each must equal the one ``--cfg`` names at the same
key (without ``--cfg``: the built-in defaults), or the repair is refused before anything is imported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import shutil
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from radiodiff_resume.tools.checks import FAIL, OK, WARN, Checks

if tp.TYPE_CHECKING:
    from radiodiff_resume.checkpoint.verify import Checkpoint
    from radiodiff_resume.trainer.base import Trainer

SCHEDULED = (".lr", ".initial_lr", ".weight_decay")
"""Param-group settings a resume sets from the config anyway."""
REPAIRED = "repaired-"
"""Prefix of a repaired copy's folder: outside the ``step-*`` namespace, so discovery never picks
it on its own; it is resumed by naming it (``checkpoint.resume=<folder>``)."""


@dataclass
class Finding:
    where: str
    """Component and key, e.g. ``optimizer.state.3.exp_avg_sq``."""
    what: str
    """What is wrong, with counts."""
    kind: str
    repair: str | None
    """How ``--fix`` repairs it; None: it cannot be repaired."""


def diagnose(ckpt: Checkpoint) -> list[Finding]:
    """Every non-finite or impossible value in the shared state (the verifier's own rule, value by
    value), classified."""
    from radiodiff_resume.checkpoint.verify import defect, floating_leaves

    findings = []
    for component in ("model", "ema", "optimizer", "guard", "probe"):
        for where, value in floating_leaves(ckpt.shared.get(component, {}), component):
            what = defect(where, value)
            if what:
                findings.append(Finding(where, what, *classify(where)))
    return findings + _scale_factor_findings(ckpt)


def classify(where: str) -> tuple[str, str | None]:
    """``(kind, how --fix repairs it or None)`` for a state path."""
    if where.startswith("model.") and where.endswith((".running_mean", ".running_var")):
        return "running statistic", "recomputed over a few training batches (reset if that fails too)"
    if where == "model.scale_factor":
        return "scale_factor", "set from the manifest, or re-measured from the data"
    if where.startswith("model."):
        return "weight", None
    if (m := re.fullmatch(r"optimizer\.state\.(\d+)\..+", where)) is not None:
        return "optimizer moment", f"parameter {m.group(1)}'s Adam state reset (it starts afresh)"
    if where.startswith("optimizer.param_groups.") and where.endswith(SCHEDULED):
        return "optimizer setting", "set from the config's LR schedule at this step"
    if where.startswith("ema.shadow_params."):
        return "EMA weight", "copied from the online weight (the EMA restarts from it)"
    if where.startswith("guard."):
        return "guard statistic", "guard statistics start afresh"
    return where.split(".")[0], None


def _scale_factor_findings(ckpt: Checkpoint) -> list[Finding]:
    if ckpt.manifest.stage != "ldm":
        return []
    kind, repair = classify("model.scale_factor")
    buffer = ckpt.shared["model"].get("scale_factor")
    recorded = ckpt.manifest.scale_factor
    if buffer is None:
        return [Finding("model.scale_factor", "missing from the weights", kind, repair)]
    value = float(buffer)
    if math.isfinite(value) and value != recorded:
        return [Finding("model.scale_factor", f"{value!r} in the weights, {recorded!r} in the manifest", kind,
                        repair)]
    return []


def allowed_targets(cfg_path: str | None, overrides: tp.Sequence[str]) -> tuple[dict[str, tp.Any], str]:
    """The code ``--fix`` may build (``target`` key → value) and whose decision that is: the user's
    ``--cfg``, or without one this package's built-in defaults. Never the checkpoint's own config."""
    from radiodiff_resume.config import Config, load_config, targets_in, to_dict

    if cfg_path is None:
        return targets_in(to_dict(Config())), "the built-in default (no --cfg given)"
    return targets_in(to_dict(load_config(cfg_path, overrides))), f"--cfg {cfg_path}"


class Doctor:
    """Diagnoses one checkpoint folder and, with ``fix``, writes a repaired copy beside it."""

    def __init__(self, path: Path, overrides: tp.Sequence[str],
                 allowed: tuple[dict[str, tp.Any], str]) -> None:
        self.path = path
        self.overrides = list(overrides)
        self.allowed = allowed
        """What ``--fix`` may import and call, and who decided it (:func:`allowed_targets`)."""
        self.checks = Checks()
        self.repaired: Path | None = None

    def run(self, fix: bool) -> Checks:
        from radiodiff_resume.checkpoint.files import CheckpointCorrupt, read_manifest
        from radiodiff_resume.checkpoint.manifest import ManifestError
        from radiodiff_resume.checkpoint.verify import open_checkpoint

        try:
            ckpt = open_checkpoint(self.path, read_manifest(self.path).stage)
        except (OSError, ManifestError, CheckpointCorrupt) as exc:
            self.checks.add("structure", FAIL, f"{exc} — damaged files cannot be repaired")
            self.earlier(None)
            return self.checks
        self.checks.add("structure", OK, f"{ckpt.manifest.stage} checkpoint of step {ckpt.manifest.step}, "
                                         f"{len(ckpt.manifest.files)} files, hashes match")
        findings = diagnose(ckpt)
        if not findings:
            self.checks.add("state", OK, "every tensor and number finite, scale_factor consistent")
            return self.checks
        fixable = all(f.repair for f in findings)
        if fix and fixable:
            changes = self.fix(ckpt, findings)
            for f in findings:
                self.checks.add(f.kind, WARN, f"{f.where}: {f.what} — repaired in the copy: "
                                              f"{changes[f.where]}")
            self.checks.add("repair", OK, f"wrote {self.repaired}, which verifies; the original is "
                                          f"unchanged. Resume from it with checkpoint.resume={self.repaired}")
            return self.checks
        for f in findings:
            how = f"repairable: {f.repair}" if f.repair else "NOT repairable"
            self.checks.add(f.kind, FAIL, f"{f.where}: {f.what}; {how}")
        if not fixable:
            self.earlier(ckpt.manifest.step)
        elif not fix:
            self.checks.add("repair", WARN, f"run `radiodiff-resume doctor {self.path} --fix` to write a "
                                            "repaired copy beside it")
        return self.checks

    def earlier(self, step: int | None) -> None:
        """Name the newest earlier checkpoint that passes the integrity levels."""
        from radiodiff_resume.checkpoint.files import CheckpointCorrupt, read_manifest
        from radiodiff_resume.checkpoint.manifest import ManifestError, parse_step
        from radiodiff_resume.checkpoint.verify import (
            Report,
            check_finite,
            check_scale_factor,
            open_checkpoint,
        )

        folder = self.path.parent.parent if self.path.parent.name == "quarantine" else self.path.parent
        limit = step if step is not None else parse_step(self.path.name)
        steps = sorted(((s, p) for p in folder.iterdir() if (s := parse_step(p.name)) is not None
                        and (limit is None or s < limit) and p.resolve() != self.path.resolve()),
                       reverse=True)
        for _, path in steps:
            try:
                ckpt = open_checkpoint(path, read_manifest(path).stage)
            except (OSError, ManifestError, CheckpointCorrupt):
                continue
            report = Report(path)
            if check_finite(report, ckpt.shared) and not report.repairable and check_scale_factor(
                    report, ckpt.shared, ckpt.manifest, ckpt.manifest.stage == "ldm"):
                self.checks.add("earlier", WARN, f"the newest earlier checkpoint that verifies is {path}: "
                                                 f"resume from it with checkpoint.resume={path}")
                return
        self.checks.add("earlier", FAIL, f"no earlier checkpoint in {folder} verifies")

    def fix(self, ckpt: Checkpoint, findings: list[Finding]) -> dict[str, str]:
        """Load the state into the checkpoint's own trainer, repair it there, write and verify the
        copy; what was done to each finding."""
        trainer = self.trainer(ckpt)
        shared = {k: v for k, v in ckpt.shared.items() if k != "probe"}
        bad_params = {int(m.group(1)) for f in findings
                      if (m := re.fullmatch(r"optimizer\.state\.(\d+)\..+", f.where))}
        shared["optimizer"] = {**shared["optimizer"], "state": {
            k: v for k, v in shared["optimizer"]["state"].items() if int(k) not in bad_params}}
        if any(f.kind == "guard statistic" for f in findings):
            shared.pop("guard")
        scale = self._scale_factor(ckpt, findings)
        if isinstance(scale, float):
            import torch

            shared["model"] = {**shared["model"], "scale_factor": torch.tensor(scale)}
        trainer.load_state_dict(shared)
        changes = {}
        if scale == "measure":
            value = tp.cast(tp.Any, trainer).measure_scale_factor()
            changes["model.scale_factor"] = f"re-measured: 1/std of a training batch's latents = {value:.6g}"
        elif scale is not None:
            changes["model.scale_factor"] = f"set to the manifest's {scale!r}"
        for f in findings:
            if (m := re.fullmatch(r"ema\.shadow_params\.(\d+)", f.where)) is not None:
                i = int(m.group(1))
                tp.cast(tp.Any, trainer.ema).shadow_params[i].copy_(trainer.params[i].detach())
        repaired = trainer.guard.repair_norm_stats(trainer.unwrapped, trainer.calibration.forward, "doctor",
                                                   trainer.state.step)
        batches = trainer.guard.cfg.norm_stats.recalibrate_batches
        for f in findings:
            if f.where not in changes:
                changes[f.where] = {
                    "running statistic": f"recomputed over {batches} training batch(es) (momentum=None)"
                    if repaired else "recomputed",
                    "optimizer moment": "reset (that parameter's Adam state starts afresh at the next step)",
                    "optimizer setting": f"{trainer.optimizer.param_groups[0]['lr']:.6g} from the schedule",
                    "EMA weight": "copied from the online weight",
                    "guard statistic": "loss and gradient-norm statistics start afresh",
                }.get(f.kind, tp.cast(str, f.repair))
        done = sorted({f"{f.where}: {changes[f.where]}" for f in findings})
        self.repaired = self.write(trainer, ckpt, done)
        return changes

    def _scale_factor(self, ckpt: Checkpoint, findings: list[Finding]) -> float | str | None:
        """The ``scale_factor`` repair: the manifest's value, ``"measure"``, or None (no repair)."""
        if not any(f.where == "model.scale_factor" for f in findings):
            return None
        return ckpt.manifest.scale_factor if ckpt.manifest.scale_factor is not None else "measure"

    def trainer(self, ckpt: Checkpoint) -> Trainer:
        """The trainer of the checkpoint's own config (read-only), to repair and probe the state in;
        its ``target`` keys must name what :attr:`allowed` names, checked before anything is imported."""
        import yaml

        from radiodiff_resume.build import build_first_stage
        from radiodiff_resume.config import build_config, targets_in
        from radiodiff_resume.errors import UserError
        from radiodiff_resume.run import first_stage_trainer, ldm_trainer, load_data, make_accelerator

        raw = yaml.safe_load(ckpt.config)
        if not isinstance(raw, dict):
            raise UserError(f"{self.path}/config.yaml is not a mapping; cannot rebuild the run to repair it")
        allowed, whose = self.allowed
        for key, target in targets_in(raw).items():
            if target is not None and target != allowed[key]:
                theirs = "none" if allowed[key] is None else repr(allowed[key])
                raise UserError(
                    f"doctor --fix: {self.path}/config.yaml sets {key}: {target!r}, but {whose} has {theirs} "
                    "there; nothing was imported or run. A checkpoint's config never decides what code runs: "
                    "pass --cfg with the config of the run that wrote it (it must name that target)")
        cfg = build_config(raw, self.overrides)
        accelerator = make_accelerator(cfg)
        train_set, val_set = load_data(cfg, accelerator)
        if ckpt.manifest.stage == "ldm":  # the checkpoint holds the first-stage weights itself
            return ldm_trainer(cfg, accelerator, build_first_stage(cfg), train_set, val_set, read_only=True)
        return first_stage_trainer(cfg, accelerator, train_set, val_set, read_only=True)

    def write(self, trainer: Trainer, ckpt: Checkpoint, changes: list[str]) -> Path:
        """A new checkpoint folder beside the original, committed like a save (staging, fsync,
        manifest last, rename), then verified by the trainer; removed again if it does not verify."""
        from radiodiff_resume.checkpoint.environment import fingerprint, library_versions
        from radiodiff_resume.checkpoint.files import write_components, write_durable
        from radiodiff_resume.checkpoint.manifest import MANIFEST, Manifest, probe_from
        from radiodiff_resume.checkpoint.store import stamp
        from radiodiff_resume.checkpoint.verify import CONFIG_FILE, nonfinite_names
        from radiodiff_resume.errors import UserError
        from radiodiff_resume.io import fsync_dir, fsync_together

        shared = trainer.state_dict()
        bad = nonfinite_names({k: shared[k] for k in ("model", "ema", "optimizer") if k in shared})
        if bad:
            raise UserError(f"the repaired state still holds non-finite values ({', '.join(bad[:4])}); "
                            "nothing was written")
        probe_inputs = ckpt.shared["probe"]
        value = float(trainer.probe_value(probe_inputs))
        old = ckpt.manifest
        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        manifest = Manifest(
            step=old.step, stage=old.stage, world_size=old.world_size, line=old.line,
            config_hash=old.config_hash, scale_factor=trainer.scale_factor_value(),
            probe=probe_from(value, trainer.probe_dtype(), fingerprint(trainer.accelerator.device)),
            created=when, versions=library_versions(),
            provenance=[*old.provenance, f"repaired by radiodiff-resume doctor at {when} from {self.path}: "
                        + "; ".join(changes)])
        final = self.path.parent / f"{REPAIRED}{self.path.name}-{stamp()}"
        staging = final.with_name(f".staging-{final.name}")
        staging.mkdir()
        try:
            config = (self.path / CONFIG_FILE).read_bytes()
            ranks = {n: r for n, r in old.files.items() if n.startswith("rank-")}
            for name in ranks:
                shutil.copyfile(self.path / name, staging / name)
            fsync_together([staging / name for name in ranks])
            manifest.files = {**ranks, **write_components(staging, {**shared, "probe": probe_inputs},
                                                          {CONFIG_FILE: config})}
            write_durable(staging / MANIFEST, manifest.to_json().encode())
            fsync_dir(staging)
            os.replace(staging, final)
            fsync_dir(final.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report = trainer.checkpointer.verify_and_load(final)
        if not report.ok:
            shutil.rmtree(final)
            raise UserError(f"the repaired copy did not verify, so it was removed:\n{report.describe()}")
        return final


def cmd_doctor(args: argparse.Namespace) -> int:
    from radiodiff_resume.errors import UserError

    path = Path(args.checkpoint).expanduser()
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint folder")
    if not (path / "manifest.json").exists() and not (path / "config.yaml").exists():
        weights = ": its .safetensors are weights only, like a run's final/" \
            if any(path.glob("*.safetensors")) else ""
        raise UserError(f"{path} is not a checkpoint folder (no manifest.json, no config.yaml{weights}); "
                        "name one such as <results>/checkpoints/step-00001000")
    doctor = Doctor(path, args.overrides, allowed_targets(args.cfg, args.overrides))
    checks = doctor.run(args.fix)
    repaired = str(doctor.repaired) if doctor.repaired else None
    text = checks.document(checkpoint=str(path), repaired=repaired) if args.json else checks.table()
    print(text, flush=True)
    return 1 if checks.failed else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "doctor", help="diagnose a checkpoint; --fix writes a repaired copy beside it",
        description="List every non-finite tensor of a checkpoint with counts and where it lives, and "
                    "whether it can be repaired (running statistics, Adam moments, EMA weights, guard "
                    "statistics, scale_factor) or not (weights: the newest earlier checkpoint that "
                    "verifies is named). The original is never modified. Exit 0: healthy, or repaired "
                    "with --fix; 1: problems remain; 2: not a checkpoint / usage error.")
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint folder, e.g. "
                                                           "results/checkpoints/step-00001000")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the checkpoint's own config for --fix (e.g. "
                             "data.root=... if the data moved); applied to --cfg too")
    parser.add_argument("--fix", action="store_true",
                        help="write a repaired, verified copy beside the original (repaired-<name>-<time>)")
    parser.add_argument("--cfg", default=None,
                        help="the YAML config of the run: --fix builds only the model and data code "
                             "(target keys) it names, never what the checkpoint's config.yaml names; "
                             "without it, only the built-in defaults")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.set_defaults(func=cmd_doctor)
