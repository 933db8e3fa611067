"""The torture tests' own golden run (the fixtures of tests/checkpoint are scoped to that package)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest

from tests.checkpoint.helpers import torch_threads, train_golden


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> tp.Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="package")
def golden_results(one_thread: None, tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Path:
    """Results folder of a finished 4-step run with checkpoints at steps 2 and 4; never written to."""
    results = tmp_path_factory.mktemp("torture-golden") / "run"
    train_golden(results, synth_cache)
    assert (results / "config.yaml").is_file()
    return results
