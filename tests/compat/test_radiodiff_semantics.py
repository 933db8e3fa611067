"""Keys with RadioDiff's names mean what they mean in RadioDiff: one test per key against RadioDiff's
own formula (the EMA schedule is tested bit for bit in ``tests/trainer/test_ema.py``)."""

from __future__ import annotations

import types
import typing as tp

import pytest
import torch
from accelerate import Accelerator

from radiodiff_resume.config import Config, LoopConfig, measures_scale_factor
from radiodiff_resume.errors import ConfigError
from radiodiff_resume.run import build_ldm_trainer, per_process_batch
from radiodiff_resume.trainer.lr import lr_multiplier
from tests.conftest import write_random_first_stage


def radiodiff_lambda(train_num_steps: int, min_lr: float, power: float) -> tp.Callable[[int], float]:
    """RadioDiff's ``LambdaLR`` (train_cond_ldm.py: power 0.96; train_vae.py: 0.95), written out."""
    return lambda step: max((1 - step / train_num_steps) ** power, min_lr)


@pytest.mark.parametrize(("min_lr", "power"), [(5e-6, 0.96), (0.1, 0.96), (5e-7, 0.95)])
def test_min_lr_floors_the_multiplier_as_in_radiodiff(min_lr: float, power: float) -> None:
    loop = LoopConfig(train_num_steps=1000, lr=5e-5, min_lr=min_lr, lr_decay_power=power)
    ours, theirs = lr_multiplier(loop), radiodiff_lambda(1000, min_lr, power)
    assert [ours(s) for s in range(0, 1001, 7)] == [theirs(s) for s in range(0, 1001, 7)]
    assert ours(1000) == min_lr, "the end LR is lr × min_lr, not min_lr"
    assert ours(5000) == min_lr, "past train_num_steps (a longer resume) the floor holds"


def test_the_default_schedule_is_radiodiffs_and_the_first_stage_uses_its_power(
        make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg()
    assert cfg.trainer.lr_schedule == cfg.model.first_stage.trainer.lr_schedule == "radiodiff"
    assert (cfg.trainer.lr_decay_power, cfg.model.first_stage.trainer.lr_decay_power) == (0.96, 0.95)
    assert cfg.trainer.weight_decay == 1e-4, "RadioDiff's default AdamW weight decay"


def test_a_trainer_steps_its_lr_along_radiodiffs_schedule(make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg("trainer.train_num_steps=3", "trainer.val_batches=0", "trainer.min_lr=0.5")
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, Accelerator())
    seen = []
    for _ in range(3):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.lr_schedule.step()
    theirs = radiodiff_lambda(3, 0.5, 0.96)
    assert seen == [1e-3 * theirs(s) for s in range(3)]
    assert seen[2] == 1e-3 * 0.5, "(1 - 2/3)^0.96 is below the floor"


def test_cosine_ends_at_the_absolute_final_lr() -> None:
    loop = LoopConfig(train_num_steps=100, lr=1e-3, lr_schedule="cosine", final_lr=1e-4)
    factor = lr_multiplier(loop)
    assert factor(0) == 1.0 and factor(100) * 1e-3 == pytest.approx(1e-4)


@pytest.mark.parametrize(("overrides", "message"), [
    (("trainer.min_lr=5e-5", "trainer.lr=1e-5"), None),
    (("trainer.min_lr=2",), r"trainer\.min_lr: got 2\.0; allowed: 0 \.\. 1 \(a floor on the LR multiplier"),
    (("trainer.final_lr=1e-5",), r"trainer\.final_lr: .*lr_schedule is 'radiodiff', which does not use it"),
    (("trainer.lr_schedule=cosine", "trainer.min_lr=0.1"), r"trainer\.min_lr: .*'cosine', which does not"),
])
def test_schedule_keys_are_checked_against_the_schedule(
        make_cfg: tp.Callable[..., Config], overrides: tuple[str, ...], message: str | None) -> None:
    if message is None:
        assert make_cfg(*overrides).trainer.min_lr == 5e-5, "a floor above lr is fine: it is a multiplier"
        return
    with pytest.raises(ConfigError, match=message):
        make_cfg(*overrides)


def processes(n: int) -> tp.Any:
    """Stands in for an ``Accelerator`` of ``n`` processes (only ``num_processes`` is read)."""
    return types.SimpleNamespace(num_processes=n)


def test_batch_size_is_global_and_split_across_processes(make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg("data.batch_size=8")
    assert [per_process_batch(cfg, processes(n)) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match=r"data\.batch_size: 8 is the global batch .* across 3 processes"):
        per_process_batch(cfg, processes(3))
    fs = make_cfg("data.batch_size=8", "model.first_stage.batch_size=6")
    assert per_process_batch(fs, processes(2), first_stage=True) == 3
    assert per_process_batch(fs, processes(2)) == 4


def test_a_per_process_batch_has_its_own_name(make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg("data.batch_size=null", "data.batch_size_per_process=3")
    assert [per_process_batch(cfg, processes(n)) for n in (1, 2, 3)] == [3, 3, 3]
    assert per_process_batch(cfg, processes(2), first_stage=True) == 3
    with pytest.raises(ConfigError, match=r"set exactly one .*add data\.batch_size=null"):
        make_cfg("data.batch_size_per_process=3")


def test_the_trainers_stream_takes_the_split_batch(make_cfg: tp.Callable[..., Config]) -> None:
    """One step consumes data.batch_size samples in all (2 processes: tests/trainer/test_multiprocess)."""
    cfg = make_cfg("data.batch_size=4", "trainer.train_num_steps=1", "trainer.val_batches=0")
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, Accelerator())
    assert trainer.train_stream.step == 4 and len(trainer.train_stream.peek()["image"]) == 4


@pytest.mark.parametrize(("flags", "measures", "factor"), [
    (("model.scale_by_std=true",), True, None),
    (("model.scale_by_std=true", "model.default_scale=true", "model.scale_factor=0.3"), False, 0.3),
    (("model.scale_by_std=false",), False, 1.0),
])
def test_latent_scale_follows_radiodiffs_rule(make_cfg: tp.Callable[..., Config], flags: tuple[str, ...],
                                             measures: bool, factor: float | None) -> None:
    """RadioDiff: 1/std only with scale_by_std and not default_scale; the configured factor with both;
    no scaling at all without scale_by_std."""
    cfg = make_cfg("trainer.train_num_steps=1", "trainer.val_batches=0", *flags)
    assert measures_scale_factor(cfg.model) is measures
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, Accelerator())
    trainer.on_fit_start()
    value = float(trainer.ldm.scale_factor)
    if factor is None:
        assert value != 1.0
        return
    assert value == pytest.approx(factor)
    image = trainer.train_stream.peek()["image"][:1]
    with torch.no_grad():
        z = trainer.ldm.first_stage.encode(image).latent_dist.mode()
    assert torch.equal(trainer.ldm.encode_mode(image), z * torch.tensor(factor)), "latents × factor"


@pytest.mark.parametrize("flags", [("model.scale_factor=0.3",),
                                   ("model.scale_by_std=false", "model.scale_factor=0.3")])
def test_a_scale_factor_radiodiff_would_not_use_is_refused(make_cfg: tp.Callable[..., Config],
                                                          flags: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match=r"model\.scale_factor: got 0\.3, but it is used only with "
                                          r"model\.scale_by_std=true and model\.default_scale=true"):
        make_cfg(*flags)
