"""The LDM trainer end to end on tiny models: loss falls, scale_factor policy, first stage."""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from radiodiff_resume.errors import UserError
from radiodiff_resume.run import build_ldm_trainer, train
from tests.conftest import write_random_first_stage


def losses(folder: Path, stage: str = "ldm") -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["stage"] == stage and "loss" in r]


def test_short_run_loss_falls_and_writes_outputs(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "trainer.train_num_steps=60", "trainer.log_freq=10", "trainer.save_and_sample_every=30",
        "trainer.lr_warmup_steps=5",
    )
    write_random_first_stage(cfg)
    train(cfg, Accelerator())
    run = cfg.results_folder
    curve = losses(run)
    assert len(curve) == 6
    assert curve[-1] < 0.7 * curve[0], curve
    assert (run / "samples" / "step-00000030.png").is_file()
    assert (run / "samples" / "step-00000060.png").is_file()
    assert (run / "curves.png").is_file()
    assert (run / "config.yaml").is_file()
    final = load_file(str(run / "final" / "model_ema.safetensors"))
    assert "scale_factor" in final and "unet.conv_out.weight" in final
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/valid" in r]
    assert [r["step"] for r in val] == [30, 60]
    assert all(r["val/valid"] and r["val/evaluated"] == r["val/total"] > 0 for r in val)
    assert all(0 < r["val/rmse"] < 2 and -1 <= r["val/ssim"] <= 1 for r in val)


def test_scale_by_std_sets_scale_factor_once_on_a_fresh_run(make_cfg) -> None:
    cfg = make_cfg("trainer.train_num_steps=1", "trainer.val_batches=0")
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, Accelerator())
    image = trainer.train_stream.peek()["image"]
    trainer.fit()
    value = float(trainer.ldm.scale_factor)
    assert value != 1.0
    with torch.no_grad():
        z = trainer.ldm.first_stage.encode(image).latent_dist.sample(torch.Generator().manual_seed(1))
    assert value == pytest.approx(1 / z.std().item(), rel=0.15)
    assert trainer.train_stream.state_dict() == {"epoch": 0, "offset": 4}, "peek must not consume data"


def test_fixed_scale_factor_is_used_as_given(make_cfg) -> None:
    cfg = make_cfg("trainer.train_num_steps=1", "trainer.val_batches=0",
                   "model.default_scale=true", "model.scale_factor=0.3")
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, Accelerator())
    trainer.fit()
    assert float(trainer.ldm.scale_factor) == pytest.approx(0.3)


def test_scale_factor_is_not_recomputed_when_a_later_step_is_restored(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("trainer.train_num_steps=2", "trainer.val_batches=0")
    write_random_first_stage(cfg)
    first = build_ldm_trainer(cfg, Accelerator())
    first.fit()
    first.ldm.set_scale_factor(0.123)
    state = first.state_dict()

    longer = make_cfg("trainer.train_num_steps=4", "trainer.val_batches=0", results=tmp_path / "b")
    write_random_first_stage(longer)
    resumed = build_ldm_trainer(longer, Accelerator())
    resumed.load_state_dict(state)
    assert resumed.state.step == 2
    resumed.fit()
    assert resumed.state.step == 4
    assert float(resumed.ldm.scale_factor) == pytest.approx(0.123)

    elsewhere = make_cfg("trainer.train_num_steps=4", "trainer.val_batches=0", results=tmp_path / "c")
    write_random_first_stage(elsewhere)
    fresh = build_ldm_trainer(elsewhere, Accelerator())
    fresh.unwrapped.load_state_dict(state["model"])
    fresh.fit()
    assert float(fresh.ldm.scale_factor) != pytest.approx(0.123), "a fresh run computes its own"


def test_a_checkpoint_at_step_0_is_restored_not_started_fresh(make_cfg) -> None:
    """An imported ``{'model'}`` file is a verified checkpoint at step 0: ``train`` keeps its weights and
    its scale_factor instead of measuring one (and loading ``cond_weights``) as on a fresh start."""
    cfg = make_cfg("trainer.train_num_steps=1", "trainer.val_batches=0")
    write_random_first_stage(cfg)
    first = build_ldm_trainer(cfg, Accelerator())
    first.ldm.set_scale_factor(0.123)
    first.save_checkpoint()
    assert first.checkpointer.last_saved_step == 0

    again = build_ldm_trainer(cfg, Accelerator())
    assert again.restore() is not None and again.state.step == 0
    assert float(again.ldm.scale_factor) == pytest.approx(0.123)

    other = make_cfg("trainer.train_num_steps=1", "trainer.val_batches=0",
                     results=cfg.results_folder.parent / "b")
    write_random_first_stage(other)
    elsewhere = build_ldm_trainer(other, Accelerator())
    assert elsewhere.restore() is None
    assert float(elsewhere.ldm.scale_factor) != pytest.approx(0.123), "a fresh run measures its own"


def test_missing_first_stage_is_an_error_unless_training_it_is_allowed(make_cfg) -> None:
    cfg = make_cfg("trainer.train_num_steps=1")
    with pytest.raises(UserError, match=r"ae\.safetensors not found .*train_if_missing=true"):
        build_ldm_trainer(cfg, Accelerator())


def test_first_stage_is_trained_first_when_missing(make_cfg) -> None:
    cfg = make_cfg("trainer.train_num_steps=1", "trainer.val_batches=0",
                   "model.first_stage.train_if_missing=true")
    trainer = build_ldm_trainer(cfg, Accelerator())
    ckpt = Path(str(cfg.model.first_stage.ckpt_path))
    assert ckpt.is_file()
    saved = load_file(str(ckpt))
    live = trainer.ldm.first_stage.state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    assert len(losses(cfg.first_stage_folder(), "first_stage")) == 2
    assert (cfg.first_stage_folder() / "samples" / "step-00000004.png").is_file()


def test_first_stage_file_that_does_not_fit_names_the_keys(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("trainer.train_num_steps=1")
    path = write_random_first_stage(cfg)
    state = load_file(str(path))
    state.pop("encoder.conv_in.weight")
    from safetensors.torch import save_file

    save_file(state, str(path))
    with pytest.raises(UserError, match=r"missing 1 \(e\.g\. encoder\.conv_in\.weight\)"):
        build_ldm_trainer(cfg, Accelerator())
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot be read"):
        build_ldm_trainer(cfg, Accelerator())


def test_first_stage_file_with_nan_is_refused_and_other_dtypes_are_named(
        make_cfg, caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    cfg = make_cfg("trainer.train_num_steps=1")
    path = write_random_first_stage(cfg)
    state = load_file(str(path))
    save_file({k: v.half() for k, v in state.items()}, str(path))
    with caplog.at_level("WARNING", logger="radiodiff_resume.build"):
        trainer = build_ldm_trainer(cfg, Accelerator())
    assert "holds other dtypes than the model (torch.float16 → torch.float32)" in caplog.text
    assert trainer.ldm.first_stage.encoder.conv_in.weight.dtype == torch.float32
    state["decoder.conv_out.bias"][0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(UserError, match=r"non-finite values in 1 tensor\(s\) \(e\.g\. decoder\.conv_out"):
        build_ldm_trainer(cfg, Accelerator())


@pytest.fixture
def fresh_accelerate_state() -> tp.Iterator[None]:
    """Accelerate keeps one state per process; a test with another precision needs it reset."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision, probe_dtype", [("bf16", "bfloat16"), ("fp16", "float32")])
def test_mixed_precision_on_cpu_records_the_dtype_really_used(
    make_cfg, caplog: pytest.LogCaptureFixture, fresh_accelerate_state: None, precision: str,
    probe_dtype: str,
) -> None:
    """bf16 autocasts on a CPU; accelerate silently runs fp16 as fp32 there, which we say."""
    from radiodiff_resume.checkpoint.manifest import Manifest
    from radiodiff_resume.run import make_accelerator

    cfg = make_cfg("trainer.train_num_steps=2", "trainer.val_batches=0",
                   f"trainer.mixed_precision={precision}")
    write_random_first_stage(cfg)
    with caplog.at_level("WARNING"):
        trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
    assert ("accelerate runs fp32 here" in caplog.text) == (precision == "fp16")
    trainer.fit()
    manifest = Manifest.from_json((cfg.results_folder / "checkpoints" / "step-00000002" /
                                   "manifest.json").read_text())
    assert manifest.probe is not None and manifest.probe.dtype == probe_dtype
