"""``radiodiff-resume dry-run``: will a resume work? Answered before the GPU hours are spent.

The run is built exactly as ``train`` builds it (same functions, same trainer class) with the
trainer in read-only mode, and the resume goes through the same :meth:`Trainer.restore`: every
verification level, the restore of every rank's state, the repair of running statistics. What
a real resume would *do* to the folder (quarantine, set aside, clean up) is reported instead;
nothing is written to the results folder. Then a few real optimizer steps run on real batches,
in memory, to show that the state trains: finite loss, finite gradients, finite weights.

Nothing is written anywhere else either, with one exception that is reported by path: the
synthetic dataset, when the run's data cache does not hold it yet, is generated there as ``train``
would generate it. The caches libraries create on import (matplotlib's, torch inductor's) go to a
temporary folder removed at exit.

Every process of an ``accelerate launch`` takes part; the main process prints the result.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import typing as tp
from pathlib import Path

from radiodiff_resume.tools.checks import FAIL, OK, SKIPPED, WARN, Checks

if tp.TYPE_CHECKING:
    from accelerate import Accelerator

    from radiodiff_resume.config import Config
    from radiodiff_resume.trainer.base import Trainer


class DryRun:
    """Builds the run read-only, restores it, checks it and trains a few steps in memory."""

    def __init__(self, cfg: Config, checkpoint: str | None, steps: int) -> None:
        self.cfg = cfg
        self.mode = {None: None, "latest": "auto"}.get(checkpoint, checkpoint)
        """``checkpoint.resume`` for this dry-run: the config's, newest verified, or a folder."""
        self.steps = steps
        self.checks = Checks()
        self.written: list[str] = []
        """What this dry-run wrote, by path (only ever the synthetic dataset ``train`` would generate)."""

    def run(self) -> Checks:
        from radiodiff_resume.errors import UserError
        from radiodiff_resume.lock import RunLock
        from radiodiff_resume.run import load_data, make_accelerator

        accelerator = make_accelerator(self.cfg)
        self.checks.add("config", OK, f"valid; results folder {self.cfg.results_folder}")
        holder = RunLock(self.cfg.results_folder).live_holder()
        if holder is not None:
            self.checks.add("lock", WARN, f"a run holds {self.cfg.results_folder} now ({holder}): its next "
                                          "save may change what this dry-run read")
        generating = self.synthetic_to_generate()
        train_set, val_set = load_data(self.cfg, accelerator)
        sizes = f"{len(train_set)} training / {len(val_set)} validation samples"  # type: ignore[arg-type]
        if generating is not None and generating[1].exists():
            final, new = generating
            files = sum(p.is_file() for p in new.rglob("*"))
            created = f"; {new} was created for it" if new != final else ""
            self.written.append(f"{final} ({files} files of synthetic data{created})")
            sizes += (f"; the synthetic dataset was not in data.synthetic.cache_dir yet: generated into "
                      f"{final} ({files} files{created}), as `train` does on first use")
        self.checks.add("data", OK, sizes)
        try:
            trainer = self.trainer(accelerator, train_set, val_set)
        except UserError as exc:
            self.checks.add("first stage", FAIL, str(exc))
            return self.checks
        self.restore(trainer)
        accelerator.wait_for_everyone()
        return self.checks

    def synthetic_to_generate(self) -> tuple[Path, Path] | None:
        """Where the synthetic dataset will be generated and the topmost folder that creates, when the
        run uses it and its cache does not hold it complete yet; None otherwise."""
        from radiodiff_resume.data.synthetic import COMPLETE_MARKER, synthetic_root

        d = self.cfg.data
        if d.root is not None or d.train is not None:
            return None
        s = d.synthetic
        final = synthetic_root(s.cache_dir, s.num_maps, s.tx_per_map, s.seed, s.size)
        if (final / COMPLETE_MARKER).is_file():
            return None
        missing = [p for p in (final, *final.parents) if not p.exists()]
        return final, missing[-1] if missing else final

    def trainer(self, accelerator: Accelerator, train_set: tp.Any, val_set: tp.Any) -> Trainer:
        """The trainer a real run would resume: the LDM's, or the first stage's while that is
        still to be trained."""
        from radiodiff_resume.build import build_first_stage, load_first_stage_weights
        from radiodiff_resume.errors import UserError
        from radiodiff_resume.run import first_stage_trainer, ldm_trainer

        fs = self.cfg.model.first_stage
        ckpt = Path(tp.cast(str, fs.ckpt_path))
        if not ckpt.exists():
            if not fs.train_if_missing:
                raise UserError(f"{ckpt} (model.first_stage.ckpt_path) does not exist and "
                                "model.first_stage.train_if_missing is false: the run would stop")
            self.checks.add("first stage", WARN, f"{ckpt} does not exist yet: the run trains the first stage "
                                                 "first, so its resume is what is checked here")
            return first_stage_trainer(self.cfg, accelerator, train_set, val_set, read_only=True)
        first_stage = build_first_stage(self.cfg)
        load_first_stage_weights(first_stage, ckpt)
        self.checks.add("first stage", OK, f"{ckpt} loads strictly")
        return ldm_trainer(self.cfg, accelerator, first_stage, train_set, val_set, read_only=True)

    def restore(self, trainer: Trainer) -> None:
        from radiodiff_resume.errors import UserError

        try:
            path = trainer.restore(self.mode)
        except UserError as exc:
            self.report_discovery(trainer, None, str(exc))
            return
        self.report_discovery(trainer, path, None)
        if path is None:
            return
        if trainer.ranks.is_main:
            self.report_state(trainer)
        self.train(trainer)

    def report_discovery(self, trainer: Trainer, path: Path | None, error: str | None) -> None:
        """What discovery found and what a real resume would have done to the folder."""
        checkpointer = trainer.checkpointer
        for report in checkpointer.rejected:
            failure = tp.cast(tp.Any, report.failure)
            self.checks.add(failure.name, FAIL, f"{report.path.name}: {failure.detail}")
        if error is not None:
            self.checks.add("resume", FAIL, error)
            return
        if path is None:
            self.checks.add("resume", FAIL, f"no checkpoint in {checkpointer.store.folder}: the run would "
                                            f"start {trainer.stage} from scratch (nothing to resume)")
            return
        if checkpointer.verified is not None:
            for level in checkpointer.verified.levels.values():
                self.checks.add(level.name, OK, f"{path.name}: {level.detail}")
        would = "; ".join(checkpointer.would)
        rejected = bool(checkpointer.rejected)
        status = FAIL if rejected else WARN if would else OK
        step, total = trainer.state.step, trainer.loop.train_num_steps
        detail = f"{trainer.stage} resumes from {path} at step {step} of {total}" + (
            " (training is complete: a resume only finishes up)" if step >= total else "")
        self.checks.add("resume", status, detail + (f"; a real resume would first {would}" if would else ""))

    def report_state(self, trainer: Trainer) -> None:
        """Consistency of the restored state beyond the verification levels (main process)."""
        from radiodiff_resume.config import config_changes

        ckpt = tp.cast(tp.Any, trainer.checkpointer.verified).checkpoint
        self.check_optimizer(trainer, ckpt.shared["optimizer"])
        self.check_running_stats(trainer)
        manifest, world = ckpt.manifest, trainer.accelerator.num_processes
        data = ckpt.shared["data"]
        was_device = manifest.probe.environment.get("device_type")
        where = f"data position epoch {data['epoch']}, {data['offset']} samples in"
        if manifest.world_size != world or was_device != trainer.accelerator.device.type:
            self.checks.add("rng/data", WARN, f"saved by {manifest.world_size} process(es) on {was_device}, "
                            f"resumed by {world} on {trainer.accelerator.device.type}: {where} continues "
                            "exactly; the per-rank random streams are re-derived (not bit-exact in noise)")
        else:
            self.checks.add("rng/data", OK, f"{world} rank state(s) restored; {where}")
        saved = _yaml_mapping(ckpt.config)
        changes = config_changes(saved, trainer.run_config)
        if changes:
            listed = "; ".join(f"{k}: {w!r} → {n!r}" for k, w, n in changes)
            self.checks.add("config changes", WARN, f"{len(changes)} key(s) changed since {ckpt.path.name} "
                                                    f"(the new values apply): {listed}")
        else:
            self.checks.add("config changes", OK, f"none since {ckpt.path.name}")
        for line in manifest.provenance:
            self.checks.add("provenance", WARN, line)

    def check_optimizer(self, trainer: Trainer, saved: tp.Mapping[str, tp.Any]) -> None:
        """Adam's step counts against the training step (a negative second moment never gets this far:
        the verifier's ``finite`` level refuses it as damage, as ``train`` does)."""
        step = trainer.state.step
        state = trainer.optimizer.state_dict()["state"]
        problems, counts = [], set()
        for slots in state.values():
            if "step" in slots:
                counts.add(int(slots["step"]))
        if counts and max(counts) > step:
            problems.append(f"Adam has stepped {max(counts)} times but the training step is {step}")
        if problems:
            self.checks.add("optimizer", FAIL, "; ".join(problems))
        else:
            steps = f"Adam step {'/'.join(map(str, sorted(counts)))}" if counts else "no Adam state yet"
            self.checks.add("optimizer", OK, f"{len(state)} parameter state(s) fit the parameters; {steps} "
                                             f"at training step {step}")
        was = [g["lr"] for g in saved["param_groups"]]
        now = [g["lr"] for g in trainer.optimizer.param_groups]
        if all(math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(was, now,
                                                                                          strict=True)):
            self.checks.add("lr/step", OK, f"step {step}, LR {now[0]:.6g} as saved")
        else:
            self.checks.add("lr/step", WARN, f"step {step}: saved LR {float(was[0]):.6g}, this config's "
                                             f"schedule gives {float(now[0]):.6g} (a trainer.* LR setting "
                                             "changed)")

    def check_running_stats(self, trainer: Trainer) -> None:
        report = tp.cast(tp.Any, trainer.checkpointer.verified)
        stats = trainer.guard.norm_stats
        if report.repairable:
            batches = trainer.guard.cfg.norm_stats.recalibrate_batches
            how = f"a resume recomputes them over {batches} training batch(es) (guard.norm_stats)"
            self.checks.add("running stats", FAIL, f"{len(report.repairable)} non-finite in the checkpoint "
                            f"({', '.join(report.repairable[:4])}); {how}; `radiodiff-resume doctor "
                            f"{report.path} --fix` writes a repaired copy")
        elif stats:
            self.checks.add("running stats", OK, f"{len(stats.modules)} module(s), all finite")
        else:
            self.checks.add("running stats", SKIPPED, "the model keeps none (or guard.enabled is false)")

    def train(self, trainer: Trainer) -> None:
        """``steps`` real optimizer steps on the next real batches, in memory only."""
        accelerator = trainer.accelerator
        for _ in range(self.steps):
            before = trainer.state.step
            outcome = trainer.train_step()
            loss = float(accelerator.reduce(outcome.loss.detach().float(), "mean"))
            norm = "n/a (guard off)" if outcome.grad_norm is None else f"{outcome.grad_norm:.4g}"
            name = f"step {before + 1}"
            if outcome.stepped:
                trainer.state.step += 1
                ok = math.isfinite(loss)
                self.checks.add(name, OK if ok else FAIL, f"loss {loss:.6g}, grad norm {norm}")
            else:
                self.checks.add(name, FAIL, f"skipped by the guards ({outcome.reason}): loss {loss:.6g}, "
                                            f"grad norm {norm}")
        if self.steps:
            bad = trainer.guard.nonfinite_weights()
            self.checks.add("weights", FAIL if bad else OK,
                            f"{'non-finite' if bad else 'finite'} after {self.steps} step(s)")


def _yaml_mapping(text: str) -> dict[str, tp.Any]:
    import yaml

    data = yaml.safe_load(text)
    return data if isinstance(data, dict) else {}


def check_named_checkpoint(value: str, key: str) -> None:
    """A checkpoint named by ``--checkpoint`` or ``checkpoint.resume`` must be a checkpoint folder: a path
    that is none is a usage error (exit 2), not a damaged checkpoint (exit 1)."""
    from radiodiff_resume.checkpoint.manifest import MANIFEST, parse_step
    from radiodiff_resume.errors import UserError

    path = Path(value).expanduser()
    named = f"--checkpoint {value}" if key == "--checkpoint" else f"checkpoint.resume={value}"
    latest = "--checkpoint latest" if key == "--checkpoint" else "checkpoint.resume=auto"
    if not path.exists():
        raise UserError(f"dry-run: {named}: no such checkpoint folder; name one (e.g. "
                        f"<results>/checkpoints/step-00001000) or use {latest} for the newest that verifies")
    if not path.is_dir():
        raise UserError(f"dry-run: {named} is a file, not a checkpoint folder; name the folder holding "
                        f"manifest.json or use {latest}")
    if (path / MANIFEST).exists():
        return
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(p.name for p in folder.iterdir() if p.is_dir() and parse_step(p.name) is not None)
    if steps:
        raise UserError(f"dry-run: {named} holds checkpoints but is not one: name one of them "
                        f"({folder / steps[-1]} is the newest) or use {latest}")


PRIVATE_CACHES = ("MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR")
"""Where libraries the trainer imports create folders on import: matplotlib its config folder and font
cache (under HOME), torch's dynamo its inductor cache (in TMPDIR)."""


@contextlib.contextmanager
def private_caches() -> tp.Iterator[None]:
    """:data:`PRIVATE_CACHES` inside one temporary folder, removed afterwards: a dry-run leaves no cache
    behind (it compiles and draws nothing worth keeping)."""
    before = {name: os.environ.get(name) for name in PRIVATE_CACHES}
    with tempfile.TemporaryDirectory(prefix="radiodiff-dry-run-") as folder:
        os.environ.update({name: os.path.join(folder, name.lower()) for name in PRIVATE_CACHES})
        try:
            yield
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def cmd_dry_run(args: argparse.Namespace) -> int:
    from radiodiff_resume.config import load_config
    from radiodiff_resume.errors import UserError
    from radiodiff_resume.process import is_main_process

    if args.steps < 0:
        raise UserError(f"--steps {args.steps}: must be 0 or more")
    with private_caches():
        cfg = load_config(args.cfg, args.overrides)
        named, key = (args.checkpoint, "--checkpoint") if args.checkpoint else (cfg.checkpoint.resume,
                                                                                "checkpoint.resume")
        if named not in ("latest", "auto", "never"):
            check_named_checkpoint(named, key)
        dry_run = DryRun(cfg, args.checkpoint, args.steps)
        checks = dry_run.run()
    if is_main_process():
        written = "; ".join(dry_run.written)
        print(checks.document(config=str(args.cfg), written=dry_run.written) if args.json else checks.table(),
              flush=True)
        if not args.json:
            failed = sum(c.status == FAIL for c in checks)
            verdict = f"FAILED ({failed} check(s))" if failed else "passed"
            print(f"\ndry-run {verdict}; {'written: ' + written if written else 'nothing was written'}",
                  file=sys.stderr)
    return 1 if checks.failed else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "dry-run", help="check, before spending GPU hours, whether a resume will work (changes no run)",
        description="Build the run exactly as `train` would, verify and restore the checkpoint it would "
                    "resume from, check optimizer, LR, running statistics, RNG/data state and config "
                    "changes, then run a few real steps in memory. Writes nothing, except the synthetic "
                    "dataset when the run uses it and its cache lacks it (generated there as `train` would, "
                    "and named in the output). Exit 0: all checks passed; 1: a check failed; 2: usage or "
                    "config error, or --checkpoint is not a checkpoint folder.")
    parser.add_argument("--cfg", required=True, help="the YAML config of the run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    parser.add_argument("--checkpoint", default=None,
                        help="'latest' (the newest that verifies), or a checkpoint folder; default: "
                             "the config's checkpoint.resume")
    parser.add_argument("--steps", type=int, default=2,
                        help="real forward/backward/optimizer steps to run in memory (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.set_defaults(func=cmd_dry_run)
