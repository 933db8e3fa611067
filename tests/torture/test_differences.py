"""Every environment / config difference case is handled as documented (see differences.py)."""

from __future__ import annotations

from pathlib import Path

from tests.torture.differences import CASES, run_differences


def test_differences_never_quarantine_and_always_have_a_way_out(golden_results: Path, tmp_path: Path) -> None:
    summary = run_differences(golden_results, tmp_path)
    assert summary.failures == []
    assert (summary.trials, summary.handled, summary.false_alarms) == (len(CASES), len(CASES), 0)
