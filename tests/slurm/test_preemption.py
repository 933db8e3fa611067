"""Real preemption on the local cluster (``slurm/local_cluster.sh``: partition ``preemptible`` with
``PreemptMode=REQUEUE`` and a ``GraceTime``; partition ``urgent`` of a higher ``PriorityTier`` on
the same nodes; one ``slot`` GRES per node that only these jobs ask for).

A training job holds its node's ``slot`` in ``preemptible``; once a checkpoint is committed, a job
in ``urgent`` asks for the same node's slot and can only start by preempting it. Slurm 22.05 then
sends SIGTERM to the job's steps (not to the batch shell) and leaves it ``RUNNING`` with
``PreemptTime`` set; the job stops at its next step with a committed checkpoint, asks the
controller, sees the preemption and requeues itself (Slurm requeues only a job still running when
the grace time ends: one that ends earlier is ``COMPLETED``). It finishes bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.cluster import job_info, sbatch, wait_for
from tests.slurm.scenarios import ClusterJobs, Job, scenario
from tests.slurm.test_requeue import (
    ACTION_STEP_S,
    EVERY,
    assert_nothing_lost,
    committed,
    job_env,
    results_of,
    setup,
    straight_weights,
    submit,
    write_config,
)
from tests.trainer.test_resume_exact import Weights, assert_bit_identical, final_tensors

SLOT = "--gres=slot:1"


@pytest.fixture(scope="module")
def straight(cluster_jobs: ClusterJobs) -> Weights:
    return straight_weights(cluster_jobs)


def preempt_by_urgent_job(job: Job) -> dict[str, dict[str, str]]:
    """Once step ``2 * EVERY`` is committed: a job of partition ``urgent`` that needs the slot of
    the training job's node. Then waits for the training job to complete after a requeue, and
    returns both jobs' controller view (taken here, at once: the controller forgets a finished
    job after ``MinJobAge``, and the test may run much later)."""
    job.wait_until(lambda: committed(results_of(job), 2 * EVERY))
    node = job_info(job.submitted(), job.env)["NodeList"]
    urgent = job.also(sbatch("#!/bin/bash\ntrue\n", "-p", "urgent", SLOT, f"--nodelist={node}",
                             f"--output={results_of(job)}-urgent-%j.out", env=job.env))
    info = wait_for(job.submitted(), {"COMPLETED"}, timeout=600, env=job.env, min_restarts=1)
    return {"job": info, "urgent": job_info(urgent, job.env)}


@scenario("preempt_submit", act=preempt_by_urgent_job, priority=3)
def submit_preemptible(job: Job) -> str:
    folder, ae = setup(job.jobs)
    cfg = write_config(folder, job.jobs.synth_cache, job.name, ae, step_s=ACTION_STEP_S, time_min=20,
                       partition="preemptible", additional_parameters={"gres": "slot:1"})
    return submit(cfg, job_env(job.env))


@pytest.mark.scenario("preempt_submit")
def test_preempted_submitit_job_saves_requeues_itself_and_finishes(
    cluster_jobs: ClusterJobs, straight: Weights
) -> None:
    scenario_job = cluster_jobs["preempt_submit"]
    results = results_of(scenario_job)
    job = scenario_job.submitted()
    acted = scenario_job.acted()

    assert acted["job"]["Partition"] == "preemptible", acted["job"]
    assert acted["urgent"]["JobState"] == "COMPLETED", "the preemptor ran"
    stopped = assert_nothing_lost(results, stops=1, reason="SIGTERM")
    assert [e["reason"] for e in stopped] == ["SIGTERM"], "one stop: the preemption's SIGTERM"
    ledger = json.loads((results / "slurm" / job / "requeues.json").read_text())
    assert ledger == {"timeouts": 0, "other": 1}, "a preemption is not a time limit"
    log = (results / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "(preempted at " in log, log[-3000:]
    assert_bit_identical(straight, final_tensors(results))


@scenario("preempt_template", act=preempt_by_urgent_job, priority=10)  # sbatch: a quick submission
def sbatch_preemptible(job: Job) -> str:
    folder, ae = setup(job.jobs)
    cfg = write_config(folder, job.jobs.synth_cache, job.name, ae, step_s=ACTION_STEP_S)
    return sbatch(REPO / "slurm" / "train.sbatch", "-p", "preemptible", SLOT, "--time=20",
                  "--cpus-per-task=1", f"--output={folder}/{job.name}-%j.out",
                  script_args=["--cfg", str(cfg)], env=job_env(job.env), cwd=folder)


@pytest.mark.scenario("preempt_template")
def test_preempted_sbatch_template_job_saves_requeues_itself_and_finishes(
    cluster_jobs: ClusterJobs, straight: Weights
) -> None:
    """Through ``slurm/train.sbatch``: the batch shell gets no signal at all (Slurm sends the
    preemption's SIGTERM to the job steps only), the trainers stop on it, the shell asks the
    controller and requeues."""
    scenario_job = cluster_jobs["preempt_template"]
    results = results_of(scenario_job)
    job = scenario_job.submitted()
    acted = scenario_job.acted()

    assert acted["urgent"]["JobState"] == "COMPLETED", "the preemptor ran"
    log = Path(f"{results}-{job}.out").read_text()
    assert "got TERM" not in log.split("requeueing job")[0], "the batch shell got no TERM"
    assert "requeue: preempted at" in log and "training finished" in log, log[-3000:]
    stopped = assert_nothing_lost(results, stops=1, reason="SIGTERM")
    assert [e["reason"] for e in stopped] == ["SIGTERM"]
    assert_bit_identical(straight, final_tensors(results))


def test_the_default_partition_is_never_preempted(slurm_env: dict[str, str]) -> None:
    """The cluster's other jobs (partition ``debug``) are not preemptible."""
    out = subprocess.run(["scontrol", "show", "partition", "-o"], env=slurm_env, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    modes = {line.split("PartitionName=")[1].split()[0]: line.split("PreemptMode=")[1].split()[0]
             for line in out.splitlines()}
    assert modes["debug"] == "OFF" and modes["preemptible"] == "REQUEUE", modes
