"""Requeue on a real SLURM cluster (``slurm/local_cluster.sh``): time limits, a preemption and a
SIGKILL of the job's processes, through ``radiodiff-resume submit`` (submitit) and through the
sbatch template — each job ends COMPLETED after at least one requeue, with final weights equal,
bit for bit, to an uninterrupted run's, and no step done twice or lost.

Every job here is a scenario (``scenarios.py``): all are submitted together when the first SLURM
test of the session starts, and the cluster runs them side by side; what a test does to its job
while it runs (a preemption signal, a SIGKILL, requeues, a cancel) happens in the scenario's
action, in its own thread. The jobs train a paced denoiser (``paced.py``): each step takes a fixed
wall time, so how long a job trains does not depend on the machine's speed or load.

Slurm may send the ``--signal`` well before the lead asked for (it checks time limits every
30 s), so no test assumes when it comes: each only needs the job to outlive one incarnation.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.config import build_config
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.slurm.cluster import job_info, sbatch, wait_for
from tests.slurm.scenarios import ClusterJobs, Job, scenario
from tests.trainer.test_resume_exact import Weights, assert_bit_identical, final_tensors, run_to_end

STEPS, EVERY = 100, 10
"""Training steps of every job but the crash loops', and its checkpoint period."""
TIME_MIN, LEAD_S, STEP_S = 2, 30, 1.0
"""The time-limited jobs: a 2-minute limit, the signal asked 30 s ahead, one paced step a second.
Slurm checks time limits every 30 s and sends the signal at the first check that is at most
``LEAD_S`` + 30 s before the limit: 60-90 s after the job started (78-81 s measured here). So an
incarnation trains for at most 90 s minus its start-up: STEPS * STEP_S = 100 s of training always
outlives the first one, and mostly ends in the second (a third where start-ups are slow: two
processes took up to 60 s to start on a loaded 2-core machine)."""
ACTION_STEP_S = 0.5
"""The jobs the test itself stops or kills (no time limit): STEPS * 0.5 = 50 s of training, time
enough to act once step ``2 * EVERY`` is committed, whatever else the machine runs."""


def write_config(folder: Path, synth_cache: Path, name: str, ae: Path, step_s: float | None = None,
                 **slurm: tp.Any) -> Path:
    """The job's config; ``step_s``: train the paced denoiser (``None``: plain ``UNet2DModel``)."""
    raw = tiny_raw(folder / name, synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(ae)
    if step_s is not None:
        raw["model"]["unet"]["target"] = "tests.slurm.paced.PacedUNet"
        raw["model"]["unet"]["params"]["step_s"] = step_s
    raw["trainer"].update(train_num_steps=STEPS, save_and_sample_every=STEPS, val_batches=0, log_freq=100)
    raw["checkpoint"] = {"every": EVERY, "keep_last": 2}
    # stop_margin_s null: these jobs test the signals; tests/slurm/test_clock_stop.py the clock
    raw["slurm"] = {"time_min": TIME_MIN, "signal_lead_s": LEAD_S, "cpus_per_task": 1, "stop_margin_s": None,
                    **slurm}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def job_env(slurm_env: dict[str, str]) -> dict[str, str]:
    return {**slurm_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHON": sys.executable}


# ----- what the scenarios share: a first stage; the uninterrupted runs they are compared with


def setup(jobs: ClusterJobs) -> tuple[Path, Path]:
    """A first stage every run uses, in the folder of this module's runs."""

    def make() -> tuple[Path, Path]:
        folder = jobs.tmp.mktemp("requeue")
        ae = folder / "ae.safetensors"
        straight = write_config(folder, jobs.synth_cache, "straight", ae)
        write_random_first_stage(build_config(yaml.safe_load(straight.read_text())))
        return folder, ae

    return jobs.once("requeue", make)


@pytest.fixture(scope="module")
def shared(cluster_jobs: ClusterJobs) -> tuple[Path, Path]:
    return setup(cluster_jobs)


_STRAIGHT: dict[int, Weights] = {}


def straight_weights(jobs: ClusterJobs) -> Weights:
    """The uninterrupted run (the plain denoiser, not paced), on this host while the jobs run (once
    they are all submitted: the submissions are on the way of every job); once per session, for
    every module that compares with it (fixtures run in the main thread: no lock; not
    ``jobs.once``, whose lock the scenarios' submissions need meanwhile)."""
    if id(jobs) not in _STRAIGHT:
        folder, _ = setup(jobs)
        jobs.wait_submitted()
        run_to_end(folder / "straight.yaml", 1, folder)
        _STRAIGHT[id(jobs)] = final_tensors(folder / "straight")
    return _STRAIGHT[id(jobs)]


@pytest.fixture(scope="module")
def straight(cluster_jobs: ClusterJobs, shared: tuple[Path, Path]) -> Weights:
    return straight_weights(cluster_jobs)


@pytest.fixture(scope="module")
def straight_two(cluster_jobs: ClusterJobs, shared: tuple[Path, Path], synth_cache: Path) -> Weights:
    """An uninterrupted 2-process run (torch's env:// variables on this host, gloo)."""
    from tests.slurm.test_stop_processes import finish, start_ranks

    folder, ae = shared
    cluster_jobs.wait_submitted()
    cfg = write_config(folder, synth_cache, "straight_two", ae)
    for code, out in finish(start_ranks(cfg, folder)):
        assert code == 0, out[-3000:]
    return final_tensors(folder / "straight_two")


def submit(cfg: Path, env: dict[str, str], *overrides: str) -> str:
    command = [sys.executable, "-m", "radiodiff_resume.cli", "submit", "--cfg", str(cfg), *overrides]
    # A generous timeout: it imports torch, while the other scenarios' jobs start on the same cores.
    out = subprocess.run(command, env=env, cwd=cfg.parent, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    m = re.search(r"submitted job (\d+) \(SLURM\); logs: (\S+)", out.stdout)
    assert m, out.stdout
    return m.group(1)


def events(results: Path) -> list[dict[str, tp.Any]]:
    return [json.loads(line) for line in (results / "events.jsonl").read_text().splitlines()]


def assert_nothing_lost(results: Path, stops: int, reason: str | None = None) -> list[dict[str, tp.Any]]:
    """Each stop committed its step and the next run resumed exactly there; the run reached the end."""
    log = events(results)
    stopped = [e for e in log if e["event"] == "stopped"]
    resumed = [e["step"] for e in log if e["event"] == "resumed"]
    assert len(stopped) >= stops, log
    # A stop before the first step (the signal may come seconds after the start) saves nothing and
    # the next run starts fresh; every other stop is resumed exactly where it saved.
    assert resumed == [e["step"] for e in stopped if e["step"] > 0], f"resumed {resumed}, stopped {stopped}"
    if reason is not None:
        assert {e["reason"] for e in stopped} <= {reason, "SIGTERM"}, stopped
    saved = [e["step"] for e in log if e["event"] == "checkpoint_saved"]
    assert saved[-1] == STEPS and sorted(set(saved)) == saved, "every step saved once, in order"
    return stopped


def committed(results: Path, step: int) -> bool:
    return (results / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()


def results_of(job: Job) -> Path:
    return setup(job.jobs)[0] / job.name


# ----- time limits: the jobs requeue themselves


@scenario("submitit_limit", priority=4)
def submit_time_limited(job: Job) -> str:
    folder, ae = setup(job.jobs)
    return submit(write_config(folder, job.jobs.synth_cache, job.name, ae, step_s=STEP_S), job_env(job.env))


@pytest.mark.scenario("submitit_limit")
def test_submit_time_limit_requeues_until_done(
    cluster_jobs: ClusterJobs, shared: tuple[Path, Path], straight: Weights
) -> None:
    job = cluster_jobs["submitit_limit"].submitted()

    info = wait_for(job, {"COMPLETED"}, timeout=600, env=cluster_jobs.env, min_restarts=1)
    results = shared[0] / "submitit_limit"
    stops = assert_nothing_lost(results, stops=int(info["Restarts"]), reason="SIGUSR2")
    ledger = json.loads((results / "slurm" / job / "requeues.json").read_text())
    assert ledger == {"timeouts": len(stops), "other": 0}, "each stop was a time limit"
    assert_bit_identical(straight, final_tensors(results))


@scenario("template_limit", priority=10)  # sbatch: a quick submission
def sbatch_time_limited(job: Job) -> str:
    folder, ae = setup(job.jobs)
    cfg = write_config(folder, job.jobs.synth_cache, job.name, ae, step_s=STEP_S)
    return sbatch(REPO / "slurm" / "train.sbatch", f"--time={TIME_MIN}", f"--signal=B:USR1@{LEAD_S}",
                  "--cpus-per-task=1", f"--output={folder}/template-%j.out", script_args=["--cfg", str(cfg)],
                  env=job_env(job.env), cwd=folder)


@pytest.mark.scenario("template_limit")
def test_sbatch_template_time_limit_requeues_until_done(
    cluster_jobs: ClusterJobs, shared: tuple[Path, Path], straight: Weights
) -> None:
    folder, _ = shared
    job = cluster_jobs["template_limit"].submitted()

    info = wait_for(job, {"COMPLETED"}, timeout=600, env=cluster_jobs.env, min_restarts=1)
    log = (folder / f"template-{job}.out").read_text()
    assert "got USR1" in log and "requeueing job" in log and "training finished" in log, log[-3000:]
    assert_nothing_lost(folder / "template_limit", stops=int(info["Restarts"]), reason="SIGUSR1")
    assert_bit_identical(straight, final_tensors(folder / "template_limit"))


# ----- a preemption signal


def preempt(job: Job) -> None:
    """``scancel --signal=USR2`` once step ``2 * EVERY`` is committed."""
    job.wait_until(lambda: committed(results_of(job), 2 * EVERY))
    subprocess.run(["scancel", "--signal=USR2", job.submitted()], env=job.env, check=True, timeout=60)


@scenario("preempted", act=preempt, priority=1)
def submit_untimed(job: Job) -> str:
    """A job far from its time limit, paced so that the action comes long before its end."""
    folder, ae = setup(job.jobs)
    return submit(write_config(folder, job.jobs.synth_cache, job.name, ae, step_s=ACTION_STEP_S, time_min=20),
                  job_env(job.env))


@pytest.mark.scenario("preempted")
def test_preempted_job_saves_requeues_and_finishes(
    cluster_jobs: ClusterJobs, shared: tuple[Path, Path], straight: Weights
) -> None:
    """``scancel --signal=USR2`` (what a preemption with preempt_send_user_signal sends), long
    before the time limit: counted as a preemption, not a time limit."""
    scenario_job = cluster_jobs["preempted"]
    results = shared[0] / "preempted"
    job = scenario_job.submitted()
    scenario_job.acted()

    wait_for(job, {"COMPLETED"}, timeout=600, env=cluster_jobs.env, min_restarts=1)
    assert_nothing_lost(results, stops=1, reason="SIGUSR2")
    ledger = json.loads((results / "slurm" / job / "requeues.json").read_text())
    assert ledger == {"timeouts": 0, "other": 1}
    assert_bit_identical(straight, final_tensors(results))


# ----- every process SIGKILLed during a save


def kill_during_save(job: Job) -> dict[str, tp.Any]:
    """SIGKILL every process of the job step while a checkpoint after step ``2 * EVERY`` is being
    written, then requeue the job as Slurm does after a node failure."""
    results = results_of(job)

    def saving() -> bool:
        ck = results / "checkpoints"
        return committed(results, 2 * EVERY) and any(p.name.startswith(".staging-") for p in ck.iterdir())
    job.wait_until(saving)
    pids = subprocess.run(["pgrep", "-f", f"submitit.core._submit {results}"], capture_output=True,
                          text=True).stdout.split()
    assert pids, "the job's training process"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    newest = max(int(p.name.split("-")[1]) for p in (results / "checkpoints").glob("step-*"))
    wait_for(job.submitted(), {"FAILED"}, timeout=120, env=job.env)
    subprocess.run(["scontrol", "requeue", job.submitted()], env=job.env, check=True, timeout=60)
    return {"newest": newest}


scenario("killed", act=kill_during_save, priority=2)(submit_untimed)


@pytest.mark.scenario("killed")
def test_sigkilled_job_resumes_from_the_last_verified_checkpoint(
    cluster_jobs: ClusterJobs, shared: tuple[Path, Path], straight: Weights
) -> None:
    """Every process of the job step SIGKILLed in the middle of a checkpoint save (a node dies),
    then the job requeued as Slurm does after a node failure: the half-written checkpoint is
    never used, the run resumes from the newest committed one."""
    scenario_job = cluster_jobs["killed"]
    results = shared[0] / "killed"
    job = scenario_job.submitted()
    newest = scenario_job.acted()["newest"]

    wait_for(job, {"COMPLETED"}, timeout=600, env=cluster_jobs.env, min_restarts=1)
    log = events(results)
    [resumed] = [e for e in log if e["event"] == "resumed"]
    assert resumed["step"] == newest, "resumed from the newest committed checkpoint, not the half-written one"
    assert not [e for e in log if e["event"] == "stopped"], "no stop: the processes were killed"
    assert_bit_identical(straight, final_tensors(results))


# ----- crash loops


def requeue_each_death(job: str, env: dict[str, str], log: Path, runs: int = 12) -> dict[str, str]:
    """Requeue the job each time it fails, as Slurm does after a node failure (or with
    ``RequeueExit``) — the loop the crash-loop brake exists for; stop when it completes or when
    the job itself says it will not go on."""
    restarts = 0
    for _ in range(runs):
        info = wait_for(job, {"COMPLETED", "FAILED"}, timeout=300, env=env, min_restarts=restarts, poll=0.5)
        if info["JobState"] == "COMPLETED" or "every checkpoint" in log.read_text():
            return info
        subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=60)
        restarts = int(info["Restarts"]) + 1
    pytest.fail(f"job {job} still dying after {runs} requeues")


CRASHES = {"fallback": (2 * EVERY + 1, 3), "none-left": (1, 2)}
"""die_from and keep_last of the two crash-loop scenarios, by test id."""


def crash_config(folder: Path, synth_cache: Path, name: str, ae: Path, die_from: int, keep: int) -> Path:
    path = write_config(folder, synth_cache, name, ae, time_min=20)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["unet"]["target"] = "tests.slurm.crash_plugins.DiesAfterResumeUNet"
    raw["model"]["unet"]["params"].update(die_from=die_from, step_s=ACTION_STEP_S)
    raw["checkpoint"].update(keep_last=keep, crash_loop_restarts=2)
    raw["trainer"]["train_num_steps"] = 6 * EVERY
    path.write_text(yaml.safe_dump(raw))
    return path


def crash_scenario(die_from: int, keep: int) -> str:
    """Scenario ``crash_<die_from>``: stopped (USR2) once step ``3 * EVERY`` is committed, then
    requeued after each death until it completes or gives up."""
    name = f"crash_{die_from}"

    def submit_crashing(job: Job) -> str:
        folder, ae = setup(job.jobs)
        return submit(crash_config(folder, job.jobs.synth_cache, name, ae, die_from, keep), job_env(job.env))

    def stop_then_requeue_each_death(job: Job) -> dict[str, str]:
        results = results_of(job)
        job.wait_until(lambda: committed(results, 3 * EVERY))
        subprocess.run(["scancel", "--signal=USR2", job.submitted()], env=job.env, check=True, timeout=60)
        log = results / "slurm" / job.submitted() / f"{job.submitted()}_0_log.err"
        return requeue_each_death(job.submitted(), job.env, log)

    scenario(name, act=stop_then_requeue_each_death, priority=4)(submit_crashing)
    return name


@pytest.mark.parametrize("die_from, keep", [
    pytest.param(die_from, keep, id=test_id, marks=pytest.mark.scenario(crash_scenario(die_from, keep)))
    for test_id, (die_from, keep) in CRASHES.items()
])
def test_crash_loop_sets_aside_and_falls_back_or_fails(
    cluster_jobs: ClusterJobs, shared: tuple[Path, Path], die_from: int, keep: int
) -> None:
    """Every run resuming from a checkpoint that had seen ``die_from`` training steps dies
    (SIGKILL). After 2 such runs per checkpoint it is set aside and the next older one used:
    with one from before ``die_from`` kept, the job completes; with none, it fails saying why."""
    folder, _ = shared
    name = f"crash_{die_from}"
    results = folder / name
    scenario_job = cluster_jobs[name]
    job = scenario_job.submitted()

    log = results / "slurm" / job / f"{job}_0_log.err"
    info = scenario_job.acted()
    log_events = events(results)
    aside = [e for e in log_events if e["event"] == "checkpoint_set_aside"]
    moved = sorted((results / "checkpoints").glob("crash-loop-*"))
    assert len(moved) == len(aside) and all((m / "SET_ASIDE.txt").exists() for m in moved)
    resumed = [e["step"] for e in log_events if e["event"] == "resumed"]
    if die_from > 1:
        assert info["JobState"] == "COMPLETED"
        assert all(int(Path(e["path"]).name[5:]) >= die_from for e in aside), aside
        assert resumed[-1] == 2 * EVERY, "the run went on from the newest checkpoint before die_from"
        assert committed(results, 6 * EVERY)
    else:
        assert info["JobState"] == "FAILED"
        assert len(aside) == keep and not list((results / "checkpoints").glob("step-*"))
        text = log.read_text()
        assert "every checkpoint" in text and "refusing to start from scratch" in text
    runs_per_checkpoint = {s: resumed.count(s) for s in set(resumed)}
    assert all(n <= 2 for s, n in runs_per_checkpoint.items() if s >= die_from), runs_per_checkpoint


# ----- two processes


def two_process_scenario(nodes: int, tasks: int) -> str:
    """Scenario ``two_<nodes>x<tasks>``: a time-limited job of two tasks through submitit."""
    name = f"two_{nodes}x{tasks}"

    def submit_two(job: Job) -> str:
        folder, ae = setup(job.jobs)
        cfg = write_config(folder, job.jobs.synth_cache, name, ae, step_s=STEP_S, nodes=nodes,
                           tasks_per_node=tasks)
        return submit(cfg, job_env(job.env))

    scenario(name, nodes=nodes, priority=5)(submit_two)  # the slowest start-ups: two processes
    return name


@pytest.mark.parametrize("nodes, tasks", [
    pytest.param(nodes, tasks, id=test_id, marks=pytest.mark.scenario(two_process_scenario(nodes, tasks)))
    for test_id, (nodes, tasks) in {"2-nodes-x-1": (2, 1), "1-node-x-2": (1, 2)}.items()
])
def test_two_process_job_saves_on_every_rank_requeues_and_matches(
    slurm_env_2nodes: dict[str, str], cluster_jobs: ClusterJobs, shared: tuple[Path, Path],
    straight_two: Weights, nodes: int, tasks: int,
) -> None:
    """Through submitit, two tasks — on two hosts of the namespaced cluster (gloo across the
    bridge), or both on one — reach the time limit, both save, the job requeues and resumes."""
    folder, _ = shared
    name = f"two_{nodes}x{tasks}"
    results = folder / name
    job = cluster_jobs[name].submitted()

    info = wait_for(job, {"COMPLETED"}, timeout=900, env=slurm_env_2nodes, min_restarts=1)
    assert int(info["NumNodes"]) == nodes and info["NumTasks"] == "2", info
    log = events(results)
    stopped = [e for e in log if e["event"] == "stopped"]
    resumed = [e["step"] for e in log if e["event"] == "resumed"]
    assert stopped and resumed == [e["step"] for e in stopped if e["step"] > 0], (stopped, resumed)
    saved = {e["step"] for e in log if e["event"] == "checkpoint_saved"}
    assert all(e["step"] in saved for e in stopped if e["step"] > 0), "each stop committed, every rank"
    assert all((results / "slurm" / job / f"{job}_{r}_log.err").exists() for r in range(2)), "two tasks ran"
    assert_bit_identical(straight_two, final_tensors(results))


# ----- scancel


def cancel_then_submit_again(job: Job) -> dict[str, tp.Any]:
    """``scancel`` once step ``2 * EVERY`` is committed; what the cancelled job left (before
    anything else runs in its folder); then the same config submitted again."""
    results = results_of(job)
    job.wait_until(lambda: committed(results, 2 * EVERY))
    subprocess.run(["scancel", job.submitted()], env=job.env, check=True, timeout=60)

    info = wait_for(job.submitted(), {"CANCELLED"}, timeout=120, env=job.env)
    time.sleep(15)  # a requeue would show by now (about 11 s on this cluster)
    info = job_info(job.submitted(), job.env)
    stopped = [e for e in events(results) if e["event"] == "stopped"]
    left = {"info": info, "stopped": stopped,
            "committed": [committed(results, e["step"]) for e in stopped],
            "log": (results / "slurm" / job.submitted() / f"{job.submitted()}_0_log.err").read_text()}
    left["again"] = job.also(submit(setup(job.jobs)[0] / f"{job.name}.yaml", job_env(job.env)))
    return left


scenario("cancelled", act=cancel_then_submit_again, priority=3)(submit_untimed)


@pytest.mark.scenario("cancelled")
def test_scancel_commits_a_checkpoint_but_leaves_the_job_cancelled(
    cluster_jobs: ClusterJobs, shared: tuple[Path, Path], straight: Weights
) -> None:
    """``scancel`` sends SIGTERM: the run stops at the next step with a committed checkpoint but does
    not requeue itself (that would undo the cancel); submitting again goes on from there."""
    results = shared[0] / "cancelled"
    cluster_jobs["cancelled"].submitted()
    left = cluster_jobs["cancelled"].acted()

    info = left["info"]
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    [stopped] = left["stopped"]
    assert stopped["reason"] == "SIGTERM" and left["committed"] == [True]
    assert "not requeued: cancelled (scancel: JobState=COMPLETING" in left["log"]

    wait_for(left["again"], {"COMPLETED"}, timeout=600, env=cluster_jobs.env)
    assert_nothing_lost(results, stops=1, reason="SIGTERM")
    assert_bit_identical(straight, final_tensors(results))
