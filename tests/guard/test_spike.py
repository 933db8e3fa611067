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


def test_a_run_of_healthy_spikes_refills_the_window_with_their_losses() -> None:
    w = window(spike_zscore=3.0, window=8, warmup=2, rebaseline_after=3)
    for value in (1.0, 1.1, 0.9, 1.0):
        w.accept(torch.tensor(value))
    assert w.skipped_spike(10.0, healthy=True) is None
    assert w.skipped_spike(11.0, healthy=False) is None and w.spike_run == [], "clipped: the run starts over"
    assert w.skipped_spike(10.0, healthy=True) is None and w.skipped_spike(10.5, healthy=True) is None
    assert w.is_spike(torch.tensor(10.0)), "still judged against the old level"
    assert w.skipped_spike(9.5, healthy=True) == 10.0
    assert w.state_dict()["losses"].tolist() == [10.0, 10.5, 9.5]
    assert w.count == 3 and w.spike_run == []
    assert not w.is_spike(torch.tensor(10.2)), "the new level (3 losses, past the warm-up of 2)"


def test_a_taken_step_ends_the_run_which_survives_a_checkpoint() -> None:
    w = window(window=8, warmup=2, rebaseline_after=3)
    for value in (1.0, 1.1):
        w.accept(torch.tensor(value))
    w.skipped_spike(10.0, healthy=True)
    w.skipped_spike(10.5, healthy=True)
    state = w.state_dict()
    assert state["spike_run"] == [10.0, 10.5]
    resumed = window(window=8, warmup=2, rebaseline_after=3)
    resumed.load_state_dict(state)
    assert resumed.skipped_spike(9.5, healthy=True) == 10.0, "the run continues after a resume"
    w.accept(torch.tensor(1.0))
    assert w.spike_run == [] and w.skipped_spike(9.5, healthy=True) is None


def test_without_rebaselining_spikes_never_refill_the_window() -> None:
    w = window(window=4, warmup=2, rebaseline_after=None)
    for value in (1.0, 1.1):
        w.accept(torch.tensor(value))
    assert all(w.skipped_spike(10.0, healthy=True) is None for _ in range(10))
    assert w.count == 2 and w.spike_run == []


def test_a_new_level_with_fewer_losses_than_the_warm_up_waits_for_it_again() -> None:
    w = window(spike_zscore=3.0, window=8, warmup=4, rebaseline_after=2)
    for value in (1.0, 1.1, 0.9, 1.0):
        w.accept(torch.tensor(value))
    w.skipped_spike(10.0, healthy=True)
    assert w.skipped_spike(10.0, healthy=True) == 10.0 and w.count == 2
    assert not w.is_spike(torch.tensor(1e9)), "2 losses in the window, warm-up 4: no detection yet"
    w.accept(torch.tensor(10.0))
    w.accept(torch.tensor(10.0))
    assert w.is_spike(torch.tensor(1e9))
