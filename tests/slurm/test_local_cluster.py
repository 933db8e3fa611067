"""The local SLURM cluster of ``slurm/local_cluster.sh`` does what the SLURM tests rely on.

Real daemons, no mocks: a requeued job runs again with ``SLURM_RESTART_COUNT=1``; a
``--signal=B:USR1@30`` reaches the batch shell, whose handler requeues the job; ``srun -N2``
lands on two hosts with their own names and addresses, and torch's gloo backend all-reduces
across them. The two batch jobs are scenarios (``scenarios.py``): they run beside the other SLURM
tests' jobs, all submitted at once.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import REPO, hostnames, job_info, sbatch, wait_for
from tests.slurm.scenarios import ClusterJobs, Job, scenario

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

PYTHON = REPO / ".venv" / "bin" / "python"
if not PYTHON.exists():
    PYTHON = Path(sys.executable)


def wait_lines(path: Path, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    pytest.fail(f"{path}: fewer than {count} lines after {timeout} s: {lines}")


def requeue_once_running(job: Job) -> float:
    """``scontrol requeue`` from outside once the job runs; when it was sent (``time.time()``)."""
    wait_for(job.submitted(), {"RUNNING"}, 60, job.env)
    wait_lines(job.folder / "runs.txt", 1, 30)
    requeued_at = time.time()
    subprocess.run(["scontrol", "requeue", job.submitted()], env=job.env, check=True, timeout=30)
    return requeued_at


@scenario("requeue_from_outside", act=requeue_once_running, priority=10)
def submit_requeueable(job: Job) -> str:
    runs = job.folder / "runs.txt"
    # Pinned to node1 (on a 1-node cluster too): the jobs running beside it must not decide that
    # its second run lands on another host.
    return sbatch(
        f"""#!/bin/bash
echo "${{SLURM_RESTART_COUNT:-0}} $(hostname) $(date +%s.%N)" >> {runs}
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 300; fi
""",
        "--requeue", "--job-name=rr-requeue", "--nodelist=node1", f"--output={job.folder}/job-%j.out",
        env=job.env, cwd=job.folder,
    )


@pytest.mark.scenario("requeue_from_outside")
def test_requeue_from_outside_runs_again(cluster_jobs: ClusterJobs) -> None:
    scenario_job = cluster_jobs["requeue_from_outside"]
    job = scenario_job.submitted()
    requeued_at = scenario_job.acted()
    info = wait_for(job, {"COMPLETED"}, 90, cluster_jobs.env, min_restarts=1)

    lines = [line.split() for line in wait_lines(scenario_job.folder / "runs.txt", 2, 5)]
    assert [fields[0] for fields in lines] == ["0", "1"], lines
    assert lines[0][1] == lines[1][1]  # one node: the same host both times
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    print(f"requeue -> running again: {float(lines[1][2]) - requeued_at:.1f} s")


@scenario("usr1_then_self_requeue", priority=10)
def submit_usr1_requeue(job: Job) -> str:
    events = job.folder / "events.txt"
    # B: = the batch shell only. bash runs a trap only between commands: sleep in the
    # background and `wait`, which returns as soon as a trapped signal arrives.
    return sbatch(
        f"""#!/bin/bash
n=${{SLURM_RESTART_COUNT:-0}}
on_usr1() {{
    echo "usr1 $n $(date +%s.%N)" >> {events}
    if [ "$n" = 0 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
}}
trap on_usr1 USR1
echo "start $n $(date +%s.%N)" >> {events}
if [ "$n" != 0 ]; then exit 0; fi
sleep 120 &
while kill -0 $! 2>/dev/null; do wait $! || true; done
""",
        "--requeue", "--time=1", "--signal=B:USR1@30", "--job-name=rr-usr1",
        f"--output={job.folder}/job-%j.out",
        env=job.env, cwd=job.folder,
    )


@pytest.mark.scenario("usr1_then_self_requeue")
def test_signal_before_time_limit_then_self_requeue(cluster_jobs: ClusterJobs) -> None:
    scenario_job = cluster_jobs["usr1_then_self_requeue"]
    job = scenario_job.submitted()
    # The signal comes at most 30 s before the 60 s limit, or up to a minute early (Slurm checks
    # limits periodically): never assume the moment. The requeue then takes ~11-12 s.
    info = wait_for(job, {"COMPLETED"}, 150, cluster_jobs.env, min_restarts=1)

    lines = [line.split() for line in wait_lines(scenario_job.folder / "events.txt", 3, 5)]
    assert [fields[:2] for fields in lines] == [["start", "0"], ["usr1", "0"], ["start", "1"]], lines
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    start, usr1, again = (float(fields[2]) for fields in lines)
    print(f"USR1 {usr1 - start:.1f} s after start; running again {again - usr1:.1f} s after the requeue")


ALL_REDUCE = """\
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # env://: MASTER_ADDR, RANK, ...
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank={dist.get_rank()} world={dist.get_world_size()} host={socket.gethostname()} sum={t.item()}")
dist.destroy_process_group()
"""


def test_two_nodes_are_two_hosts_and_gloo_all_reduces_across(
    slurm_env_2nodes: dict[str, str], tmp_path: Path
) -> None:
    env = slurm_env_2nodes
    proc = subprocess.run(
        ["srun", "-N2", "-n2", "--ntasks-per-node=1", "--job-name=rr-hosts",
         "bash", "-c", 'echo "$SLURM_PROCID $(hostname) $(hostname -I)"'],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    tasks = sorted(line.split() for line in proc.stdout.splitlines())
    assert [task[:2] for task in tasks] == [["0", "node1"], ["1", "node2"]], proc.stdout
    assert [task[2:] for task in tasks] == [["10.200.0.11"], ["10.200.0.12"]], proc.stdout

    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    port = random.randint(20000, 40000)
    # What a user's sbatch script does: the first host of the allocation is the rendezvous.
    launch = (
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1) '
        f"MASTER_PORT={port} RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS OMP_NUM_THREADS=1; "
        f"exec {PYTHON} {script}"
    )
    proc = subprocess.run(
        ["srun", "-N2", "-n2", "--ntasks-per-node=1", "--job-name=rr-gloo", "bash", "-c", launch],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank="))
    assert results == [
        "rank=0 world=2 host=node1 sum=3.0",
        "rank=1 world=2 host=node2 sum=3.0",
    ], proc.stdout + proc.stderr


def test_helpers_parse_scontrol(slurm_env: dict[str, str], tmp_path: Path) -> None:
    job = sbatch('#!/bin/bash\necho "args: $*"\n', "--job-name=rr parse test", env=slurm_env, cwd=tmp_path,
                 script_args=["--cfg", "a b"])
    info = wait_for(job, {"COMPLETED"}, 60, slurm_env)
    assert info["JobId"] == job and info["JobName"] == "rr parse test", info
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    assert hostnames(info["NodeList"], slurm_env)[0].startswith("node")
    assert job_info(job, slurm_env)["StdOut"] == f"{tmp_path}/slurm-{job}.out"
    assert (tmp_path / f"slurm-{job}.out").read_text() == "args: --cfg a b\n"
