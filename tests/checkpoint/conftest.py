"""The session's golden run (tests/conftest.py), copied for each checkpoint test before it touches it."""

from __future__ import annotations

import shutil
import typing as tp
from pathlib import Path

import pytest

from radiodiff_resume.config import Config
from tests.checkpoint.helpers import GOLDEN
from tests.conftest import Golden

__all__ = ["Golden"]  # test_verify types its fixture with it


@pytest.fixture
def run(tmp_path: Path, golden: Golden) -> Path:
    """A private copy of the golden results folder (checkpoints and first-stage weights only)."""
    results = tmp_path / "run"
    results.mkdir()
    shutil.copytree(golden.results / "checkpoints", results / "checkpoints")
    shutil.copy2(golden.results / "ae.safetensors", results / "ae.safetensors")
    return results


@pytest.fixture
def run_cfg(run: Path, make_cfg: tp.Callable[..., Config]) -> tp.Callable[..., Config]:
    """``run_cfg("checkpoint.keep_last=2")`` → the golden run's config on the private copy, plus overrides."""

    def make(*overrides: str) -> Config:
        return make_cfg(*GOLDEN, *overrides, results=run)

    return make
