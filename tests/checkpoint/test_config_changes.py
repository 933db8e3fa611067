"""A re-run with another config: the checkpoint is probed as it was saved, loop settings take the new
values (and say so), and a change that cannot apply stops with the diff and the override — nothing is
moved in any of these cases."""

from __future__ import annotations

import hashlib
import json
import logging
import typing as tp
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.config import Config
from radiodiff_resume.errors import UserError
from radiodiff_resume.trainer.lr import lr_multiplier
from tests.checkpoint.helpers import STEP4, build, events, hashes, read_manifest, reseal, write_manifest

MOVED = {"trainer.results_folder", "model.first_stage.ckpt_path"}
"""Keys that differ only because each test works on a copy of the golden run's folder."""


def changed_keys(run: Path) -> dict[str, tuple[tp.Any, tp.Any]]:
    [event] = events(run, "config_changed")
    changes = {c["key"]: (c["was"], c["now"]) for c in event["changes"]}
    assert MOVED <= set(changes), "a moved folder is reported like any other change"
    return {k: v for k, v in changes.items() if k not in MOVED}


@pytest.mark.parametrize(
    ("override", "key", "was", "now"),
    [
        ("data.split_seed=1", "data.split_seed", 0, 1),
        ("model.loss_type=l1", "model.loss_type", "l2", "l1"),
        ("model.prediction_type=sample", "model.prediction_type", "epsilon", "sample"),
        ("trainer.use_ema=false", "trainer.use_ema", True, False),
    ],
    ids=["split-seed", "loss-type", "prediction-type", "no-ema"],
)
def test_a_changed_config_still_verifies_the_checkpoint_as_saved(
    override: str, key: str, was: tp.Any, now: tp.Any, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    """The probe runs on inputs stored in the checkpoint and uses no loss setting, so these re-runs
    resume the newest checkpoint instead of quarantining every good one."""
    ckdir = run / "checkpoints"
    before = hashes(ckdir)
    trainer = build(run_cfg(override))

    assert trainer.checkpointer.resume() == ckdir / STEP4

    report = tp.cast(tp.Any, trainer.checkpointer.verified)
    assert report.ok and "bit-exact (identical environment)" in report.levels["probe"].detail
    assert changed_keys(run) == {key: (was, now)}
    assert hashes(ckdir) == before
    assert events(run, "checkpoint_quarantined") == [] and events(run, "resume_refused") == []


def test_without_ema_the_checkpoints_ema_is_left_alone_and_with_it_back_it_restarts_from_the_weights(
    run: Path, run_cfg: tp.Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    no_ema = build(run_cfg("trainer.use_ema=false", "trainer.train_num_steps=5"))
    no_ema.fit()
    assert no_ema.ema is None
    assert "the checkpoint's EMA weights are not used" in caplog.text
    assert not (run / "checkpoints" / "step-00000005" / "ema.json").exists()

    with_ema = build(run_cfg("trainer.train_num_steps=5"))
    assert with_ema.checkpointer.resume() == run / "checkpoints" / "step-00000005"
    assert "the checkpoint has no EMA" in caplog.text
    ema = tp.cast(tp.Any, with_ema.ema)
    assert all((s == p).all() for s, p in zip(ema.shadow_params, with_ema.params, strict=True))


def test_loop_settings_take_the_new_values_from_the_restored_step(
    run: Path, run_cfg: tp.Callable[..., Config], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    trainer = build(run_cfg("trainer.lr=5e-4", "trainer.min_lr=5e-5", "trainer.weight_decay=0.01",
                            "trainer.ema_decay=0.5", "trainer.train_num_steps=8"))

    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP4

    changes = changed_keys(run)
    assert changes == {
        "trainer.lr": (1e-3, 5e-4), "trainer.min_lr": (1e-4, 5e-5), "trainer.weight_decay": (1e-4, 0.01),
        "trainer.ema_decay": (0.9, 0.5), "trainer.train_num_steps": (4, 8),
    }
    for key in changes:
        assert f"{key}: " in caplog.text and "(the new value applies)" in caplog.text
    [group] = trainer.optimizer.param_groups
    assert group["weight_decay"] == 0.01
    assert group["lr"] == 5e-4 * lr_multiplier(trainer.loop)(4), "the new schedule at the restored step"
    assert trainer.lr_schedule.get_last_lr() == [group["lr"]]
    assert tp.cast(tp.Any, trainer.ema).decay == 0.5
    trainer.fit()
    assert trainer.state.step == 8
    assert trainer.lr_schedule.get_last_lr() == [5e-4 * lr_multiplier(trainer.loop)(8)]


def test_a_model_that_no_longer_fits_stops_with_the_config_diff_and_the_override(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    before = hashes(ckdir)

    with pytest.raises(UserError) as info:
        build(run_cfg("model.unet.params.block_out_channels=[16,32]")).checkpointer.resume()

    message = str(info.value)
    assert "is intact but cannot be resumed as configured (nothing was moved)" in message
    assert "keys          FAILED" in message
    assert "model.unet.params.block_out_channels: [16, 16] in the checkpoint, [16, 32] now" in message
    assert "To resume it, set them back: model.unet.params.block_out_channels=[16,16]" in message
    assert "checkpoint.resume=never" in message
    assert hashes(ckdir) == before and events(run, "checkpoint_quarantined") == []
    [refused] = events(run, "resume_refused")
    assert refused["level"] == "keys"

    back = build(run_cfg("model.unet.params.block_out_channels=[16,16]"))
    assert back.checkpointer.resume() == ckdir / STEP4


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"stage": "first_stage"}, "a checkpoint of stage 'first_stage', this is the 'ldm' stage"),
        ({"version": 1, "checksum": None},
         "format version 1, this build of radiodiff_resume reads version 2"),
    ],
    ids=["other-stage", "older-format"],
)
def test_a_checkpoint_of_another_stage_or_format_is_not_damage(
    edit: dict[str, tp.Any], expected: str, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckpt = run / "checkpoints" / STEP4
    raw = {**read_manifest(ckpt), **edit}
    if edit.get("checksum", "") is None:
        (ckpt / "manifest.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "checksum"}))
    else:
        write_manifest(ckpt, raw)
    before = hashes(run / "checkpoints")

    with pytest.raises(UserError) as info:
        build(run_cfg()).checkpointer.resume()

    assert expected in str(info.value) and "(nothing was moved)" in str(info.value)
    assert hashes(run / "checkpoints") == before and events(run, "checkpoint_quarantined") == []


def without_keys(ckpt: Path, *dotted: str) -> None:
    """Rewrite the checkpoint's config.yaml without ``dotted`` keys, as an older version that did not
    have them wrote it, and reseal the manifest (file record and config_hash)."""
    path = ckpt / "config.yaml"
    tree = yaml.safe_load(path.read_text())
    for key in dotted:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        del node[leaf]
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    reseal(ckpt, "config.yaml")
    raw = read_manifest(ckpt)
    write_manifest(ckpt, {**raw, "config_hash": hashlib.sha256(path.read_bytes()).hexdigest()[:16]})


def test_a_key_added_since_the_checkpoint_is_absent_not_none_and_never_offered_back(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    without_keys(run / "checkpoints" / STEP4, "model.default_scale", "trainer.lr_schedule")

    with pytest.raises(UserError) as info:
        build(run_cfg("model.unet.params.block_out_channels=[16,32]")).checkpointer.resume()
    message = str(info.value)
    assert "model.default_scale: not in the checkpoint's config (a key added since), False now" in message
    assert "To resume it, set them back: model.unet.params.block_out_channels=[16,16]\n" in message
    assert "model.default_scale=" not in message and "None" not in message

    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP4
    changes = changed_keys(run)
    assert changes == {"model.default_scale": (None, False), "trainer.lr_schedule": (None, "radiodiff")}


def test_a_path_spelled_relative_or_absolute_is_no_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs/ldm`` and its absolute form name one folder (an import writes the absolute one): not a
    config change; another folder, or the same spelling under a key that is not a path, still is."""
    from radiodiff_resume.config import config_changes

    monkeypatch.chdir(tmp_path)
    saved = {"trainer": {"results_folder": str(tmp_path / "runs" / "ldm"), "seed": 0},
             "data": {"root": str(tmp_path / "maps")}, "slurm": {"job_name": str(tmp_path / "x")}}
    now = {"trainer": {"results_folder": "runs/ldm", "seed": 0}, "data": {"root": "./maps/"},
           "slurm": {"job_name": "x"}}
    assert config_changes(saved, now) == [("slurm.job_name", str(tmp_path / "x"), "x")]
    now["trainer"]["results_folder"] = "runs/other"
    assert [k for k, _, _ in config_changes(saved, now)] == ["slurm.job_name", "trainer.results_folder"]
