"""CI's share of the SIGKILL torture (the full set: ``python -m tests.torture``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.torture.kills import run_kill_trials


@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_bit_identical(tmp_path: Path, synth_cache: Path) -> None:
    kills = 50 if os.environ.get("RADIODIFF_TORTURE") == "full" else 6
    summary = run_kill_trials(tmp_path, synth_cache, kills=kills, seed=11)
    print(summary)
    assert summary.kills == kills, "the run must not finish before every kill landed"
    assert summary.restarts_resumed >= 1
