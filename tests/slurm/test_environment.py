"""What a task reads from SLURM's variables (pure functions; the real cluster tests use them too)."""

from __future__ import annotations

import pytest

from radiodiff_resume.slurm.environment import expand_nodelist, parse_time_left, torch_env_from_slurm


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[007-009,012],login1", ["gpu007", "gpu008", "gpu009", "gpu012", "login1"]),
    ("a[1,3]b,c", ["a1b", "a3b", "c"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


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
