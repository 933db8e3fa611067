"""Hostile files in a results folder, through the real CLI: each trial handled (the full set also runs in
``python -m tests.torture``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.torture.hostile import TRIALS, Trial, run_hostile


@pytest.mark.slow
@pytest.mark.parametrize("trial", TRIALS, ids=[t.name for t in TRIALS])
def test_hostile_file_is_handled(trial: Trial, golden_results: Path, tmp_path: Path) -> None:
    summary = run_hostile(golden_results, tmp_path, [trial])
    assert summary.trials == 1
    assert summary.failures == [], "\n".join(summary.failures)
    assert summary.handled == 1
