"""The session's golden run (tests/conftest.py: 4 steps, checkpoints at steps 2 and 4) for the tool
tests; each test works on its own copy of it, with the run's own config as a YAML file."""

from __future__ import annotations

import shutil
import typing as tp
from pathlib import Path

import pytest

from radiodiff_resume.config import build_config, to_yaml
from tests.checkpoint.helpers import GOLDEN, sha256_file
from tests.conftest import Golden, tiny_raw


class RunsCode:
    """Unpickling this calls ``open(path, "w")``: the marker file exists iff the pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[tp.Any, ...]:
        return open, (str(self.path), "w")


@pytest.fixture(scope="session")
def tool_golden(golden: Golden) -> Path:
    """The golden results folder; never written to."""
    return golden.results


@pytest.fixture
def tool_run(tmp_path: Path, tool_golden: Path, synth_cache: Path) -> tp.Callable[..., Path]:
    """``tool_run(*overrides)`` → the YAML config of a private copy of the golden run (checkpoints and
    first-stage weights), with the overrides applied."""

    def make(*overrides: str) -> Path:
        results = tmp_path / "run"
        if not results.exists():
            results.mkdir()
            shutil.copytree(tool_golden / "checkpoints", results / "checkpoints")
            shutil.copy2(tool_golden / "ae.safetensors", results / "ae.safetensors")
        cfg = tmp_path / "run.yaml"
        cfg.write_text(to_yaml(build_config(tiny_raw(results, synth_cache), [*GOLDEN, *overrides])))
        return cfg

    return make


def tree(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with its SHA-256 (files) or ``dir``: equal trees, byte for byte."""
    return {str(p.relative_to(folder)): sha256_file(p) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}
