"""Validation that cannot lie: a model that produces NaN for some samples is evaluated on the
others and says how many; one that produces NaN for all is reported invalid, never as 0.0; and
EMA weights are validated with running statistics of their own."""

from __future__ import annotations

import json
import typing as tp

import torch
from accelerate import Accelerator
from torch import nn

from radiodiff_resume.config import Config
from radiodiff_resume.run import build_ldm_trainer
from radiodiff_resume.trainer.runlog import RunLog
from radiodiff_resume.trainer.validation import evaluate
from tests.checkpoint.helpers import FAST
from tests.conftest import write_random_first_stage


class NaNWhereMarked(nn.Module):
    """A real (tiny) predictor: a 1x1 conv of the condition whose output is NaN for every sample
    whose condition's first pixel is above ``mark``."""

    def __init__(self, mark: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.mark = mark

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.tanh(self.conv(batch["cond"]))
        bad = batch["cond"][:, 0, 0, 0] > self.mark
        return torch.where(bad.view(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)


def batches(n: int = 3, size: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"cond": torch.rand(size, 3, 8, 8, generator=g) * 2 - 1,
             "image": torch.rand(size, 1, 8, 8, generator=g) * 2 - 1} for _ in range(n)]


def test_non_finite_predictions_are_skipped_and_counted() -> None:
    data = batches()
    model = NaNWhereMarked(mark=0.0)
    marked = sum(int((b["cond"][:, 0, 0, 0] > 0).sum()) for b in data)
    assert 0 < marked < 12
    result = evaluate(data, model, lambda t: t, torch.device("cpu"))
    assert result.valid and result.total == 12 and result.evaluated == 12 - marked
    assert all(torch.isfinite(torch.tensor(v)) for v in tp.cast(dict, result.metrics).values())

    clean = [{k: v[b["cond"][:, 0, 0, 0] <= 0] for k, v in b.items()} for b in data]
    expected = evaluate(clean, model, lambda t: t, torch.device("cpu"))
    assert tp.cast(dict, result.metrics).keys() == tp.cast(dict, expected.metrics).keys()
    for k, v in tp.cast(dict, result.metrics).items():
        assert abs(v - tp.cast(dict, expected.metrics)[k]) <= 1e-9 * max(1.0, abs(v)), k


def test_a_model_that_is_nan_everywhere_is_reported_invalid_never_zero(tmp_path) -> None:
    result = evaluate(batches(), NaNWhereMarked(mark=-2.0), lambda t: t, torch.device("cpu"))
    assert not result.valid and result.evaluated == 0 and result.total == 12
    assert "INVALID" in result.describe()
    log = RunLog(tmp_path, Accelerator(cpu=True), "ldm", enabled=True)
    log.write(5, {**result.log_values(), "loss": float("nan")})
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["val/valid"] is False and record["val/evaluated"] == 0
    assert "val/rmse" not in record and record["loss"] is None and record["invalid"] == ["loss"]


def test_ema_weights_are_validated_with_their_own_running_statistics(
        make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg(*FAST, "trainer.train_num_steps=3", "trainer.ema_decay=0.5")
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, Accelerator(cpu=True))
    trainer.fit()
    stats = trainer.guard.norm_stats
    assert stats, "the condition encoder has BatchNorm layers"
    online = [b.clone() for b in stats.buffers]
    weights = [p.detach().clone() for p in trainer.params]
    with trainer.ema_weights():
        inside = [b.clone() for b in stats.buffers]
        assert not all(torch.equal(a, b) for a, b in zip(weights, trainer.params, strict=True))
        # The same recomputation by hand, on the EMA weights now in place.
        stats.recompute(trainer.unwrapped, [n for n, _ in stats.modules], trainer.calibration.forward)
        again = [b.clone() for b in stats.buffers]
    assert all(torch.equal(a, b) for a, b in zip(inside, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(inside, online, strict=True)), \
        "the EMA's statistics differ from the online model's"
    assert all(torch.equal(a, b) for a, b in zip(online, stats.buffers, strict=True)), "restored after"
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.params, strict=True)), "restored after"


def test_ema_statistics_can_be_turned_off(make_cfg: tp.Callable[..., Config]) -> None:
    cfg = make_cfg(*FAST, "trainer.train_num_steps=2", "guard.norm_stats.ema_statistics=false")
    write_random_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, Accelerator(cpu=True))
    trainer.fit()
    online = [b.clone() for b in trainer.guard.norm_stats.buffers]
    with trainer.ema_weights():
        assert all(torch.equal(a, b) for a, b in zip(online, trainer.guard.norm_stats.buffers, strict=True))
