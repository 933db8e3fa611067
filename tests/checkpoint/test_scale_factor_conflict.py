"""On resume the checkpoint's scale_factor wins; a fixed config value that disagrees stops the run."""

from __future__ import annotations

import shutil
import typing as tp
from pathlib import Path

import pytest

from radiodiff_resume.config import Config, build_config
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import FAST, build, committed, events, hashes, read_manifest
from tests.conftest import tiny_raw, write_random_first_stage

FIXED = ("trainer.train_num_steps=1", *FAST, "model.default_scale=true")
CKPT = "step-00000001"


def trained(folder: Path, synth_cache: Path, scale_factor: str) -> Path:
    cfg = build_config(tiny_raw(folder, synth_cache), (*FIXED, f"model.scale_factor={scale_factor}"))
    write_random_first_stage(cfg)
    build(cfg).fit()
    assert committed(folder) == [CKPT]
    return folder


@pytest.fixture(scope="module")
def half_run(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Path:
    """A finished 1-step run trained with a fixed ``model.scale_factor=0.5``."""
    return trained(tmp_path_factory.mktemp("half") / "run", synth_cache, "0.5")


@pytest.fixture
def copy_of(tmp_path: Path) -> tp.Callable[[Path], Path]:
    def copy(results: Path) -> Path:
        target = tmp_path / "run"
        target.mkdir()
        shutil.copytree(results / "checkpoints", target / "checkpoints")
        shutil.copy2(results / "ae.safetensors", target / "ae.safetensors")
        return target

    return copy


def test_saved_value_is_the_fixed_one(half_run: Path) -> None:
    assert read_manifest(half_run / "checkpoints" / CKPT)["scale_factor"] == 0.5


def test_a_different_fixed_scale_factor_stops_the_run(
    half_run: Path, copy_of: tp.Callable[[Path], Path], make_cfg: tp.Callable[..., Config]
) -> None:
    run = copy_of(half_run)
    before = hashes(run / "checkpoints")
    trainer = build(make_cfg(*FIXED, "model.scale_factor=0.25", results=run))

    with pytest.raises(UserError) as info:
        trainer.fit()

    message = str(info.value)
    assert "0.25" in message and "0.5" in message
    assert "model.scale_factor=0.5" in message
    assert "checkpoint.resume=never" in message
    assert hashes(run / "checkpoints") == before, "a config conflict is not the checkpoint's fault"
    assert not (run / "checkpoints" / "quarantine").exists()
    assert events(run, "resumed") == [] and events(run, "checkpoint_quarantined") == []


def test_the_same_fixed_scale_factor_resumes(
    half_run: Path, copy_of: tp.Callable[[Path], Path], make_cfg: tp.Callable[..., Config]
) -> None:
    run = copy_of(half_run)
    trainer = build(make_cfg(*FIXED, "model.scale_factor=0.5", results=run))
    assert trainer.checkpointer.resume() == run / "checkpoints" / CKPT
    assert trainer.state.step == 1
    assert float(trainer.ldm.scale_factor) == 0.5


def test_with_scale_by_std_the_checkpoints_value_is_used(
    half_run: Path, copy_of: tp.Callable[[Path], Path], make_cfg: tp.Callable[..., Config]
) -> None:
    """A run that measures its scale (scale_by_std, no default_scale) resumes a fixed-scale checkpoint."""
    run = copy_of(half_run)
    cfg = make_cfg("trainer.train_num_steps=2", *FAST, "model.scale_by_std=true", results=run)
    trainer = build(cfg)
    assert float(trainer.ldm.scale_factor) == 1.0

    trainer.fit()  # resumes step 1, trains step 2 without recomputing scale_factor

    assert [e["step"] for e in events(run, "resumed")] == [1]
    assert trainer.state.step == 2
    assert float(trainer.ldm.scale_factor) == read_manifest(run / "checkpoints" / CKPT)["scale_factor"] == 0.5
    assert read_manifest(run / "checkpoints" / "step-00000002")["scale_factor"] == 0.5


def test_an_unchanged_fixed_scale_factor_that_float32_rounds_resumes(
    tmp_path: Path, synth_cache: Path, make_cfg: tp.Callable[..., Config]
) -> None:
    run = trained(tmp_path / "point3", synth_cache, "0.3")
    trainer = build(make_cfg(*FIXED, "model.scale_factor=0.3", results=run))
    assert trainer.checkpointer.resume() == run / "checkpoints" / CKPT
    assert trainer.state.step == 1
