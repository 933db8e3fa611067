"""``scancel`` right after a stop signal on the real local cluster: the job stays cancelled.

The signal (USR2 to the tasks through submitit, USR1 to the batch shell of ``slurm/train.sbatch``)
comes first, so it is the stop's reason; the cancel's SIGTERM follows within milliseconds. The job
stops at its next step with a committed checkpoint and, before requeueing, asks the controller:
``JobState=COMPLETING`` without ``Reason=TimeLimit`` is a cancel, and a requeue then would bring the
cancelled job back (the controller accepts it).
"""

from __future__ import annotations

import subprocess
import time
import typing as tp
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm.cluster import job_info, sbatch, wait_for
from tests.slurm.scenarios import ClusterJobs, Job, scenario
from tests.slurm.test_requeue import (
    ACTION_STEP_S,
    EVERY,
    committed,
    events,
    job_env,
    results_of,
    setup,
    submit,
    write_config,
)

REQUEUE_WOULD_SHOW_S = 20
"""A requeue shows as a restart within about 12 s here (cred_expire + 1 s, then the scheduler)."""


def signal_then_cancel(flags: tuple[str, ...]) -> tp.Callable[[Job], dict[str, tp.Any]]:
    def act(job: Job) -> dict[str, tp.Any]:
        results = results_of(job)
        job.wait_until(lambda: committed(results, 2 * EVERY))
        subprocess.run(["scancel", *flags, job.submitted()], env=job.env, check=True, timeout=60)
        subprocess.run(["scancel", job.submitted()], env=job.env, check=True, timeout=60)
        wait_for(job.submitted(), {"CANCELLED"}, timeout=120, env=job.env)
        time.sleep(REQUEUE_WOULD_SHOW_S)
        stopped = [e for e in events(results) if e["event"] == "stopped"]
        return {"info": job_info(job.submitted(), job.env), "stopped": stopped,
                "committed": [committed(results, e["step"]) for e in stopped]}

    return act


@scenario("usr2_then_cancel", act=signal_then_cancel(("--signal=USR2",)), priority=3)
def submit_untimed(job: Job) -> str:
    folder, ae = setup(job.jobs)
    return submit(write_config(folder, job.jobs.synth_cache, job.name, ae, step_s=ACTION_STEP_S, time_min=20),
                  job_env(job.env))


@scenario("usr1_then_cancel_template", act=signal_then_cancel(("--batch", "--signal=USR1")), priority=10)
def sbatch_untimed(job: Job) -> str:
    folder, ae = setup(job.jobs)
    cfg = write_config(folder, job.jobs.synth_cache, job.name, ae, step_s=ACTION_STEP_S)
    return sbatch(REPO / "slurm" / "train.sbatch", "--time=20", "--cpus-per-task=1",
                  f"--output={folder}/{job.name}-%j.out", script_args=["--cfg", str(cfg)],
                  env=job_env(job.env), cwd=folder)


@pytest.mark.parametrize("name", [
    pytest.param("usr2_then_cancel", id="submitit", marks=pytest.mark.scenario("usr2_then_cancel")),
    pytest.param("usr1_then_cancel_template", id="sbatch-template",
                 marks=pytest.mark.scenario("usr1_then_cancel_template")),
])
def test_a_cancel_after_a_stop_signal_is_not_undone(cluster_jobs: ClusterJobs, name: str) -> None:
    scenario_job = cluster_jobs[name]
    job = scenario_job.submitted()
    left = scenario_job.acted()

    info = left["info"]
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    assert left["stopped"] and left["committed"] == [True] * len(left["stopped"]), left["stopped"]
    if name == "usr2_then_cancel":  # sent to the tasks directly: it is the stop's reason
        assert left["stopped"][0]["reason"] == "SIGUSR2", left["stopped"]
    results = results_of(scenario_job)
    log = (Path(f"{results}-{job}.out") if name.endswith("template")
           else results / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "not requeued" in log and "cancelled (scancel: JobState=COMPLETING" in log, log[-3000:]


# ----- the sbatch template: how each way of sending SIGTERM ends


def cancel_with(flags: tuple[str, ...]) -> tp.Callable[[Job], dict[str, tp.Any]]:
    def act(job: Job) -> dict[str, tp.Any]:
        results = results_of(job)
        job.wait_until(lambda: committed(results, 2 * EVERY))
        subprocess.run(["scancel", *flags, job.submitted()], env=job.env, check=True, timeout=60)
        wait_for(job.submitted(), {"CANCELLED", "FAILED", "COMPLETED"}, timeout=180, env=job.env)
        time.sleep(REQUEUE_WOULD_SHOW_S)
        log = events(results)
        return {"info": job_info(job.submitted(), job.env),
                "stopped": [e for e in log if e["event"] == "stopped"],
                "saved": [e["step"] for e in log if e["event"] == "checkpoint_saved"],
                "out": Path(f"{results}-{job.submitted()}.out").read_text()}

    return act


scenario("cancel_template", act=cancel_with(()), priority=10)(sbatch_untimed)
scenario("full_term_template", act=cancel_with(("--full", "--signal=TERM")), priority=10)(sbatch_untimed)
scenario("batch_term_template", act=cancel_with(("--batch", "--signal=TERM")), priority=10)(sbatch_untimed)
scenario("steps_term_template", act=cancel_with(("--signal=TERM",)), priority=10)(sbatch_untimed)


@pytest.mark.scenario("cancel_template")
def test_sbatch_template_scancel_saves_and_stays_cancelled(cluster_jobs: ClusterJobs) -> None:
    """Plain ``scancel``: Slurm sends SIGTERM to the trainers (their own step) and to the batch step
    (the shell and srun); the trainers save, the shell does not forward TERM and does not requeue."""
    left = cluster_jobs["cancel_template"].acted()

    assert left["info"]["JobState"] == "CANCELLED" and left["info"]["Restarts"] == "0", left["info"]
    [stopped] = left["stopped"]
    assert stopped["step"] in left["saved"], left
    assert "got TERM" in left["out"] and "not requeued" in left["out"], left["out"][-3000:]


@pytest.mark.scenario("batch_term_template")
def test_sbatch_template_term_to_the_shell_alone_saves_and_ends(cluster_jobs: ClusterJobs) -> None:
    """``scancel --batch --signal=TERM``: only the batch shell gets it. The shell passes it on as a
    stop signal srun forwards (not as TERM, on which srun SIGKILLs the trainers): the trainers save,
    and the job ends without a requeue (a TERM that no time limit or preemption explains)."""
    left = cluster_jobs["batch_term_template"].acted()

    assert left["info"]["Restarts"] == "0", left["info"]
    [stopped] = left["stopped"]
    assert stopped["step"] in left["saved"], left
    assert "stay: SIGTERM without a time limit or a preemption" in left["out"], left["out"][-3000:]


@pytest.mark.scenario("full_term_template")
def test_sbatch_template_full_term_kills_the_step_unsaved(cluster_jobs: ClusterJobs) -> None:
    """``scancel --full --signal=TERM`` also signals srun (a child of the batch step), and srun 22.05
    answers SIGTERM by SIGKILLing its tasks ("forcing job termination"): the trainers die without
    a save, whatever the shell does. The job is not requeued; the next run resumes from the newest
    committed checkpoint."""
    left = cluster_jobs["full_term_template"].acted()

    assert left["info"]["Restarts"] == "0" and left["info"]["JobState"] != "COMPLETED", left["info"]
    assert not left["stopped"], "killed, not stopped"
    out = left["out"]
    assert "srun: forcing job termination" in out and "not requeued" in out, out[-3000:]


@pytest.mark.scenario("steps_term_template")
def test_sbatch_template_term_to_the_steps_alone_requeues(cluster_jobs: ClusterJobs) -> None:
    """``scancel --signal=TERM`` reaches the trainers only: they stop with a checkpoint, but the shell
    saw no TERM and the controller shows no cancel, so the template requeues (``submit``, whose
    rank 0 saw the TERM, would not: ``test_signals.py``)."""
    left = cluster_jobs["steps_term_template"].acted()

    assert left["info"]["JobState"] == "COMPLETED" and left["info"]["Restarts"] == "1", left["info"]
    assert left["stopped"][0]["reason"] == "SIGTERM" and left["stopped"][0]["step"] in left["saved"], left
    assert "requeue: stop signal" in left["out"], left["out"][-3000:]
