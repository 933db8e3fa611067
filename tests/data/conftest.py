"""Fixtures of the RadioDiff data tests (``pytestmark`` in each module asks for ``few_transmitters``)."""

from __future__ import annotations

import json
import subprocess
import sys
import typing as tp

import pytest

from radiodiff_resume.data import radiomapseer
from tests.data.radiodiff_facts import RADIODIFF_SHUFFLE, TX


@pytest.fixture(scope="module")
def few_transmitters() -> tp.Iterator[None]:
    assert radiomapseer.RADIODIFF_TX_PER_MAP == 80  # RadioDiff's numTx
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(radiomapseer, "RADIODIFF_TX_PER_MAP", TX)
        yield


@pytest.fixture(scope="module")
def radiodiff_order() -> list[int]:
    """RadioDiff's shuffled map positions."""
    out = subprocess.run([sys.executable, "-c", RADIODIFF_SHUFFLE], capture_output=True, text=True,
                         check=True)
    return [int(i) for i in json.loads(out.stdout)]
