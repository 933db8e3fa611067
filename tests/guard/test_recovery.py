"""Recovery: what the guards do once a fault has reached the saved or the live state.

Every fault is real: a checkpoint whose BatchNorm statistic was rewritten to +Inf (and re-sealed, so
it is a sound checkpoint with that content), a denoiser plug-in that writes NaN into its own weight
mid-run (:class:`tests.guard.recovery_plugins.PoisonedUNet`), the fault plug-ins of
:mod:`tests.guard.faults`. Runs are in-process (``build_ldm_trainer`` + ``fit``) where the trainer's
objects are asserted on, and real processes where the exit status, stderr or several ranks are:
``python train_cond_ldm.py`` and ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml

from radiodiff_resume.checkpoint.files import CheckpointCorrupt
from radiodiff_resume.checkpoint.verify import floating_leaves, open_checkpoint
from radiodiff_resume.cli import EXIT_HALTED
from radiodiff_resume.config import Config, build_config, load_config
from radiodiff_resume.data.radiomapseer import RadioMapSeer
from radiodiff_resume.data.stream import BatchStream
from radiodiff_resume.data.synthetic import ensure_synthetic
from radiodiff_resume.guard.policy import COUNTERS, StepOutcome
from radiodiff_resume.run import build_ldm_trainer, make_accelerator
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer
from tests.checkpoint.helpers import (
    FAST,
    committed,
    events,
    hashes,
    read_component,
    read_manifest,
    read_shared,
    rewrite_tensors,
    tensor_equal_trees,
    torch_threads,
    train_golden,
    write_manifest,
)
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.guard.recovery_plugins import PoisonedUNet
from tests.trainer.test_multiprocess import accelerate_launch

POISONED = "tests.guard.recovery_plugins.PoisonedUNet"
FAULTY_UNET = "tests.guard.faults.FaultyUNet"
FAULTY_MAPS = "tests.guard.faults.FaultyMaps"
BN = "cond_encoder.net.1"
"""The condition encoder's first BatchNorm (its state-dict prefix)."""
BATCH = 4
BIG = {"num_maps": 12, "tx_per_map": 4}
"""A larger set: 32 training samples, 4 steps of 2 x 4 per epoch in two processes (8 in one)."""
SPLIT = {"image_size": 32, "val_fraction": 0.34}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> tp.Iterator[None]:
    """One intra-op thread (the shared 2-core machine)."""
    with torch_threads(1):
        yield


# ----- set-up and checks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synth32"), seed=0, size=64, **BIG)


def raw_config(results: Path, cache: Path, unet: str | None = None,
               **unet_params: tp.Any) -> dict[str, tp.Any]:
    """The tiny config mapping, with the denoiser plug-in ``unet`` (and its fault parameters)."""
    raw = tiny_raw(results, cache)
    if unet is not None:
        raw["model"]["unet"]["target"] = unet
        raw["model"]["unet"]["params"].update(unet_params)
    return raw


def fit(cfg: Config) -> LatentDiffusionTrainer:
    """Build and train in this process (the untrained first stage is written once per folder)."""
    if not Path(tp.cast(str, cfg.model.first_stage.ckpt_path)).exists():
        write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
    trainer.fit()
    return trainer


def step_folder(results: Path, step: int) -> Path:
    return results / "checkpoints" / f"step-{step:08d}"


def steps(results: Path) -> list[int]:
    return [int(name.removeprefix("step-")) for name in committed(results)]


def fields(records: list[dict[str, tp.Any]], *keys: str) -> list[dict[str, tp.Any]]:
    return [{k: r.get(k) for k in keys} for r in records]


def nonfinite_in(tree: tp.Any) -> list[str]:
    """Paths of floating tensors / floats in ``tree`` that hold NaN or Inf."""
    bad = []
    for path, value in floating_leaves(tree):
        ok = bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor) else math.isfinite(value)
        if not ok:
            bad.append(path)
    return bad


def assert_checkpoints_finite(results: Path, after: int = 0) -> None:
    """Every committed checkpoint of a step past ``after`` verifies (structure, hashes) and holds
    only finite values."""
    names = [f"step-{s:08d}" for s in steps(results) if s > after]
    assert names, "no checkpoint committed"
    for name in names:
        shared = read_shared(results / "checkpoints" / name)
        assert len(list(floating_leaves(shared["model"]))) > 100, name
        assert nonfinite_in(shared) == [], name


def data_position(calls: int, per_epoch: int) -> dict[str, int]:
    """The data stream's state after ``calls`` batches (one process, ``per_epoch`` batches an epoch)."""
    return {"epoch": calls // per_epoch, "offset": calls % per_epoch * BATCH}


def no_quarantine(results: Path) -> None:
    assert not (results / "checkpoints" / "quarantine").exists()
    assert events(results, "checkpoint_quarantined") == []


def run_cli(cfg: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python train_cond_ldm.py --cfg cfg overrides...``, stdout and stderr kept apart."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg), *overrides],
                          cwd=cfg.parent, env=env, capture_output=True, text=True, timeout=300)


def write_yaml(path: Path, raw: dict[str, tp.Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ----- 1: a non-finite running statistic in a checkpoint -----------------------------------------


def test_inf_batchnorm_statistic_in_a_checkpoint_is_accepted_and_recomputed_after_load(
        tmp_path: Path, synth_cache: Path) -> None:
    results = tmp_path / "run"
    base = ("trainer.num_sample_images=1", "checkpoint.every=2")
    fit(build_config(tiny_raw(results, synth_cache), [*base, "trainer.val_batches=0",
                                                     "trainer.train_num_steps=4"]))
    assert steps(results) == [2, 4]
    ckpt = step_folder(results, 4)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[f"{BN}.running_mean"][0] = float("inf")

    rewrite_tensors(ckpt, "model", poison)  # re-sealed: a sound checkpoint holding +Inf
    sealed = hashes(ckpt)

    trainer = fit(build_config(tiny_raw(results, synth_cache), [*base, "trainer.train_num_steps=6"]))

    # Accepted as it is: not quarantined, not touched, every level passed.
    no_quarantine(results)
    assert hashes(ckpt) == sealed
    assert fields(events(results, "resumed"), "step", "path", "levels") == [
        {"step": 4, "path": str(ckpt),
         "levels": "structure ok, finite ok, scale_factor ok, keys ok, probe ok"}]
    report = trainer.checkpointer.verified
    assert report is not None and report.path == ckpt
    stat = f"model.{BN}.running_mean"
    assert report.repairable == [stat]
    assert report.levels["finite"].ok and stat in report.levels["finite"].detail
    assert report.levels["probe"].ok and report.levels["probe"].detail.startswith("not compared")
    # Recomputed right after loading, before any step.
    assert fields(events(results, "bn_repaired"), "step", "when", "modules") == [
        {"step": 4, "when": "after load", "modules": {BN: "recomputed"}}]
    assert trainer.guard.counts["bn_repaired"] == 1
    # The run finished; what it saved and validated is finite.
    assert trainer.state.step == 6 and steps(results) == [2, 4, 6]
    assert_checkpoints_finite(results, after=4)
    assert read_component(step_folder(results, 6), "guard")["counts"]["bn_repaired"] == 1
    records = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if "val/valid" in r]
    assert val["step"] == 6 and val["val/valid"] is True and val["val/evaluated"] == val["val/total"] > 0
    metrics = {k: v for k, v in val.items() if k.startswith("val/") and k not in ("val/valid",)}
    assert {"val/rmse", "val/nmse", "val/psnr", "val/ssim"} <= metrics.keys()
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values()), metrics


# ----- 2: non-finite weights mid-run ---------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "reason", "skipped"), [
    # The weight check after every step sees the NaN right after the step that wrote it.
    (("guard.norm_stats.check_every=1",), "non-finite weights", 0),
    # Checked only every 2 steps: the next forwards are NaN, 3 skipped steps in a row escalate.
    (("guard.rollback.max_consecutive_skips=3",), "3 optimizer steps skipped in a row", 3),
], ids=["weight-check", "consecutive-skips"])
def test_nan_weight_mid_run_rolls_back_to_the_newest_checkpoint_and_the_data_continues(
        tmp_path: Path, synth_cache: Path, overrides: tuple[str, ...], reason: str, skipped: int) -> None:
    results = tmp_path / "run"
    cfg = build_config(raw_config(results, synth_cache, POISONED, poison_at=[3]),
                       [*FAST, "checkpoint.every=2", *overrides])
    trainer = fit(cfg)

    unet = trainer.ldm.unet
    assert isinstance(unet, PoisonedUNet) and unet.poisoned == [3], "step 3 was taken with a NaN weight"
    (event,) = events(results, "rolled_back")
    assert fields([event], "step", "to_step", "path", "reason", "lr_scale", "skipped_batches") == [
        {"step": 3, "to_step": 2, "path": str(step_folder(results, 2)), "reason": reason, "lr_scale": 1.0,
         "skipped_batches": "all since"}]
    assert events(results, "halted") == [] and events(results, "save_refused") == []
    no_quarantine(results)
    assert trainer.guard.counts["rollbacks"] == 1
    assert trainer.guard.counts["steps_skipped"] == skipped
    assert fields(events(results, "step_skipped"), "step", "reason") == [
        {"step": 4, "reason": "loss"}] * skipped
    # Finished; step 3 was taken twice (once poisoned), plus the skipped calls.
    assert trainer.state.step == 6 and steps(results) == [2, 4, 6]
    assert_checkpoints_finite(results)
    calls = 6 + 1 + skipped
    assert unet.training_calls == calls
    final = read_shared(step_folder(results, 6))
    assert final["guard"]["counts"]["rollbacks"] == 1 and final["guard"]["rollbacks_since_save"] == 0
    # skip_batches null: the data went on from where the rolled-back steps had left it (a reloaded
    # data position would stand `1 + skipped` batches earlier).
    per_epoch = trainer.train_stream.batches_per_epoch
    assert per_epoch == 2
    assert final["data"] == data_position(calls, per_epoch) != data_position(6, per_epoch)


# ----- 2b: what a rollback leaves behind ----------------------------------------------------------


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory: pytest.TempPathFactory,
                synth_cache: Path) -> tuple[Path, list[StepOutcome]]:
    """4 steps, checkpoints every 2, weights checked after every step; the 3rd training forward writes
    NaN into a weight, so step 3 is rolled back to step 2 and taken again. The results folder and what
    every ``train_step`` returned (the discarded step 3 among them)."""
    results = tmp_path_factory.mktemp("rolled-back") / "run"
    cfg = build_config(raw_config(results, synth_cache, POISONED, poison_at=[3]),
                       [*FAST, "checkpoint.every=2", "guard.norm_stats.check_every=1",
                        "trainer.train_num_steps=4"])
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
    outcomes: list[StepOutcome] = []
    step = trainer.train_step

    def recorded() -> StepOutcome:
        outcomes.append(step())
        return outcomes[-1]

    trainer.train_step = recorded  # type: ignore[method-assign]
    trainer.fit()
    assert fields(events(results, "rolled_back"), "step", "to_step") == [{"step": 3, "to_step": 2}]
    assert steps(results) == [2, 4] and len(outcomes) == 5 and all(o.stepped for o in outcomes)
    return results, outcomes


def test_the_first_log_after_a_rollback_holds_only_steps_taken_after_it(
        rolled_back: tuple[Path, list[StepOutcome]]) -> None:
    """Logged every 2 steps: the line of step 4 is the mean of the replayed step 3 and step 4, not of
    the discarded step 3 too."""
    results, outcomes = rolled_back
    records = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    (line,) = [r for r in records if r["step"] == 4 and "loss" in r]
    kept = outcomes[3:]
    assert line["loss"] == pytest.approx(sum(float(o.loss) for o in kept) / 2, rel=1e-6)
    assert line["grad_norm"] == pytest.approx(sum(tp.cast(float, o.grad_norm) for o in kept) / 2, rel=1e-6)
    mixed = sum(float(o.loss) for o in outcomes[2:]) / 3
    assert line["loss"] != pytest.approx(mixed, rel=1e-6), "the discarded step is distinguishable"


def test_a_checkpoint_committed_after_a_rollback_allows_every_rollback_again(
        rolled_back: tuple[Path, list[StepOutcome]], tmp_path: Path, synth_cache: Path) -> None:
    """The step-4 checkpoint was committed after a rollback: it records no rollback since itself, so a
    run resumed from it with ``max_rollbacks: 1`` may still roll back once (its first training
    forward, step 5, writes NaN into a weight again) and finishes."""
    source, _ = rolled_back
    results = tmp_path / "run"
    results.mkdir()
    shutil.copytree(source / "checkpoints", results / "checkpoints")
    shutil.copy2(source / "ae.safetensors", results / "ae.safetensors")

    trainer = fit(build_config(raw_config(results, synth_cache, POISONED, poison_at=[1]),
                               [*FAST, "checkpoint.every=2", "guard.norm_stats.check_every=1",
                                "guard.rollback.max_rollbacks=1", "trainer.train_num_steps=6"]))

    assert fields(events(results, "rolled_back"), "step", "to_step") == [{"step": 5, "to_step": 4}]
    assert events(results, "halted") == []
    assert trainer.state.step == 6 and steps(results) == [2, 4, 6]
    assert_checkpoints_finite(results, after=4)
    assert read_component(step_folder(results, 4), "guard")["rollbacks_since_save"] == 0


# ----- 3: halting (real CLI) -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_fault_that_repeats_after_the_rollback_halts_with_exit_4(tmp_path: Path, synth_cache: Path) -> None:
    results = tmp_path / "run"
    raw = raw_config(results, synth_cache, POISONED, poison_from=None)
    raw["trainer"].update(val_batches=0, num_sample_images=1)
    raw["checkpoint"] = {"every": 2}
    raw["guard"] = {"norm_stats": {"check_every": 1}, "rollback": {"max_rollbacks": 1}}
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    fit(load_config(cfg, ["trainer.train_num_steps=2"]))  # a clean first run commits step 2
    last_good = step_folder(results, 2)
    assert steps(results) == [2]
    before = hashes(results / "checkpoints")

    # Every training forward of the resumed process poisons the weight: step 3 is rolled back
    # once, poisoned again, and the second time the run must stop.
    proc = run_cli(cfg, "trainer.train_num_steps=6", "model.unet.params.poison_from=1")

    assert proc.returncode == EXIT_HALTED, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    halted = [line for line in proc.stderr.splitlines() if "halted:" in line]
    assert len(halted) == 1 and halted[0].startswith("halted: ldm step 3: non-finite weights"), halted
    # The one checkpoint led straight back to non-finite weights: it is not called good.
    assert ("1 rollback(s) since the last checkpoint did not help (rolling back to step-00000002 led "
            "straight back to this); no checkpoint is believed good (none is older than step-00000002)"
            ) in halted[0], halted
    assert fields(events(results, "rolled_back"), "step", "to_step", "reason") == [
        {"step": 3, "to_step": 2, "reason": "non-finite weights"}]
    assert fields(events(results, "halted"), "step", "reason", "last_good", "led_back") == [
        {"step": 3, "reason": "non-finite weights", "last_good": None, "led_back": [str(last_good)]}]
    assert hashes(results / "checkpoints") == before, "the checkpoints on disk must stay untouched"
    no_quarantine(results)


@pytest.mark.slow
def test_consecutive_skips_before_any_checkpoint_halt_with_nothing_to_roll_back_to(
        tmp_path: Path, synth_cache: Path) -> None:
    results = tmp_path / "run"
    raw = raw_config(results, synth_cache, FAULTY_UNET, inf_loss_at=[1, 2, 3])
    raw["trainer"].update(val_batches=0, num_sample_images=1)
    raw["guard"] = {"rollback": {"max_consecutive_skips": 3}}
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    write_random_first_stage(build_config(raw))

    proc = run_cli(cfg)

    assert proc.returncode == EXIT_HALTED, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]
    halted = [line for line in proc.stderr.splitlines() if "halted:" in line]
    assert len(halted) == 1, halted
    assert halted[0].startswith("halted: ldm step 0: 3 optimizer steps skipped in a row, and there is "
                                "nothing to roll back to; no checkpoint was committed yet"), halted
    assert fields(events(results, "step_skipped"), "step", "reason", "consecutive") == [
        {"step": 1, "reason": "loss", "consecutive": n} for n in (1, 2, 3)]
    assert fields(events(results, "halted"), "step", "reason") == [
        {"step": 0, "reason": "3 optimizer steps skipped in a row"}]
    assert events(results, "rolled_back") == [] and committed(results) == []


# ----- 3b: a poisoned optimizer in the newest checkpoint (real CLI) --------------------------------


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (tests continue private copies of it)."""
    results = tmp_path_factory.mktemp("four-steps") / "run"
    train_golden(results, synth_cache)
    return results


def continued(four_steps: Path, tmp_path: Path, synth_cache: Path) -> tuple[Path, Path]:
    """A private copy of the 4-step run, and a config file that trains it on to step 6 with the weights
    checked after every step."""
    results = tmp_path / "run"
    results.mkdir()
    shutil.copytree(four_steps / "checkpoints", results / "checkpoints")
    shutil.copy2(four_steps / "ae.safetensors", results / "ae.safetensors")
    raw = tiny_raw(results, synth_cache)
    raw["trainer"].update(val_batches=0, num_sample_images=1)
    raw["checkpoint"] = {"every": 2}
    raw["guard"] = {"norm_stats": {"check_every": 1}}
    return results, write_yaml(tmp_path / "run.yaml", raw)


def negative_second_moment(tensors: dict[str, torch.Tensor]) -> None:
    """A finite state Adam cannot reach: the square root of the negative entry is NaN."""
    tensors["state/0/exp_avg_sq"].view(-1)[0] = -1.0


def overflowing_first_moment(tensors: dict[str, torch.Tensor]) -> None:
    """Finite and possible entry by entry, so every verification level passes, yet the next Adam update
    overflows (a first moment near float32's maximum over a zero second moment): the weights are
    non-finite right after the first step from it, every time."""
    tensors["state/0/exp_avg"].fill_(3e38)
    tensors["state/0/exp_avg_sq"].zero_()


@pytest.mark.slow
def test_a_negative_adam_second_moment_is_damage_and_train_falls_back_to_the_previous_checkpoint(
        four_steps: Path, tmp_path: Path, synth_cache: Path) -> None:
    results, cfg = continued(four_steps, tmp_path, synth_cache)
    poisoned = step_folder(results, 4)
    rewrite_tensors(poisoned, "optimizer", negative_second_moment)  # resealed: only the values tell
    sealed = hashes(poisoned)

    proc = run_cli(cfg)

    assert proc.returncode == 0, proc.stderr[-4000:]
    (moved,) = events(results, "checkpoint_quarantined")
    assert moved["path"] == str(poisoned), moved
    assert "finite        FAILED: negative second moments in 1 tensor(s): optimizer.state.0.exp_avg_sq" in \
        moved["reason"], moved["reason"]
    assert hashes(Path(moved["to"])) == sealed, "quarantined unchanged"
    assert fields(events(results, "resumed"), "step", "path", "rollback") == [
        {"step": 2, "path": str(step_folder(results, 2)), "rollback": False}]
    assert events(results, "rolled_back") == [] and events(results, "halted") == []
    assert steps(results) == [2, 4, 6]
    assert_checkpoints_finite(results)


@pytest.mark.slow
def test_a_rollback_target_that_leads_straight_back_is_passed_over_for_the_next_older(
        four_steps: Path, tmp_path: Path, synth_cache: Path) -> None:
    results, cfg = continued(four_steps, tmp_path, synth_cache)
    rewrite_tensors(step_folder(results, 4), "optimizer", overflowing_first_moment)

    proc = run_cli(cfg)

    assert proc.returncode == 0, proc.stderr[-4000:]
    assert fields(events(results, "rolled_back"), "step", "to_step", "path", "reason") == [
        {"step": 5, "to_step": 4, "path": str(step_folder(results, 4)), "reason": "non-finite weights"},
        {"step": 5, "to_step": 2, "path": str(step_folder(results, 2)), "reason": "non-finite weights"}]
    assert "step-00000004 led straight back here" in proc.stderr
    assert events(results, "halted") == []
    no_quarantine(results)
    assert steps(results) == [2, 4, 6]
    assert_checkpoints_finite(results)


@pytest.mark.slow
def test_the_halt_names_the_checkpoint_still_believed_good(
        four_steps: Path, tmp_path: Path, synth_cache: Path) -> None:
    results, cfg = continued(four_steps, tmp_path, synth_cache)
    rewrite_tensors(step_folder(results, 4), "optimizer", overflowing_first_moment)
    before = hashes(results / "checkpoints")

    proc = run_cli(cfg, "guard.rollback.max_rollbacks=1")

    assert proc.returncode == EXIT_HALTED, proc.stderr[-4000:]
    halted = [line for line in proc.stderr.splitlines() if line.startswith("halted:")]
    assert len(halted) == 1 and halted[0].startswith(
        "halted: ldm step 5: non-finite weights, and 1 rollback(s) since the last checkpoint did not help "
        "(rolling back to step-00000004 led straight back to this); the last good checkpoint is "
        f"{step_folder(results, 2)}."), halted
    assert fields(events(results, "halted"), "last_good", "led_back") == [
        {"last_good": str(step_folder(results, 2)), "led_back": [str(step_folder(results, 4))]}]
    assert hashes(results / "checkpoints") == before


# ----- 4: resume stays bit-exact with live guard statistics ----------------------------------------


def test_resume_with_guard_state_is_bit_exact(tmp_path: Path, synth_cache: Path) -> None:
    """6 steps straight == 3 steps, then a new trainer told 6 resumes. min_lr = 1 (the floor of the LR
    multiplier) keeps the LR a constant that does not depend on train_num_steps (the first part is
    told 3); samples at step 3 in both, so both do the same work around that checkpoint."""
    common = (*FAST, "guard.clip.mode=zscore", "guard.clip.warmup=3", "guard.loss.warmup=3",
              "trainer.min_lr=1.0", "trainer.save_and_sample_every=3", "checkpoint.every=3")
    straight, split = tmp_path / "straight", tmp_path / "split"

    fit(build_config(tiny_raw(straight, synth_cache), [*common, "trainer.train_num_steps=6"]))
    fit(build_config(tiny_raw(split, synth_cache), [*common, "trainer.train_num_steps=3"]))
    assert steps(split) == [3]
    resumed = fit(build_config(tiny_raw(split, synth_cache), [*common, "trainer.train_num_steps=6"]))

    assert [e["step"] for e in events(split, "resumed")] == [3] and resumed.state.step == 6
    assert steps(straight) == steps(split) == [3, 6]
    for step in (3, 6):
        a, b = read_shared(step_folder(straight, step)), read_shared(step_folder(split, step))
        for part in ("model", "optimizer", "ema", "guard", "train_state", "data"):
            assert tensor_equal_trees(a[part], b[part]), f"step {step}: {part} differs"
    guard = read_shared(step_folder(split, 6))["guard"]
    assert guard["clip"]["count"] == 6 > 3 and guard["losses"]["count"] == 6 > 3, "past both warm-ups"
    assert guard["counts"]["steps_skipped"] == 0


# ----- 5: a checkpoint from before the guards -------------------------------------------------------


def test_checkpoint_without_guard_component_resumes_with_counters_from_zero(
        tmp_path: Path, synth_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    results = tmp_path / "run"
    base = (*FAST, "trainer.log_freq=1")
    fit(build_config(tiny_raw(results, synth_cache), [*base, "trainer.train_num_steps=2"]))
    ckpt = step_folder(results, 2)
    saved = read_component(ckpt, "guard")
    assert saved["counts"]["grads_clipped"] == 2 and saved["clip"]["count"] == 2, \
        "the removed state holds counts a resume would otherwise carry on from"
    raw = read_manifest(ckpt)
    for name in ("guard.json", "guard.safetensors"):
        (ckpt / name).unlink()
        del raw["files"][name]
    write_manifest(ckpt, raw)

    with caplog.at_level("WARNING", logger="radiodiff_resume"):
        trainer = fit(build_config(tiny_raw(results, synth_cache), [*base, "trainer.train_num_steps=4"]))

    no_quarantine(results)
    assert fields(events(results, "resumed"), "step", "levels") == [
        {"step": 2, "levels": "structure ok, finite ok, scale_factor ok, keys ok, probe ok"}]
    warnings = [r.getMessage() for r in caplog.records if "has no guard state" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("ldm: the checkpoint has no guard state"), warnings
    assert trainer.state.step == 4 and steps(results) == [2, 4]
    # Counted afresh from the resume: only steps 3 and 4 are in the statistics and counters.
    records = [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]
    norms = {r["step"]: r["grad_norm"] for r in records if "grad_norm" in r and r["step"] > 2}
    assert sorted(norms) == [3, 4]
    clipped = sum(1 for n in norms.values() if n > 1.0)  # trainer.max_grad_norm
    guard = read_component(step_folder(results, 4), "guard")
    assert guard["clip"]["count"] == 2 and guard["losses"]["count"] == 2
    assert guard["counts"] == {**dict.fromkeys(COUNTERS, 0), "grads_clipped": clipped}
    assert trainer.guard.counts == guard["counts"]


# ----- 6: two processes ------------------------------------------------------------------------------


def launch_two(tmp_path: Path, big_root: Path, unet: dict[str, tp.Any], train: dict[str, tp.Any],
               trainer: dict[str, tp.Any] | None = None) -> tuple[Path, list[dict[str, tp.Any]]]:
    """A 6-step run of two processes (``tests/trainer/dist_train.py``) with the fault plug-ins (and
    ``trainer`` settings); the results folder and each rank's digest of its final model state and EMA."""
    results = tmp_path / "run"
    raw = raw_config(results, big_root.parent, FAULTY_UNET, **unet)
    raw["data"]["synthetic"].update(BIG)
    common = {"root": str(big_root), **SPLIT}
    raw["data"]["train"] = {"target": FAULTY_MAPS, "params": {**common, "split": "train", **train}}
    raw["data"]["validation"] = {"target": FAULTY_MAPS, "params": {**common, "split": "val"}}
    raw["trainer"].update(val_batches=0, num_sample_images=1, **(trainer or {}))
    raw["data"].update(batch_size=None, batch_size_per_process=BATCH)  # BATCH on each rank
    raw["checkpoint"] = {"every": 3}
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    write_random_first_stage(build_config(raw))
    out = tmp_path / "out"
    out.mkdir()

    proc = accelerate_launch(str(REPO / "tests" / "trainer" / "dist_train.py"), str(cfg), str(out))

    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert events(results, "rolled_back") == [] and events(results, "halted") == []
    assert steps(results) == [3, 6]
    assert_checkpoints_finite(results)
    assert ranks[0]["model"] == ranks[1]["model"], "ranks end with different weights or buffers"
    assert ranks[0]["ema"] == ranks[1]["ema"]
    return results, ranks


@pytest.mark.slow
def test_two_processes_skip_the_step_of_one_ranks_nan_gradient_together(
        tmp_path: Path, big_root: Path) -> None:
    """Rank 1's 5th training forward gives a NaN gradient; DDP's all-reduce puts it into both
    ranks' gradients, so both skip step 5 and stay identical."""
    results, _ = launch_two(tmp_path, big_root, {"nan_grad_at": [5], "only_rank": 1}, {})

    assert fields(events(results, "step_skipped"), "step", "rank", "reason", "grad_norm") == [
        {"step": 5, "rank": 0, "reason": "grads", "grad_norm": "nan"}]
    assert events(results, "batch_skipped") == []
    final = read_shared(step_folder(results, 6))
    assert final["guard"]["counts"]["steps_skipped"] == 1
    assert final["train_state"] == {"step": 6, "samples_seen": 7 * 2 * BATCH}


def tracked(results: Path) -> int:
    """Forwards the final checkpoint's first BatchNorm counted (rank 0's statistics, which are saved)."""
    return int(read_shared(step_folder(results, 6))["model"][f"{BN}.num_batches_tracked"])


@pytest.mark.slow
def test_two_processes_name_a_nan_sample_under_its_rank(tmp_path: Path, big_root: Path) -> None:
    """A NaN image met once, in rank 1's micro-batch of step 3: that micro-batch is left out, rank 0's
    counts and the step is taken; rank 0's event names the sample under rank 1. Running statistics are
    put back on every rank, rank 0 included (its statistics are the ones DDP broadcasts and that
    would carry a rejected batch where ranks share them, as with SyncBatchNorm): 5 forwards counted."""
    # Each rank's batches at the 6 steps; the bad sample is one of rank 1's at step 3 that no rank
    # meets at any other step.
    streams = [BatchStream(range(32), BATCH, rank=r, world_size=2) for r in (0, 1)]
    per_epoch = streams[0].batches_per_epoch
    calls = [[s.rank_batches(c // per_epoch)[c % per_epoch] for s in streams] for c in range(6)]
    bad = next(i for i in calls[2][1] if sum(i in batch for call in calls for batch in call) == 1)

    results, _ = launch_two(tmp_path, big_root, {}, {"nan_image": [bad]})

    name = RadioMapSeer(big_root, "train", **SPLIT)[bad]["name"]
    assert fields(events(results, "batch_skipped"), "step", "rank", "micro_batches", "samples") == [
        {"step": 3, "rank": 0, "micro_batches": 1, "samples": {"rank 1": [name]}}]
    assert events(results, "step_skipped") == []
    final = read_shared(step_folder(results, 6))
    assert final["guard"]["counts"]["batches_skipped"] == 1 and final["guard"]["counts"]["steps_skipped"] == 0
    assert final["train_state"] == {"step": 6, "samples_seen": 6 * 2 * BATCH}
    assert tracked(results) == 6 - 1


@pytest.mark.slow
def test_two_processes_put_back_the_statistics_of_a_micro_batch_rejected_on_one_rank_together(
        tmp_path: Path, big_root: Path) -> None:
    """Two micro-batches per step: a NaN image that only rank 1 ever meets, in micro-batches 3, 8 and 10
    of the run (the first micro-batch of step 2: put back before the next forward, after a small
    all-reduce of the flag; the second of steps 4 and 5: the flag rides on the step's all-reduce).
    Every rank puts those statistics back: 12 forwards, 9 counted (rank 0 alone would count 12)."""
    streams = [BatchStream(range(32), BATCH, rank=r, world_size=2) for r in (0, 1)]
    per_epoch = streams[0].batches_per_epoch
    calls = [[s.rank_batches(c // per_epoch)[c % per_epoch] for s in streams] for c in range(12)]
    bad = 11
    assert [(c, r) for c in range(12) for r in (0, 1) if bad in calls[c][r]] == [(2, 1), (7, 1), (9, 1)]

    results, _ = launch_two(tmp_path, big_root, {}, {"nan_image": [bad]}, {"gradient_accumulate_every": 2})

    name = RadioMapSeer(big_root, "train", **SPLIT)[bad]["name"]
    assert fields(events(results, "batch_skipped"), "step", "micro_batches", "samples") == [
        {"step": step, "micro_batches": 1, "samples": {"rank 1": [name]}} for step in (2, 4, 5)]
    assert events(results, "step_skipped") == []
    assert tracked(results) == 12 - 3


# ----- library bugs found while writing these tests ---------------------------------------------


def test_checkpoints_after_a_rollback_verify_and_samples_seen_keeps_counting(
        tmp_path: Path, big_root: Path) -> None:
    """BUG (radiodiff_resume/trainer/rollback.py, ``Rollback.roll_back``): the rollback keeps the data
    stream's position (skip_batches null) but ``train_state.samples_seen`` comes back from the
    checkpoint, so it stops counting the samples consumed. A later checkpoint then records a data
    offset ahead of samples_seen, which the verifier calls damage (verify.py ``_content_problems``:
    ``data: needs ... 0 <= offset <= train_state.samples_seen``): the checkpoints the run commits
    after its rollback are quarantined on the next resume."""
    results = tmp_path / "run"
    raw = raw_config(results, big_root.parent, POISONED, poison_at=[2])
    raw["data"]["synthetic"].update(BIG)
    trainer = fit(build_config(raw, [*FAST, "trainer.train_num_steps=3", "checkpoint.every=1",
                                     "guard.norm_stats.check_every=1"]))

    assert fields(events(results, "rolled_back"), "step", "to_step") == [{"step": 2, "to_step": 1}]
    assert steps(results) == [1, 2, 3]
    calls = tp.cast(PoisonedUNet, trainer.ldm.unet).training_calls
    assert calls == 4 and trainer.train_stream.state_dict() == {"epoch": 0, "offset": calls * BATCH}
    problems = {}
    for name in committed(results):
        try:
            open_checkpoint(results / "checkpoints" / name, "ldm")
        except CheckpointCorrupt as exc:
            problems[name] = str(exc)
    assert problems == {}, "committed checkpoints that do not verify"
    assert trainer.state.samples_seen == calls * BATCH, (
        f"samples_seen {trainer.state.samples_seen} after {calls} batches of {BATCH} were consumed")
