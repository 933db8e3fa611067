"""One real fault per run, injected through the plug-in points a user has (``data.train`` /
``data.validation`` = :class:`tests.guard.faults.FaultyMaps`, ``model.unet`` =
:class:`tests.guard.faults.FaultyUNet`), in single-process in-process runs (``build_ldm_trainer`` +
``fit``). Each test asserts the exact guard action (events, counters), that the run completes,
that no committed checkpoint holds a non-finite value and, where meaningful, that the final loss
stays near a clean run's.

Instrumentation, not mocking: ``train_step`` is wrapped to copy the state around each call (running
statistics, parameters, optimizer state, LR schedule, EMA, loss scale); the call itself is the
trainer's own.

The data faults use a 32-sample training set (8 batches of 4 per epoch), so a run of 6 steps plus
at most two skipped steps stays in epoch 0 and the bad sample is met exactly once, at a batch
chosen from the stream's own epoch order.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from radiodiff_resume.config import Config, build_config
from radiodiff_resume.data.radiomapseer import RadioMapSeer
from radiodiff_resume.data.stream import epoch_order
from radiodiff_resume.data.synthetic import ensure_synthetic
from radiodiff_resume.errors import ConfigError, UserError
from radiodiff_resume.guard.policy import COUNTERS, GuardHalt, StepOutcome
from radiodiff_resume.run import (
    build_ldm_trainer,
    ldm_trainer,
    load_data,
    make_accelerator,
    ready_first_stage,
)
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer
from tests.checkpoint.helpers import FAST, committed, events, read_shared, tensor_equal_trees, torch_threads
from tests.conftest import tiny_raw, write_random_first_stage

STEPS = 6
BATCH = 4
BIG = {"num_maps": 12, "tx_per_map": 4}
"""Synthetic set with 32 training samples (8 batches per epoch) and 16 validation samples."""
SPLIT = {"image_size": 32, "val_fraction": 0.34}
STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")

LOSS_RTOL = 0.5
"""Final-loss tolerance against the clean run (relative). The logged loss is the mean of the last
two steps' losses on 4-sample batches at random timesteps; in the clean run it moves by up to 25%
from one log to the next (1.08 -> 1.02 -> 0.87), and a skipped step shifts which batches and
timesteps the last steps see. 0.5 admits that noise and still catches a run the fault derailed (a
NaN, or a loss several times the clean one)."""


# ----- set-up ----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> tp.Iterator[None]:
    """One intra-op thread (the shared 2-core machine; also fixes the floats runs compare)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("synth32"), seed=0, size=64, **BIG)


@pytest.fixture(scope="module")
def order(root: Path) -> list[int]:
    """Epoch 0's order of training indices: batch ``b`` is ``order[4b:4b+4]``, met at step ``b+1``
    when no step before it was skipped."""
    n = len(RadioMapSeer(root, "train", **SPLIT))
    assert n == 32
    return tp.cast(list[int], epoch_order(n, 0, 0).tolist())


def sample_name(root: Path, index: int) -> str:
    return tp.cast(str, RadioMapSeer(root, "train", **SPLIT)[index]["name"])


def faulty_cfg(results: Path, root: Path, *overrides: str, train: dict[str, tp.Any] | None = None,
               unet: dict[str, tp.Any] | None = None) -> Config:
    """The tiny config with the fault plug-ins in place (no faults unless ``train`` / ``unet`` say)."""
    raw = tiny_raw(results, root.parent)
    raw["data"]["synthetic"].update(BIG)
    common = {"root": str(root), **SPLIT}
    raw["data"]["train"] = {"target": "tests.guard.faults.FaultyMaps",
                            "params": {**common, "split": "train", **(train or {})}}
    raw["data"]["validation"] = {"target": "tests.guard.faults.FaultyMaps",
                                 "params": {**common, "split": "val"}}
    raw["model"]["unet"]["target"] = "tests.guard.faults.FaultyUNet"
    raw["model"]["unet"]["params"].update(unet or {})
    return build_config(raw, [*FAST, *overrides])


# ----- running and recording -------------------------------------------------------


def stats_of(trainer: LatentDiffusionTrainer) -> list[torch.Tensor]:
    """Copies of every running statistic of the model (the condition encoder's BatchNorms)."""
    return [b.detach().clone() for n, b in trainer.ldm.named_buffers() if n.rsplit(".", 1)[-1] in STAT_NAMES]


def snapshot(trainer: LatentDiffusionTrainer) -> dict[str, tp.Any]:
    scaler = trainer.accelerator.scaler
    ema = trainer.ema
    assert ema is not None
    return {
        "stats": stats_of(trainer),
        "params": [p.detach().clone() for p in trainer.params],
        "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"]),
        "lr_epoch": trainer.lr_schedule.last_epoch,
        "ema_step": ema.optimization_step,
        "ema": [s.detach().clone() for s in ema.shadow_params],
        "scale": None if scaler is None else scaler.get_scale(),
    }


@dataclass
class Call:
    """One ``train_step``: the step counter before it, what it returned, the state around it."""

    step: int
    outcome: StepOutcome
    before: dict[str, tp.Any]
    after: dict[str, tp.Any]


@dataclass
class Run:
    trainer: LatentDiffusionTrainer
    calls: list[Call]
    results: Path

    def events(self, name: str) -> list[dict[str, tp.Any]]:
        return events(self.results, name)

    @property
    def stepped(self) -> list[Call]:
        return [c for c in self.calls if c.outcome.stepped]

    @property
    def skipped(self) -> list[Call]:
        return [c for c in self.calls if not c.outcome.stepped]

    def last_loss(self) -> float:
        records = [json.loads(line) for line in (self.results / "metrics.jsonl").read_text().splitlines()]
        return float([r["loss"] for r in records if "loss" in r][-1])


def train(cfg: Config, accelerator: Accelerator | None = None) -> Run:
    """Build, record every ``train_step``, fit; check completion and every committed checkpoint."""
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, accelerator or make_accelerator(cfg))
    calls: list[Call] = []
    step = trainer.train_step

    def recorded() -> StepOutcome:
        at, before = trainer.state.step, snapshot(trainer)
        outcome = step()
        calls.append(Call(at, outcome, before, snapshot(trainer)))
        return outcome

    trainer.train_step = recorded  # type: ignore[method-assign]
    trainer.fit()
    assert trainer.state.step == cfg.trainer.train_num_steps
    assert len([c for c in calls if c.outcome.stepped]) == cfg.trainer.train_num_steps
    assert_checkpoints_finite(cfg.results_folder)
    return Run(trainer, calls, cfg.results_folder)


def values_in(tree: tp.Any, path: str = "") -> tp.Iterator[tuple[str, tp.Any]]:
    """``(path, value)`` of every tensor and float in a state tree."""
    if isinstance(tree, torch.Tensor) or isinstance(tree, float):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from values_in(v, f"{path}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from values_in(v, f"{path}/{i}")


def nonfinite(value: tp.Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    return not math.isfinite(value)


def assert_checkpoints_finite(results: Path) -> None:
    """Every committed checkpoint, read and verified as a resume would, holds only finite floats."""
    names = committed(results)
    assert names, "the run committed no checkpoint"
    for name in names:
        values = list(values_in(read_shared(results / "checkpoints" / name)))
        floating = [p for p, v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]
        assert len(floating) > 100, f"{name}: only {len(floating)} floating tensors read"
        bad = [p for p, v in values if nonfinite(v)]
        assert not bad, f"{name}: non-finite values at {bad}"


def fields(records: list[dict[str, tp.Any]], *keys: str) -> list[dict[str, tp.Any]]:
    return [{k: r[k] for k in keys} for r in records]


def expected_counts(run: Run, **nonzero: int) -> dict[str, int]:
    """The guard counters a run must end with: ``nonzero`` as given, ``grads_clipped`` = stepped
    steps whose gradient norm exceeded ``trainer.max_grad_norm`` (1.0; no z-score clipping before
    its 25-step warm-up), everything else 0."""
    limit = run.trainer.loop.max_grad_norm
    assert limit is not None
    clipped = sum(1 for c in run.stepped if tp.cast(float, c.outcome.grad_norm) > limit)
    return {k: 0 for k in COUNTERS} | {"grads_clipped": clipped} | nonzero


def equal_lists(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def assert_untouched(call: Call, stats: bool = True) -> None:
    """A skipped step moved nothing: weights, optimizer state, LR schedule, EMA and (``stats``: with
    guards on) running statistics."""
    before, after = call.before, call.after
    if stats:
        assert equal_lists(before["stats"], after["stats"]), "running statistics changed by a skipped step"
    assert equal_lists(before["params"], after["params"]), "weights changed by a skipped step"
    assert tensor_equal_trees(before["optimizer"], after["optimizer"]), "optimizer state changed"
    assert after["lr_epoch"] == before["lr_epoch"], "LR schedule advanced on a skipped step"
    assert after["ema_step"] == before["ema_step"], "EMA advanced on a skipped step"
    assert equal_lists(before["ema"], after["ema"]), "EMA weights changed by a skipped step"


def assert_moved(call: Call) -> None:
    """A taken step moved the statistics and the weights (so :func:`assert_untouched` can fail)."""
    assert not equal_lists(call.before["stats"], call.after["stats"])
    assert not equal_lists(call.before["params"], call.after["params"])
    assert call.after["lr_epoch"] == call.before["lr_epoch"] + 1
    assert call.after["ema_step"] == call.before["ema_step"] + 1


def assert_advanced_only_when_stepped(run: Run) -> None:
    """LR schedule, EMA and AdamW step counts equal the steps taken; each call moved everything
    (taken) or nothing (skipped; running statistics only where guards are on: the plain loop
    does not claim to put them back)."""
    trainer = run.trainer
    steps = trainer.loop.train_num_steps
    assert trainer.ema is not None
    assert trainer.lr_schedule.last_epoch == trainer.state.step == steps
    assert trainer.ema.optimization_step == steps
    adam = trainer.optimizer.state_dict()["state"]
    assert adam and {int(s["step"]) for s in adam.values()} == {steps}
    for call in run.calls:
        if call.outcome.stepped:
            assert_moved(call)
        else:
            assert_untouched(call, stats=trainer.guard.enabled)


def assert_loss_near(run: Run, clean: Run) -> None:
    faulty, reference = run.last_loss(), clean.last_loss()
    assert math.isfinite(faulty)
    assert abs(faulty - reference) <= LOSS_RTOL * reference, (faulty, reference)


@pytest.fixture(scope="module")
def clean(root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Run:
    """The same config and plug-ins without a fault."""
    run = train(faulty_cfg(tmp_path_factory.mktemp("clean") / "run", root))
    assert run.skipped == [] and run.events("step_skipped") == []
    return run


# ----- bad data --------------------------------------------------------------------


def test_nan_pixel_in_the_first_batch_is_left_out_by_name(
        root: Path, order: list[int], clean: Run, tmp_path: Path) -> None:
    bad = order[0]  # in the first batch: the one scale_by_std measures, and step 1's
    cfg = faulty_cfg(tmp_path / "run", root, train={"nan_image": [bad]})
    run = train(cfg)

    assert bad in run.trainer.train_stream.rank_batches(0)[0]
    name = sample_name(root, bad)
    assert fields(run.events("batch_skipped"), "step", "micro_batches", "samples") == [
        {"step": 1, "micro_batches": 1, "samples": {"rank 0": [name]}}]
    assert fields(run.events("step_skipped"), "step", "reason", "loss", "consecutive") == [
        {"step": 1, "reason": "batch", "loss": None, "consecutive": 1}]
    assert run.trainer.guard.counts == expected_counts(run, batches_skipped=1, steps_skipped=1)
    assert [c.step for c in run.skipped] == [0] and len(run.calls) == STEPS + 1
    assert_advanced_only_when_stepped(run)  # incl. BatchNorm statistics put back after the skip
    scale = float(run.trainer.ldm.scale_factor)
    assert math.isfinite(scale) and scale > 0 and scale != cfg.model.scale_factor, scale
    assert_loss_near(run, clean)


def test_inf_condition_is_left_out_and_batchnorm_statistics_stay_clean(
        root: Path, order: list[int], clean: Run, tmp_path: Path) -> None:
    bad = order[2 * BATCH]  # batch 2: met at step 3
    run = train(faulty_cfg(tmp_path / "run", root, train={"inf_cond": [bad]}))

    assert bad in run.trainer.train_stream.rank_batches(0)[2]
    assert fields(run.events("batch_skipped"), "step", "micro_batches", "samples") == [
        {"step": 3, "micro_batches": 1, "samples": {"rank 0": [sample_name(root, bad)]}}]
    assert fields(run.events("step_skipped"), "step", "reason") == [{"step": 3, "reason": "batch"}]
    assert run.events("bn_repaired") == []
    assert run.trainer.guard.counts == expected_counts(run, batches_skipped=1, steps_skipped=1)
    assert [c.step for c in run.skipped] == [2]
    assert_advanced_only_when_stepped(run)  # the rejected forward's statistics were put back
    stats = stats_of(run.trainer)
    assert stats and all(torch.isfinite(s.float()).all() for s in stats)
    assert_loss_near(run, clean)


def test_a_bad_micro_batch_is_left_out_whole_and_the_step_taken(
        root: Path, order: list[int], tmp_path: Path) -> None:
    """Two micro-batches per step: the one with the NaN pixel (batch 1, step 1's second) adds no
    gradient and no running statistics, the other one steps. BatchNorm counts the forwards whose
    statistics it kept: 2 per step, 1 for step 1."""
    bad = order[BATCH]
    cfg = faulty_cfg(tmp_path / "run", root, "trainer.gradient_accumulate_every=2",
                     "trainer.train_num_steps=3", train={"nan_image": [bad]})
    run = train(cfg)

    assert bad in run.trainer.train_stream.rank_batches(0)[1]
    assert fields(run.events("batch_skipped"), "step", "micro_batches", "samples") == [
        {"step": 1, "micro_batches": 1, "samples": {"rank 0": [sample_name(root, bad)]}}]
    assert run.events("step_skipped") == [] and run.skipped == [] and len(run.calls) == 3
    assert run.trainer.guard.counts == expected_counts(run, batches_skipped=1)
    assert_advanced_only_when_stepped(run)
    tracked = [int(m.num_batches_tracked) for m in run.trainer.ldm.modules()
               if isinstance(m, torch.nn.BatchNorm2d)]
    assert tracked and set(tracked) == {2 * 3 - 1}, tracked


def test_image_scaled_a_millionfold_is_absorbed_when_the_input_bound_is_off(
        root: Path, order: list[int], clean: Run, tmp_path: Path) -> None:
    """Found out, not assumed: with ``guard.max_abs_input: null`` the image reaches the first stage,
    whose GroupNorm normalises the 1e6 away, so the latent, the loss and the gradients barely move
    and no guard acts (no spike with the window warm, no clip beyond the usual ``max_grad_norm``);
    that step's loss differs from the clean run's only in the last digits. (A condition scaled so
    is another matter: see the next test.)"""
    bad = order[4 * BATCH]  # batch 4: met at step 5, after the 3-loss warm-up of the spike window
    run = train(faulty_cfg(tmp_path / "run", root, "guard.loss.warmup=3", "guard.max_abs_input=null",
                           train={"scaled": [bad]}))

    assert bad in run.trainer.train_stream.rank_batches(0)[4]
    assert run.calls[4].step == 4 > run.trainer.guard.cfg.loss.warmup, "spike detection was on at step 5"
    for name in ("step_skipped", "batch_skipped", "grad_clipped", "grads_scrubbed", "bn_repaired"):
        assert run.events(name) == [], name
    assert run.trainer.guard.counts == expected_counts(run) == clean.trainer.guard.counts
    losses = [float(c.outcome.loss) for c in run.calls]
    reference = [float(c.outcome.loss) for c in clean.calls]
    assert losses[:4] == reference[:4], "identical until the scaled batch"
    assert losses[4] != reference[4], "the scaled batch reached the model"
    assert abs(losses[4] - reference[4]) <= 1e-3 * reference[4], (losses[4], reference[4])
    assert_loss_near(run, clean)


def cond_running_var(trainer: LatentDiffusionTrainer) -> torch.Tensor:
    """The running variance of the condition encoder's first BatchNorm (the condition's first stop)."""
    return tp.cast(torch.Tensor, trainer.ldm.cond_encoder.net[1].running_var).clone()


@pytest.mark.parametrize("bound", ["default", "null"])
def test_a_condition_scaled_a_millionfold_is_left_out_and_batchnorm_statistics_stay_sane(
        root: Path, order: list[int], clean: Run, tmp_path: Path, bound: str) -> None:
    """Large but finite: the condition times 1e6 goes straight into the condition encoder's
    BatchNorm. Past ``guard.max_abs_input`` (1e4 by default) its sample is left out and named, as a
    NaN one is, and the running statistics never see it. With the bound off (``null``) the same batch
    is taken as a normal step and the running variance jumps by orders of magnitude (the field
    report: 0.66 to 2.6e10), wrong in every eval-mode forward that follows: the fault is real."""
    bad = order[2 * BATCH]  # batch 2: met at step 3
    overrides = () if bound == "default" else ("guard.max_abs_input=null",)
    run = train(faulty_cfg(tmp_path / "run", root, *overrides, train={"scaled_cond": [bad]}))

    assert bad in run.trainer.train_stream.rank_batches(0)[2]
    variance, reference = cond_running_var(run.trainer), cond_running_var(clean.trainer)
    assert torch.isfinite(variance).all()
    if bound == "null":
        assert run.events("batch_skipped") == [] and run.skipped == []
        assert variance.max() > 1e6 * reference.max(), (variance.max(), reference.max())
        return
    name = sample_name(root, bad)
    assert fields(run.events("batch_skipped"), "step", "micro_batches", "samples", "too_large") == [
        {"step": 3, "micro_batches": 1, "samples": {"rank 0": [name]}, "too_large": {"rank 0": [name]}}]
    assert fields(run.events("step_skipped"), "step", "reason") == [{"step": 3, "reason": "batch"}]
    assert run.trainer.guard.counts == expected_counts(run, batches_skipped=1, steps_skipped=1)
    assert_advanced_only_when_stepped(run)  # the rejected forward's statistics were put back
    assert variance.max() < 10 * reference.max(), (variance.max(), reference.max())
    assert_loss_near(run, clean)
    assert run.trainer.guard.cfg.max_abs_input == 1e4, "the default bound did it"


def test_a_nan_sample_is_not_called_too_large(root: Path, order: list[int], tmp_path: Path) -> None:
    """The event tells the two causes apart: a NaN sample is in ``samples`` only."""
    bad = order[0]
    run = train(faulty_cfg(tmp_path / "run", root, "trainer.train_num_steps=2", train={"nan_image": [bad]}))
    assert fields(run.events("batch_skipped"), "samples", "too_large") == [
        {"samples": {"rank 0": [sample_name(root, bad)]}, "too_large": {}}]


# ----- bad losses and gradients ------------------------------------------------------


def test_inf_loss_skips_the_step(root: Path, clean: Run, tmp_path: Path) -> None:
    run = train(faulty_cfg(tmp_path / "run", root, unet={"inf_loss_at": [3]}))

    assert fields(run.events("step_skipped"), "step", "reason", "loss", "grad_norm") == [
        {"step": 3, "reason": "loss", "loss": None, "grad_norm": "nan"}]
    assert run.events("batch_skipped") == []
    assert run.trainer.guard.counts == expected_counts(run, steps_skipped=1)
    assert [c.step for c in run.skipped] == [2]
    assert_advanced_only_when_stepped(run)
    assert_loss_near(run, clean)


def test_loss_spike_skips_the_step_and_stays_out_of_the_window(
        root: Path, clean: Run, tmp_path: Path) -> None:
    run = train(faulty_cfg(tmp_path / "run", root, "guard.loss.warmup=3", unet={"spike_at": [5]}))

    (event,) = run.events("step_skipped")
    assert (event["step"], event["reason"]) == (5, "spike")
    spike = float(run.skipped[0].outcome.loss)
    assert event["loss"] == spike and spike > 1e3 * max(float(c.outcome.loss) for c in run.stepped)
    assert run.trainer.guard.counts == expected_counts(run, steps_skipped=1)
    window = run.trainer.guard.losses
    assert window.count == STEPS
    assert torch.equal(window.values[:STEPS], torch.stack([c.outcome.loss for c in run.stepped]).float()), \
        "the window holds exactly the losses of the steps taken"
    assert_advanced_only_when_stepped(run)
    assert_loss_near(run, clean)


@pytest.mark.parametrize("interrupted", [False, True], ids=["spikes-only", "inf-loss-between"])
def test_a_lasting_loss_level_change_with_healthy_gradients_is_accepted(
        root: Path, tmp_path: Path, interrupted: bool) -> None:
    """From the 5th forward on the denoiser's output is shifted: the loss rises about tenfold and stays
    there, the gradients stay finite and unclipped (no ``max_grad_norm``, z-score clipping still in
    its warm-up). Each step at the new level is a spike against the old window, so only skips would
    follow (20 in a row, a rollback, a halt); instead the 10th spike in a row
    (``guard.loss.rebaseline_after``) refills the window with the 10 skipped losses and training goes
    on at the new level. ``inf-loss-between``: the 7th forward's loss is Inf, a skip of another kind,
    and the count of spikes in a row starts over after it."""
    unet: dict[str, tp.Any] = {"shift_from": 5, "inf_loss_at": [7] if interrupted else []}
    cfg = faulty_cfg(tmp_path / "run", root, "guard.loss.warmup=3", "trainer.max_grad_norm=null",
                     "trainer.train_num_steps=8", unet=unet)
    after = 10  # guard.loss.rebaseline_after, by default (asserted last)
    run = train(cfg)

    skips = run.events("step_skipped")
    reasons = ["spike", "spike", "loss"] if interrupted else []
    reasons += ["spike"] * after
    assert fields(skips, "step", "reason", "consecutive") == [
        {"step": 5, "reason": reason, "consecutive": n} for n, reason in enumerate(reasons, 1)]
    assert all(math.isfinite(e["grad_norm"]) for e in skips if e["reason"] == "spike"), "healthy gradients"
    spikes = [e["loss"] for e in skips[-after:]]
    assert min(spikes) > 5 * max(float(c.outcome.loss) for c in run.stepped[:4]), "a new level, for good"
    (rebased,) = run.events("loss_rebaselined")
    assert (rebased["step"], rebased["spikes"]) == (5, after)
    assert rebased["level"] == pytest.approx(sum(spikes) / after, rel=1e-6)
    assert [c.step for c in run.skipped] == [4] * len(reasons) and len(run.calls) == 8 + len(reasons)
    assert run.events("rolled_back") == [] and run.events("halted") == []
    window = run.trainer.guard.losses
    taken = [float(c.outcome.loss) for c in run.stepped[4:]]
    assert window.count == after + 4 and window.spike_run == []
    assert window.values[: window.count].tolist() == pytest.approx(spikes + taken, rel=1e-6), \
        "the skipped losses, then the steps taken at the new level"
    assert_advanced_only_when_stepped(run)
    assert cfg.guard.loss.rebaseline_after == after < cfg.guard.rollback.max_consecutive_skips == 20


@pytest.mark.parametrize(("overrides", "accepts"), [
    # the gradients of the new level are clipped (they exceed max_grad_norm): not healthy
    (("guard.loss.rebaseline_after=2", "trainer.max_grad_norm=1e-3"),
     "accepts a new loss level after 2 spikes in a row with a finite, unclipped gradient norm"),
    (("guard.loss.rebaseline_after=null",),
     "never accepts a new loss level (guard.loss.rebaseline_after is null)"),
    ((), "accepts a new loss level after 10 spikes in a row (guard.loss.rebaseline_after), but rolls back "
         "after 3 (guard.rollback.max_consecutive_skips)"),
], ids=["clipped", "rebaseline-off", "rollback-first"])
def test_a_halt_driven_by_loss_spikes_says_so(root: Path, tmp_path: Path, overrides: tuple[str, ...],
                                              accepts: str) -> None:
    """The loss level changes for good (as in the test above) and three skips in a row call for a
    rollback, with nothing to roll back to: the halt says the skips were all loss spikes and what the
    spike rules are, not the advice for NaN."""
    cfg = faulty_cfg(tmp_path / "run", root, "guard.loss.warmup=3", "guard.rollback.max_consecutive_skips=3",
                     *overrides, unet={"shift_from": 5})
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
    with pytest.raises(GuardHalt) as halted:
        trainer.fit()

    message = str(halted.value)
    assert message.startswith("ldm step 4: 3 optimizer steps skipped in a row, all as loss spikes, and there "
                              "is nothing to roll back to"), message
    assert "each of those losses lay more than guard.loss.spike_zscore=6.0 deviations above the recent ones" \
        in message, message
    assert accepts in message and "raise guard.loss.spike_zscore" in message, message
    assert "mixed_precision=bf16" not in message, "the advice for NaN does not fit a loss level"
    assert fields(events(cfg.results_folder, "halted"), "reason") == [
        {"reason": "3 optimizer steps skipped in a row, all as loss spikes"}]
    assert events(cfg.results_folder, "loss_rebaselined") == []


def test_faithful_profile_takes_the_spike_as_radiodiff_would_and_still_skips_inf(
        root: Path, tmp_path: Path) -> None:
    """``guard.profile: faithful``: the spike that the protective profile skips is a step here, clipped
    only to ``trainer.max_grad_norm``; an Inf loss, which would put NaN into the weights, is still
    skipped."""
    cfg = faulty_cfg(tmp_path / "run", root, "guard.profile=faithful", "guard.loss.warmup=3",
                     unet={"spike_at": [5], "inf_loss_at": [3]})
    assert (cfg.guard.clip.mode, cfg.guard.loss.spike_zscore) == ("fixed", None)
    run = train(cfg)
    assert fields(run.events("step_skipped"), "step", "reason") == [{"step": 3, "reason": "loss"}]
    assert any(float(c.outcome.loss) > 1e3 for c in run.stepped), "the spike was a step"
    assert all(torch.isfinite(p).all() for p in run.trainer.params)


@pytest.mark.parametrize("override", ["guard.clip.mode=agc", "guard.loss.spike_zscore=3"])
def test_faithful_profile_refuses_what_contradicts_it(root: Path, tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError, match=rf"guard\.{override.split('=')[0][6:]}: got .* but "
                                          r"guard\.profile=faithful sets it"):
        faulty_cfg(tmp_path / "run", root, "guard.profile=faithful", override)


def test_nan_gradient_skips_the_step_and_leaves_the_optimizer_untouched(
        root: Path, clean: Run, tmp_path: Path) -> None:
    run = train(faulty_cfg(tmp_path / "run", root, "guard.nonfinite_grads=skip", unet={"nan_grad_at": [3]}))

    (event,) = run.events("step_skipped")
    assert (event["step"], event["reason"], event["grad_norm"]) == (3, "grads", "nan")
    assert isinstance(event["loss"], float) and math.isfinite(event["loss"]), "the loss itself was fine"
    assert run.trainer.guard.counts == expected_counts(run, steps_skipped=1)
    assert [c.step for c in run.skipped] == [2]
    # AdamW step counts, LR schedule and EMA count only the steps taken; the skipped call changed
    # no moment, weight, EMA weight or statistic (assert_untouched compares them bit for bit).
    assert_advanced_only_when_stepped(run)
    assert_loss_near(run, clean)


def test_nan_gradient_is_scrubbed_and_the_step_taken(root: Path, clean: Run, tmp_path: Path) -> None:
    run = train(faulty_cfg(tmp_path / "run", root, "guard.nonfinite_grads=scrub", unet={"nan_grad_at": [3]}))

    assert fields(run.events("grads_scrubbed"), "step") == [{"step": 3}]
    assert run.events("step_skipped") == [] and run.skipped == []
    assert run.trainer.guard.counts["grads_scrubbed"] == 1
    assert run.trainer.guard.counts["steps_skipped"] == 0
    assert_advanced_only_when_stepped(run)
    assert all(torch.isfinite(p).all() for p in run.trainer.params)
    assert run.trainer.ema is not None and all(torch.isfinite(s).all() for s in run.trainer.ema.shadow_params)
    assert_loss_near(run, clean)


# ----- the fp16 loss scaler --------------------------------------------------------

INIT_SCALE = 2.0**120


def scaled_accelerator(init_scale: float = INIT_SCALE) -> Accelerator:
    """A real ``torch.amp.GradScaler("cpu")`` (accelerate makes none on a CPU), by default at a loss
    scale near the fp32 limit, halving on overflow and never growing within these runs."""
    accelerator = Accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=0.5,
                                              growth_interval=1_000_000)
    return accelerator


def scaler_cfg(results: Path, root: Path, *overrides: str) -> Config:
    """The denoiser's output x1e3 on the first two forwards: the loss (~1e5) and the gradients are
    finite in fp32 (before the 20-loss warm-up no spike is detected, so without a scaler both
    steps would be taken), but x 2**120 the gradients overflow, as fp16 ones do at a too-large
    scale. The scale must halve twice; the third forward is clean."""
    return faulty_cfg(results, root, *overrides, unet={"spike_at": [1, 2]})


def assert_scaler_skips(run: Run) -> None:
    assert [c.step for c in run.skipped] == [0, 0] and len(run.calls) == STEPS + 2
    for call in run.calls:
        before, after = call.before["scale"], call.after["scale"]
        assert after == (before / 2 if not call.outcome.stepped else before), (call.step, before, after)
    scaler = run.trainer.accelerator.scaler
    assert scaler is not None and scaler.get_scale() == INIT_SCALE / 4
    assert_advanced_only_when_stepped(run)


def skip_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if "optimizer step skipped" in r.getMessage()]


def test_grad_scaler_overflow_is_routine_skips_backs_off_and_is_not_counted_toward_a_rollback(
        root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two overflows at a loss scale far above 1: routine (reason ``scaler``), logged at INFO, and not
    counted toward ``max_consecutive_skips`` (here 1: counted, the first would roll back, and with no
    checkpoint yet halt the run)."""
    control = train(scaler_cfg(tmp_path / "no-scaler", root))
    assert control.skipped == [], "without the scaler the same forwards step: the overflow is the scaler's"
    with caplog.at_level(logging.INFO, logger="radiodiff_resume"):
        run = train(scaler_cfg(tmp_path / "run", root, "guard.rollback.max_consecutive_skips=1"),
                    scaled_accelerator())

    assert fields(run.events("step_skipped"), "step", "reason", "grad_norm", "consecutive") == [
        {"step": 1, "reason": "scaler", "grad_norm": "nan", "consecutive": 0}] * 2
    assert all(math.isfinite(e["loss"]) for e in run.events("step_skipped")), "the losses were finite"
    assert [c.outcome.reason for c in run.skipped] == ["scaler", "scaler"]
    assert run.events("rolled_back") == [] and run.events("halted") == []
    assert run.trainer.guard.counts == expected_counts(run, steps_skipped=2)
    logs = skip_logs(caplog)
    assert [level for level, _ in logs] == [logging.INFO] * 2, logs
    assert all("routine fp16 loss-scale overflow, not counted" in text for _, text in logs), logs
    assert_scaler_skips(run)


def test_non_finite_gradients_at_a_loss_scale_of_one_are_not_routine(
        root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At a loss scale of 1 the scale explains nothing: a NaN gradient is skipped as ``grads``, a
    WARNING, counted toward a rollback."""
    cfg = faulty_cfg(tmp_path / "run", root, unet={"nan_grad_at": [3]})
    with caplog.at_level(logging.INFO, logger="radiodiff_resume"):
        run = train(cfg, scaled_accelerator(init_scale=1.0))

    assert fields(run.events("step_skipped"), "step", "reason", "consecutive") == [
        {"step": 3, "reason": "grads", "consecutive": 1}]
    assert [level for level, _ in skip_logs(caplog)] == [logging.WARNING]


def test_grad_scaler_overflow_without_guards_does_not_advance(root: Path, tmp_path: Path) -> None:
    # No max_grad_norm here: accelerate unscales before clipping only when its own
    # mixed_precision is fp16, which a CPU Accelerator never is; clipping the still-scaled
    # gradients would shrink every taken step to nothing (an artefact of this CPU set-up only).
    run = train(scaler_cfg(tmp_path / "run", root, "guard.enabled=false", "trainer.max_grad_norm=null"),
                scaled_accelerator())

    assert [c.outcome.reason for c in run.calls] == ["scaler", "scaler"] + [None] * STEPS
    assert run.events("step_skipped") == []
    assert_scaler_skips(run)


# ----- guards that find nothing change nothing ---------------------------------------


def final_state(trainer: LatentDiffusionTrainer) -> dict[str, tp.Any]:
    state = trainer.state_dict()
    assert trainer.ema is not None
    return {"model": state["model"], "optimizer": state["optimizer"]["state"],
            "ema": list(trainer.ema.shadow_params)}


@pytest.mark.parametrize("overrides", [
    # shorter than both warm-ups (clip 25, loss 20): z-score clipping is the fixed ceiling so far
    ("trainer.train_num_steps=6",),
    # past both warm-ups with the fixed clip and no spike detection
    ("trainer.train_num_steps=30", "trainer.save_and_sample_every=30", "guard.clip.mode=fixed",
     "guard.loss.spike_zscore=null"),
], ids=["short", "past-warmups"])
def test_guards_on_a_clean_run_change_nothing(make_cfg: tp.Callable[..., Config], tmp_path: Path,
                                              overrides: tuple[str, ...]) -> None:
    states, trainers = [], []
    for enabled in ("true", "false"):
        cfg = make_cfg(*FAST, *overrides, f"guard.enabled={enabled}", results=tmp_path / enabled)
        write_random_first_stage(cfg)
        trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
        trainer.fit()
        assert trainer.state.step == cfg.trainer.train_num_steps
        states.append(final_state(trainer))
        trainers.append(trainer)
    on, off = states
    guard = trainers[0].guard
    assert guard.enabled and not trainers[1].guard.enabled
    assert guard.counts["grads_clipped"] > 0, "the comparison covers steps clipped by the guard"
    assert guard.counts["steps_skipped"] == 0 and guard.counts["batches_skipped"] == 0
    for part in ("model", "optimizer", "ema"):
        assert tensor_equal_trees(on[part], off[part]), f"{part} differs with guards on"


# ----- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(("override", "key"), [
    ("guard.clip.mode=foo", "guard.clip.mode"),
    ("guard.nonfinite_grads=zero", "guard.nonfinite_grads"),
    ("guard.loss.warmup=0", "guard.loss.warmup"),
    ("guard.max_abs_input=0", "guard.max_abs_input"),
    ("guard.max_abs_input=-5", "guard.max_abs_input"),
    ("guard.max_abs_input=inf", "guard.max_abs_input"),
    ("guard.loss.rebaseline_after=0", "guard.loss.rebaseline_after"),
])
def test_a_bad_guard_value_is_one_config_error_naming_the_key(
        make_cfg: tp.Callable[..., Config], override: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_cfg(override)
    message = str(caught.value)
    assert "1 problem:" in message and f"  - {key}" in message, message
    assert override.split("=", 1)[1] in message, message


# ----- sharded training ----------------------------------------------------------------


@pytest.mark.parametrize(("kind", "name"), [
    (DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed"),
    (DistributedType.MEGATRON_LM, "Megatron-LM")])
def test_sharded_training_is_refused_when_the_trainer_is_built(
        make_cfg: tp.Callable[..., Config], kind: DistributedType, name: str) -> None:
    """accelerate reports a sharded set-up only where one can start (FSDP and Megatron-LM need GPUs,
    DeepSpeed its package): a real Accelerator's shared state is told so here, as ``accelerate
    launch`` would tell it, and the trainer refuses before anything is prepared."""
    cfg = make_cfg(*FAST)
    write_random_first_stage(cfg)
    accelerator = Accelerator(cpu=True)
    train_set, val_set = load_data(cfg, accelerator)
    first_stage = ready_first_stage(cfg, accelerator, train_set, val_set)
    state = accelerator.state
    was = state.distributed_type
    state.distributed_type = kind
    try:
        with pytest.raises(UserError) as refused:
            ldm_trainer(cfg, accelerator, first_stage, train_set, val_set)
    finally:
        state.distributed_type = was
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"ldm: accelerate is set up for {name}, which shards "
                                                       "gradients"), message
    assert "use DDP (`accelerate launch --multi_gpu`" in message, message


# ----- library bugs found while writing these tests ------------------------------------


def test_a_scrubbed_step_reports_the_norm_it_stepped_with(root: Path, tmp_path: Path) -> None:
    """After ``guard.nonfinite_grads=scrub`` the step is taken with the scrubbed gradients, but the
    guard reports the norm from before the scrub (NaN): the step's ``grad_norm`` is NaN (the
    logged mean of its log interval turns null / "invalid") and ``grads_clipped`` counts it as
    clipped, since ``nan <= threshold`` is false (radiodiff_resume/guard/policy.py,
    ``_guarded_step``: ``norm_v`` / ``threshold_v`` are not refreshed after ``_scrub``)."""
    run = train(faulty_cfg(tmp_path / "run", root, "guard.nonfinite_grads=scrub", unet={"nan_grad_at": [3]}))

    scrubbed, others = run.calls[2], run.calls[:2] + run.calls[3:]
    assert run.skipped == [] and fields(run.events("grads_scrubbed"), "step") == [{"step": 3}]
    # Every gradient entry of the poisoned step was NaN, so the scrubbed norm is 0: the z-score
    # clipper's statistics (fed min(norm, threshold) of every step taken) say so.
    norms = [min(tp.cast(float, c.outcome.grad_norm), 1.0) for c in others]
    clipper = run.trainer.guard.clipper
    assert clipper.count == STEPS and float(clipper.mean) == pytest.approx(sum(norms) / STEPS, rel=1e-6)
    clipped = sum(1 for c in others if tp.cast(float, c.outcome.grad_norm) > 1.0)
    assert run.trainer.guard.counts["grads_clipped"] == clipped, (
        "BUG (policy.py _guarded_step): a scrubbed step whose scrubbed norm (0) is under "
        "max_grad_norm is counted in grads_clipped (the pre-scrub NaN norm is compared)")
    assert math.isfinite(tp.cast(float, scrubbed.outcome.grad_norm)), (
        "BUG (policy.py _guarded_step): the StepOutcome of a scrubbed step carries the pre-scrub "
        "NaN norm, so the logged grad_norm of its interval is null")
