"""The EMA follows RadioDiff's schedule (ema-pytorch's ``EMA.update`` called after every optimizer
step), and no shipped config keeps an EMA that never leaves its start."""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml

from radiodiff_resume.config import Config, build_config
from radiodiff_resume.trainer.ema import RadioDiffEMA, first_average
from tests.checkpoint.helpers import build, torch_threads
from tests.conftest import REPO, write_random_first_stage


class Reference:
    """ema-pytorch's ``update()`` as documented (inv_gamma 1, power 2/3, min_value 0), written out."""

    def __init__(self, start: torch.Tensor, beta: float, after: int, every: int) -> None:
        self.ema, self.beta, self.after, self.every = start.clone(), beta, after, every
        self.step, self.initted = 0, False

    def update(self, online: torch.Tensor) -> None:
        calls = self.step
        self.step += 1
        if calls % self.every != 0:
            return
        if calls <= self.after:
            self.ema = online.clone()
            return
        if not self.initted:
            self.ema = online.clone()
            self.initted = True
        epoch = max(self.step - self.after - 1, 0)
        decay = 0.0 if epoch <= 0 else min(max(1 - (1 + epoch) ** (-2 / 3), 0.0), self.beta)
        difference = self.ema - online
        difference.mul_(1.0 - decay)
        self.ema.sub_(difference)


SETTINGS = [(0, 1, 0.999), (3, 1, 0.9), (5, 3, 0.999), (10, 10, 0.99), (0, 4, 0.9)]


@pytest.mark.parametrize(("after", "every", "beta"), SETTINGS)
def test_the_schedule_is_radiodiffs_bit_for_bit(after: int, every: int, beta: float) -> None:
    generator = torch.Generator().manual_seed(after * 100 + every)
    param = torch.nn.Parameter(torch.randn(64, generator=generator))
    ema = RadioDiffEMA([param], decay=beta, update_after_step=after, update_every=every)
    reference = Reference(param.detach(), beta, after, every)
    seen = [param.detach().clone()]
    for step in range(1, 80):
        with torch.no_grad():
            param.add_(torch.randn(64, generator=generator))
        seen.append(param.detach().clone())
        ema.step([param])
        reference.update(param.detach())
        assert torch.equal(ema.shadow_params[0], reference.ema), f"step {step}"
        copy = any(torch.equal(ema.shadow_params[0], s) for s in seen)
        assert copy == (step < first_average(after, every)), f"step {step}: a copy until the first average"
        assert ema.optimization_step == step, "it counts optimizer steps, as RadioDiff's does"


def test_radiodiffs_shipped_settings_average_within_the_run() -> None:
    """RadioDiff's configs/radio_train.yaml: 10 000 and 10 over 50 000 steps. Counted in EMA updates
    (diffusers' EMAModel), that EMA never averaged; counted in optimizer steps it does from step 10 021."""
    assert first_average(10000, 10) == 10021 < 50000


def loops(raw: dict[str, tp.Any]) -> list[tuple[str, dict[str, tp.Any]]]:
    cfg = build_config(raw, ["data.root=/data/RadioMapSeer"])  # the shipped configs ask for it
    fs = cfg.model.first_stage.trainer
    return [("trainer", vars(cfg.trainer)), ("model.first_stage.trainer", vars(fs))]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_has_an_ema_that_never_leaves_its_start(path: Path) -> None:
    for where, loop in loops(yaml.safe_load(path.read_text())):
        if loop["use_ema"]:
            first = first_average(loop["ema_update_after_step"], loop["ema_update_every"])
            assert first <= loop["train_num_steps"], (
                f"{path.name}: {where}: the EMA first averages after step {first}, but the run ends at step "
                f"{loop['train_num_steps']}: its EMA weights would be a copy of the online weights")


def test_a_run_s_ema_leaves_its_start(make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg("trainer.val_batches=0", "trainer.ema_update_every=2", "trainer.ema_update_after_step=1")
    write_random_first_stage(cfg)
    with torch_threads(1):
        trainer = build(cfg)
        start = [p.detach().clone() for p in trainer.params]
        trainer.fit()
    shadow = tp.cast(RadioDiffEMA, trainer.ema).shadow_params
    assert trainer.state.step == 6 and first_average(1, 2) == 5
    assert any(not torch.equal(s, p) for s, p in zip(shadow, start, strict=True)), "left its start"
    assert any(not torch.equal(s, p.detach()) for s, p in zip(shadow, trainer.params, strict=True)), \
        "an average, not a copy of the online weights"


def test_an_ema_that_would_never_average_is_warned_about(make_cfg: tp.Callable[..., Config],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg("trainer.ema_update_after_step=10")
    write_random_first_stage(cfg)
    with caplog.at_level(logging.WARNING):
        build(cfg)
    assert "the EMA first averages after step 13, beyond train_num_steps=6" in caplog.text
