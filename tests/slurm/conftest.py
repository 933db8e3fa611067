"""Fixtures for tests on a real local SLURM cluster.

Every test that uses ``slurm_env``, ``slurm_env_2nodes`` or ``cluster_jobs`` is marked ``slow`` and
``slurm`` (``-m "not slurm"`` leaves them out). Marked by fixture, not by folder: this folder also
holds fast pure-Python tests of ``radiodiff_resume.slurm`` that need no cluster.
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest

from tests.slurm.cluster import ensure_cluster
from tests.slurm.scenarios import SCENARIOS, ClusterJobs, selected

HERE = Path(__file__).resolve().parent


CLUSTER_FIXTURES = frozenset({"slurm_env", "slurm_env_2nodes", "cluster_jobs"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "scenario(*names): the SLURM jobs (tests/slurm/scenarios.py) this test checks; the jobs of all "
        "selected tests are submitted together, before the first of them runs",
    )


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


@pytest.fixture(scope="session")
def cluster_jobs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, synth_cache: Path
) -> tp.Iterator[ClusterJobs]:
    """The jobs of every scenario the selected tests check, all submitted now (``scenarios.py``).

    The cluster gets the most nodes any selected test needs first: starting a bigger one later
    would end the jobs already running.
    """
    items = request.session.items
    names = selected(items)
    nodes = max([1, *(SCENARIOS[name].nodes for name in names),
                 *(2 for item in items if "slurm_env_2nodes" in getattr(item, "fixturenames", ()))])
    jobs = ClusterJobs(ensure_cluster(nodes), tmp_path_factory, synth_cache)
    jobs.start(names)
    yield jobs
    jobs.close()
