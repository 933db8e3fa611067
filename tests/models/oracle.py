"""Upstream RadioDiff's own outputs (``tests/fixtures/radiodiff_reference``, see its README): the weights
``fill.py`` gives each key, the fixed inputs and random draws, and the outputs upstream computed from them.

Everything is read from the folder at run time (no value is copied into a test), so the parity tests hold
for any oracle in that format. ``RADIODIFF_ORACLE`` points the tests at another such folder.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import typing as tp
from pathlib import Path

import torch
from safetensors.torch import load_file

FOLDER = Path(os.environ.get("RADIODIFF_ORACLE", Path(__file__).resolve().parents[1] / "fixtures"
                             / "radiodiff_reference"))


@functools.cache
def keys() -> dict[str, tp.Any]:
    return tp.cast(dict[str, tp.Any], json.loads((FOLDER / "keys.json").read_text()))


@functools.cache
def meta() -> dict[str, tp.Any]:
    return tp.cast(dict[str, tp.Any], json.loads((FOLDER / "outputs.json").read_text()))


@functools.cache
def inputs() -> dict[str, torch.Tensor]:
    return load_file(str(FOLDER / "inputs.safetensors"))


@functools.cache
def outputs() -> dict[str, torch.Tensor]:
    return load_file(str(FOLDER / "outputs.safetensors"))


@functools.cache
def fill_module() -> tp.Any:
    spec = importlib.util.spec_from_file_location("radiodiff_oracle_fill", FOLDER / "fill.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_entries(prefix: str = "", variant: str = "head") -> list[list[tp.Any]]:
    """``keys.json``'s ``LatentDiffusion.state_dict()`` entries under ``prefix`` (v1: without HEAD's extra
    keys)."""
    drop = set(keys()["v1_model_diff"]["only_in_head"]) if variant == "v1" else set()
    return [e for e in keys()["model"]["entries"] if e[0].startswith(prefix) and e[0] not in drop]


def filled(prefix: str = "", variant: str = "head") -> dict[str, torch.Tensor]:
    """``fill.py``'s values for the entries under ``prefix``, checked against the float64 sums that
    ``keys.json`` records, so that a torch whose random stream differs cannot pass for a model bug."""
    entries = model_entries(prefix, variant)
    values = fill_module().fill([(e[0], e[1], e[2]) for e in entries])
    for key, shape, _dtype, _kind, _grad, total in entries:
        got = float(values[key].double().sum())
        assert abs(got - total) <= 1e-9 * max(1.0, abs(total)), f"fill.py gives {key} another value here"
        assert list(values[key].shape) == shape
    return tp.cast(dict[str, torch.Tensor], values)


def check(name: str, got: torch.Tensor) -> None:
    """``got`` equals upstream's output ``name`` within the tolerance the oracle recommends."""
    tolerance = meta()["outputs"][name]["recommended_tolerance"]
    torch.testing.assert_close(got.detach().to(outputs()[name].dtype), outputs()[name], **tolerance,
                               msg=lambda m: f"{name}: {m}")
