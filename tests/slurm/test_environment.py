"""What a task reads from SLURM's variables (pure functions; the real cluster tests use them too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from radiodiff_resume.slurm.environment import (
    cpu_threads_from_slurm,
    expand_nodelist,
    parse_time_left,
    tasks_per_node,
    torch_env_from_slurm,
)
from tests.slurm.cluster import cluster_env

NODELISTS = [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[007-009,012],login1", ["gpu007", "gpu008", "gpu009", "gpu012", "login1"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("c[1-2]-[3,5],x", ["c1-3", "c1-5", "c2-3", "c2-5", "x"]),
]
"""Real Slurm node-list forms, each with what ``scontrol show hostnames`` prints for it."""


@pytest.mark.parametrize("nodelist, hosts", [*NODELISTS, ("a[1,3]b,c", ["a1b", "a3b", "c"])])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed (slurm-wlm)")
@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_expand_nodelist_agrees_with_scontrol(nodelist: str, hosts: list[str]) -> None:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=60, env=cluster_env())
    if out.returncode != 0:
        pytest.skip(f"scontrol show hostnames needs a slurm.conf here: {out.stderr.strip()}")
    assert out.stdout.split() == hosts == expand_nodelist(nodelist)


@pytest.mark.parametrize("text, counts", [("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("3,1", [3, 1])])
def test_tasks_per_node(text: str, counts: list[int]) -> None:
    assert tasks_per_node(text) == counts


def test_an_uneven_layout_has_its_own_local_world_size() -> None:
    """``--ntasks=3`` over 2 nodes: 2 tasks on the first node, 1 on the second."""
    env = {**STEP, "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_PROCID": "2",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "1"}
    assert torch_env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "1"
    assert torch_env_from_slurm({**env, "SLURM_NODEID": "0", "SLURM_PROCID": "0"})["LOCAL_WORLD_SIZE"] == "2"


STEP = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_JOB_NODELIST": "node[1-2]"}


def test_torch_env_from_an_srun_task() -> None:
    assert torch_env_from_slurm(STEP) == {
        "MASTER_ADDR": "node1", "MASTER_PORT": str(20000 + 1234), "RANK": "3", "WORLD_SIZE": "4",
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.parametrize("change", [
    {"RANK": "0"},  # torchrun / accelerate launch already set torch's variables
    {"SLURM_STEP_NUM_TASKS": "1"},  # one task: no process group
])
def test_torch_env_left_alone(change: dict[str, str]) -> None:
    assert torch_env_from_slurm({**STEP, **change}) == {}


def test_the_batch_script_itself_is_not_a_task() -> None:
    env = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}
    assert torch_env_from_slurm(env) == {}


@pytest.mark.parametrize("text, seconds", [
    ("0:45", 45), ("12:03", 723), ("1:00:00", 3600), ("2-01:00:05", 2 * 86400 + 3605),
    ("UNLIMITED", None), ("", None),
])
def test_parse_time_left(text: str, seconds: float | None) -> None:
    assert parse_time_left(text) == seconds


@pytest.mark.parametrize("env, threads", [
    ({"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "4"}, 4),
    ({"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"}, None),  # the user's
    ({"SLURM_CPUS_PER_TASK": "4"}, None),  # the batch script, not a task of a step
    ({"SLURM_STEP_ID": "0"}, None),
])
def test_cpu_threads_from_slurm(env: dict[str, str], threads: int | None) -> None:
    assert cpu_threads_from_slurm(env) == threads


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 1 thread from the default")
def test_a_task_uses_as_many_threads_as_it_has_cpus_even_after_torch_is_imported() -> None:
    """``cli train`` imports torch before it reads SLURM's variables: the pool is resized, not only
    ``OMP_NUM_THREADS`` set."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("SLURM_")}
    env |= {"SLURM_STEP_ID": "0", "SLURM_CPUS_PER_TASK": "1", "SLURM_PROCID": "0"}
    code = ("import os, torch; from radiodiff_resume.slurm.environment import export_torch_env; "
            "before = torch.get_num_threads(); export_torch_env(); "
            "print(before, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    before, after, omp = out.stdout.split()
    assert int(before) >= 2 and (after, omp) == ("1", "1"), out.stderr
