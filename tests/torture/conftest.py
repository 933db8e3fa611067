"""The torture tests' own golden run (the fixtures of tests/checkpoint are scoped to that package)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.config import build_config
from tests.checkpoint.helpers import GOLDEN, STEP2, STEP4, build, committed
from tests.conftest import tiny_raw, write_random_first_stage


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> tp.Iterator[None]:
    """One intra-op thread for the tiny models (much faster on a shared 2-core machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def golden_results(one_thread: None, tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Path:
    """Results folder of a finished 4-step run with checkpoints at steps 2 and 4; never written to."""
    results = tmp_path_factory.mktemp("torture-golden") / "run"
    cfg = build_config(tiny_raw(results, synth_cache), GOLDEN)
    write_random_first_stage(cfg)
    build(cfg).fit()
    assert committed(results) == [STEP2, STEP4]
    assert (results / "config.yaml").is_file()
    return results
