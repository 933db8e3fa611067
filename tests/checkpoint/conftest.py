"""One real training run shared by the checkpoint tests (session scope), copied before any test touches it."""

from __future__ import annotations

import copy
import shutil
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest

from radiodiff_resume.config import Config
from tests.checkpoint.helpers import GOLDEN, torch_threads, train_golden


@dataclass(frozen=True)
class Golden:
    results: Path
    """Results folder of a finished 4-step run; tests copy it and never write into it."""
    state: dict[str, tp.Any]
    """``trainer.state_dict()`` at the end of the run (what ``step-00000004`` holds)."""


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> tp.Iterator[None]:
    """This package's saves and verifications all run on one intra-op thread (see torch_threads)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="package")
def golden(one_thread: None, tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Golden:
    results = tmp_path_factory.mktemp("golden") / "run"
    trainer = train_golden(results, synth_cache)
    return Golden(results, copy.deepcopy(trainer.state_dict()))


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
