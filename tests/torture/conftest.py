"""The torture tests' name for the session's golden run (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Golden


@pytest.fixture(scope="session")
def golden_results(golden: Golden) -> Path:
    """Results folder of a finished 4-step run with checkpoints at steps 2 and 4; never written to."""
    return golden.results
