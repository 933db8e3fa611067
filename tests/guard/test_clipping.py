"""Gradient norm and clipping: the same floats as torch where they should be, the documented
rule where they differ (z-score, AGC, scrub)."""

from __future__ import annotations

import math

import torch
from torch import nn

from radiodiff_resume.config import ClipConfig
from radiodiff_resume.guard.clipping import Clipper, grads_of, scale_grads, scrub_grads, total_norm


def model_with_grads(seed: int = 0, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    (model(torch.randn(4, 6)).square().sum() * scale).backward()
    return model


def test_fixed_clipping_is_bit_identical_to_clip_grad_norm() -> None:
    ours, theirs = model_with_grads(scale=50.0), model_with_grads(scale=50.0)
    reference = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 1.0)
    clipper = Clipper(ClipConfig(mode="fixed"), 1.0, torch.device("cpu"))
    grads = grads_of(ours.parameters())
    norm = total_norm(grads)
    assert torch.equal(norm, reference)
    scale_grads(grads, clipper.coefficient(norm, clipper.threshold(norm)))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_half_gradients_are_normed_in_fp32() -> None:
    grads = [torch.full((4,), 300.0, dtype=torch.float16), torch.full((4,), 300.0, dtype=torch.float16)]
    norm = total_norm(grads)
    assert norm.dtype == torch.float32 and math.isclose(norm.item(), 300.0 * math.sqrt(8), rel_tol=1e-6)
    assert not torch.isfinite(torch.linalg.vector_norm(torch.cat(grads).square())), "fp16 would overflow"


def test_zscore_statistics_are_exact_during_warmup_then_clip_spikes() -> None:
    clipper = Clipper(ClipConfig(mode="zscore", warmup=4, zscore=2.0, alpha=0.5), None, torch.device("cpu"))
    seen = [1.0, 2.0, 1.5, 1.7]
    for value in seen:
        norm = torch.tensor(value)
        assert torch.isinf(clipper.threshold(norm)), "no ceiling and no adaptive clipping in warm-up"
        clipper.observe(torch.minimum(norm, clipper.threshold(norm)))
    reference = torch.tensor(seen, dtype=torch.float64)
    assert math.isclose(clipper.mean.item(), reference.mean().item(), rel_tol=1e-6)
    assert math.isclose(clipper.var.item(), reference.var(correction=0).item(), rel_tol=1e-5)
    assert clipper.adaptive
    limit = clipper.mean + 2.0 * clipper.var.sqrt()
    spike = torch.tensor(10.0)
    threshold = clipper.threshold(spike)
    assert torch.equal(threshold, limit)
    assert torch.allclose(spike * clipper.coefficient(spike, threshold), limit, rtol=1e-5)
    mean_before = clipper.mean.clone()
    clipper.observe(torch.minimum(spike, threshold))
    assert torch.allclose(clipper.mean, 0.5 * mean_before + 0.5 * limit), "fed the clipped value"


def test_zscore_keeps_max_grad_norm_as_a_ceiling() -> None:
    clipper = Clipper(ClipConfig(mode="zscore", warmup=2), 1.0, torch.device("cpu"))
    for value in (5.0, 6.0):
        clipper.observe(torch.tensor(value))
    assert clipper.threshold(torch.tensor(7.0)).item() == 1.0


def test_state_round_trips() -> None:
    clipper = Clipper(ClipConfig(mode="zscore", warmup=2), None, torch.device("cpu"))
    for value in (1.0, 3.0, 2.0):
        clipper.observe(torch.tensor(value))
    other = Clipper(ClipConfig(mode="zscore", warmup=2), None, torch.device("cpu"))
    other.load_state_dict(clipper.state_dict())
    assert other.count == 3 and torch.equal(other.mean, clipper.mean) and torch.equal(other.var, clipper.var)


def test_agc_clips_each_unit_to_lambda_times_its_weight_norm() -> None:
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.ones(3, 4))  # each unit's weight norm: 2
        layer.bias.copy_(torch.tensor([1.0, 1.0, 1.0]))
    layer.weight.grad = torch.tensor([[1.0, 0, 0, 0], [0.001, 0, 0, 0], [0, 3.0, 0, 0]])
    layer.bias.grad = torch.tensor([0.001, 0.0, 0.0])
    clipper = Clipper(ClipConfig(mode="agc", agc_lambda=0.1), None, torch.device("cpu"))
    clipped = clipper.apply_agc(list(layer.parameters()))
    assert clipped.item() == 2, "units 0 and 2 of the weight; the bias (norm 0.001 <= 0.1 * 1.73) is kept"
    norms = layer.weight.grad.norm(dim=1)
    assert torch.allclose(norms[[0, 2]], torch.tensor([0.2, 0.2]), rtol=1e-5)
    assert torch.equal(layer.weight.grad[1], torch.tensor([0.001, 0, 0, 0]))
    assert torch.equal(layer.bias.grad, torch.tensor([0.001, 0.0, 0.0]))


def test_scrub_sets_nan_and_both_infinities_to_zero() -> None:
    grad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), -2.0])
    scrub_grads([grad])
    assert grad.tolist() == [1.0, 0.0, 0.0, 0.0, -2.0]
