"""Running statistics: snapshot / put back on the device, detection, recomputation, reset."""

from __future__ import annotations

import torch
from torch import nn

from radiodiff_resume.guard.norm_stats import NormStats, apply_stability_settings, stat_modules


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                         nn.BatchNorm2d(4))


def test_finds_every_module_with_running_statistics() -> None:
    assert [n for n, _ in stat_modules(net())] == ["1", "4"]
    assert not NormStats(nn.Linear(2, 2))


def test_put_back_where_rejected_even_from_inf() -> None:
    model = net()
    stats = NormStats(model)
    before = stats.snapshot()
    model(torch.full((2, 2, 5, 5), float("inf")))
    assert stats.nonfinite() == ["1"] or stats.nonfinite() == ["1", "4"]
    stats.restore_where(torch.tensor(False), before)
    assert stats.nonfinite(), "not rejected: kept as is"
    stats.restore_where(torch.tensor(True), before)
    assert not stats.nonfinite()
    assert all(torch.equal(a, b) for a, b in zip(stats.buffers, before, strict=True))


def test_recompute_averages_the_batches_and_leaves_other_modules_alone() -> None:
    model = net()
    stats = NormStats(model)
    batches = [torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model.train()
    model(torch.randn(3, 2, 6, 6))
    second = stat_modules(model)[1][1]
    kept = (second.running_mean.clone(), second.running_var.clone())
    with torch.no_grad():
        stat_modules(model)[0][1].running_mean.fill_(float("nan"))

    def forward() -> None:
        for b in batches:
            model(b)

    stats.recompute(model, ["1"], forward)
    first = stat_modules(model)[0][1]
    assert model.training and first.momentum == 0.1, "modes and momentum restored"
    assert torch.equal(second.running_mean, kept[0]) and torch.equal(second.running_var, kept[1])
    with torch.no_grad():
        features = torch.cat([model[0](b) for b in batches])
    # momentum=None: a cumulative average of the per-batch means (equal batch sizes: the overall mean).
    assert torch.allclose(first.running_mean, features.mean((0, 2, 3)), atol=1e-6)
    assert not stats.nonfinite()


def test_reset_and_stability_settings() -> None:
    model = net()
    stats = NormStats(model)
    with torch.no_grad():
        stat_modules(model)[1][1].running_var.fill_(-1.0)
    assert stats.nonfinite() == ["4"], "a negative variance is broken too"
    stats.reset(["4"])
    assert not stats.nonfinite() and torch.equal(stat_modules(model)[1][1].running_var, torch.ones(4))
    assert apply_stability_settings(model, 0.01, 1e-3) == 2
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for _, m in stat_modules(model))
