"""The batch check: per-sample fault codes and the copy that is safe to run."""

from __future__ import annotations

import torch

from radiodiff_resume.guard.sanitize import CLEAN, NONFINITE, TOO_LARGE, checked_batch, finite_batch


def batch() -> dict[str, object]:
    image = torch.zeros(4, 1, 2, 2)
    cond = torch.ones(4, 3, 2, 2)
    image[1, 0, 0, 1] = float("nan")
    cond[2, 1, 1, 0] = 5e4
    cond[3, 0, 0, 0] = -float("inf")
    image[3, 0, 1, 1] = 2e4
    return {"image": image, "cond": cond, "name": ["a", "b", "c", "d"]}


def test_codes_name_the_worst_value_of_each_sample_and_the_copy_is_zeroed_there() -> None:
    raw = batch()
    clean, codes = checked_batch(raw, max_abs=1e4)
    assert codes is not None and codes.tolist() == [CLEAN, NONFINITE, TOO_LARGE, NONFINITE]
    assert clean["name"] == raw["name"]
    expected_cond = torch.ones(4, 3, 2, 2)
    expected_cond[2, 1, 1, 0] = 0.0
    expected_cond[3, 0, 0, 0] = 0.0
    assert torch.equal(clean["cond"], expected_cond) and torch.equal(clean["image"], torch.zeros(4, 1, 2, 2))


def test_without_a_bound_only_nan_and_inf_are_faults() -> None:
    raw = batch()
    clean, ok = finite_batch(raw)
    assert ok is not None and ok.tolist() == [True, False, True, False]
    assert clean["cond"][2, 1, 1, 0] == 5e4, "finite values come out unchanged"
    assert checked_batch({"name": ["a"]}) == ({"name": ["a"]}, None)
