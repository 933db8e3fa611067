"""The probe runs on the inputs its checkpoint stores, however many samples they hold: a checkpoint
written when the probe took two validation maps still verifies and resumes now that it takes one.
The twin a background save probes with computes what the module would, from the snapshot's memory."""

from __future__ import annotations

import typing as tp

import pytest

from radiodiff_resume.checkpoint.verify import open_checkpoint
from radiodiff_resume.config import Config
from radiodiff_resume.trainer import probe
from tests.checkpoint.helpers import FAST, STEP2, build, committed
from tests.conftest import write_random_first_stage


def probe_maps(ckpt: tp.Any) -> int:
    return int(open_checkpoint(ckpt, "ldm").shared["probe"]["cond"].shape[0])


def test_a_checkpoint_probed_on_two_maps_still_verifies(make_cfg: tp.Callable[..., Config],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(*FAST, "trainer.train_num_steps=2", "checkpoint.every=2")
    write_random_first_stage(cfg)
    with monkeypatch.context() as before:
        before.setattr(probe, "PROBE_SAMPLES", 2)
        build(cfg).fit()
    ckpt = cfg.results_folder / "checkpoints" / STEP2
    assert committed(cfg.results_folder) == [STEP2] and probe_maps(ckpt) == 2

    trainer = build(cfg)
    report = trainer.checkpointer.verify_and_load(ckpt)
    assert report.ok, report
    assert trainer.state.step == 2
    assert probe.PROBE_SAMPLES == 1 and probe_maps(ckpt) == 2


def test_the_twin_probes_a_snapshot_as_the_module_would(make_cfg: tp.Callable[..., Config]) -> None:
    """What a background save's writer computes (``probe_later``) is what the module gives once it holds
    the snapshot, bit for bit, from the snapshot's own memory and never from the training module's."""
    cfg = make_cfg(*FAST)
    write_random_first_stage(cfg)
    trainer = build(cfg)
    if trainer.accelerator.device.type != "cpu":
        pytest.skip("the twin serves CPU runs (a GPU run enqueues the probe on its stream)")
    inputs = trainer.probe_inputs()
    probe_of = trainer.probe_later()
    snapshot = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
    assert float(probe_of(snapshot, inputs)) == float(trainer.probe_value(inputs))

    twin = trainer.probe.twin(trainer.unwrapped)
    held = twin.state_dict()
    assert all(held[k].data_ptr() == v.data_ptr() for k, v in snapshot.items()), "the twin copied"
    live = {v.data_ptr() for v in trainer.unwrapped.state_dict().values() if v.numel()}
    assert not live & {v.data_ptr() for v in held.values() if v.numel()}, "the twin shares the module"

    changed = {k: v + 0.01 if v.is_floating_point() else v for k, v in snapshot.items()}
    value = float(probe_of(changed, inputs))
    assert value != float(trainer.probe_value(inputs)), "the change moved nothing"
    trainer.unwrapped.load_state_dict(changed)
    assert value == float(trainer.probe_value(inputs))
