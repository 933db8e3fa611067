"""The loss window: spikes are judged against accepted losses only, after a warm-up."""

from __future__ import annotations

import torch

from radiodiff_resume.config import LossGuardConfig
from radiodiff_resume.guard.spike import LossWindow


def window(**kw: float | int | None) -> LossWindow:
    return LossWindow(LossGuardConfig(**kw), torch.device("cpu"))  # type: ignore[arg-type]


def test_no_spike_before_warmup_then_z_score_above_threshold() -> None:
    w = window(spike_zscore=3.0, window=8, warmup=4)
    for value in (1.0, 1.1, 0.9):
        assert not w.is_spike(torch.tensor(100.0)), "warm-up"
        w.accept(torch.tensor(value))
    w.accept(torch.tensor(1.0))
    losses = torch.tensor([1.0, 1.1, 0.9, 1.0])
    limit = losses.mean() + 3.0 * losses.std(correction=0)
    assert not w.is_spike(limit - 1e-3) and w.is_spike(limit + 1e-3)


def test_deviation_is_floored_at_one_percent_of_the_mean() -> None:
    w = window(spike_zscore=6.0, window=4, warmup=2)
    for _ in range(4):
        w.accept(torch.tensor(2.0))
    limit = 2.0 + 6 * 0.02
    assert not w.is_spike(torch.tensor(limit - 1e-4)) and w.is_spike(torch.tensor(limit + 1e-4))


def test_null_threshold_disables_detection() -> None:
    w = window(spike_zscore=None, window=4, warmup=2)
    for _ in range(4):
        w.accept(torch.tensor(1.0))
    assert not w.is_spike(torch.tensor(1e9))


def test_state_keeps_the_newest_losses_oldest_first_and_fits_another_window() -> None:
    w = window(window=4, warmup=2)
    for value in range(1, 7):  # 1..6: the ring holds 3, 4, 5, 6
        w.accept(torch.tensor(float(value)))
    state = w.state_dict()
    assert state["losses"].tolist() == [3.0, 4.0, 5.0, 6.0] and state["count"] == 6
    smaller = window(window=2, warmup=2)
    smaller.load_state_dict(state)
    assert smaller.state_dict()["losses"].tolist() == [5.0, 6.0]
    larger = window(window=8, warmup=2)
    larger.load_state_dict(state)
    assert larger.state_dict()["losses"].tolist() == [3.0, 4.0, 5.0, 6.0] and larger.count == 4
    same = window(window=4, warmup=2)
    same.load_state_dict(state)
    same.accept(torch.tensor(7.0))
    assert same.state_dict()["losses"].tolist() == [4.0, 5.0, 6.0, 7.0]
