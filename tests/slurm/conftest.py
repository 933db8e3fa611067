"""Fixtures for tests on a real local SLURM cluster.

Every test that uses ``slurm_env`` or ``slurm_env_2nodes`` is marked ``slow`` and ``slurm``
(``-m "not slurm"`` leaves them out). Marked by fixture, not by folder: this folder also holds
fast pure-Python tests of ``radiodiff_resume.slurm`` that need no cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.slurm.cluster import ensure_cluster

HERE = Path(__file__).resolve().parent


CLUSTER_FIXTURES = frozenset({"slurm_env", "slurm_env_2nodes"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Environment (with ``SLURM_CONF``) for a local cluster of at least 1 node; skips if none can start."""
    return ensure_cluster(1)


@pytest.fixture(scope="session")
def slurm_env_2nodes() -> dict[str, str]:
    """Same with at least 2 nodes, each its own host (node1/10.200.0.11, node2/10.200.0.12)."""
    return ensure_cluster(2)
