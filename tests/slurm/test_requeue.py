"""Requeue on a real SLURM cluster (``slurm/local_cluster.sh``): time limits, a preemption and a
SIGKILL of the job's processes, through ``radiodiff-resume submit`` (submitit) and through the
sbatch template — each job ends COMPLETED after at least one requeue, with final weights equal,
bit for bit, to an uninterrupted run's, and no step done twice or lost.

Slurm may send the ``--signal`` up to 60 s before the lead asked for, so no test assumes when it
comes: each only needs the job to outlive one incarnation.
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
from tests.slurm.cluster import job_info, output_tail, sbatch, wait_for
from tests.trainer.test_resume_exact import Weights, assert_bit_identical, final_tensors, run_to_end

STEPS, EVERY = 2000, 50
"""About 50 s of training on one idle core (39 steps/s measured here; 800 steps once finished in 20 s,
before the signal, and the job was never requeued), longer on a loaded one: always longer than the
first signal comes (at most 30 s into a 1-minute job, minus ~7 s of start-up), so every time-limited
job is stopped and requeued at least once."""


def write_config(folder: Path, synth_cache: Path, name: str, ae: Path, **slurm: tp.Any) -> Path:
    raw = tiny_raw(folder / name, synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(ae)
    raw["trainer"].update(train_num_steps=STEPS, save_and_sample_every=STEPS, val_batches=0, log_freq=100)
    raw["checkpoint"] = {"every": EVERY, "keep_last": 2}
    raw["slurm"] = {"time_min": 1, "signal_lead_s": 30, "cpus_per_task": 1, **slurm}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def job_env(slurm_env: dict[str, str]) -> dict[str, str]:
    return {**slurm_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> tuple[Path, Path]:
    """A first stage every run uses, and the folder of the uninterrupted run."""
    folder = tmp_path_factory.mktemp("requeue")
    ae = folder / "ae.safetensors"
    straight = write_config(folder, synth_cache, "straight", ae)
    write_random_first_stage(build_config(yaml.safe_load(straight.read_text())))
    return folder, ae


@pytest.fixture(scope="module")
def straight(shared: tuple[Path, Path]) -> Weights:
    folder, _ = shared
    run_to_end(folder / "straight.yaml", 1, folder)
    return final_tensors(folder / "straight")


def submit(cfg: Path, env: dict[str, str], *overrides: str) -> str:
    command = [sys.executable, "-m", "radiodiff_resume.cli", "submit", "--cfg", str(cfg), *overrides]
    out = subprocess.run(command, env=env, cwd=cfg.parent, capture_output=True, text=True, timeout=120)
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


def test_submit_time_limit_requeues_until_done(
    slurm_env: dict[str, str], shared: tuple[Path, Path], straight: Weights, synth_cache: Path
) -> None:
    folder, ae = shared
    cfg = write_config(folder, synth_cache, "submitit_limit", ae)
    job = submit(cfg, job_env(slurm_env))

    info = wait_for(job, {"COMPLETED"}, timeout=600, env=slurm_env, min_restarts=1)
    results = folder / "submitit_limit"
    stops = assert_nothing_lost(results, stops=int(info["Restarts"]), reason="SIGUSR2")
    ledger = json.loads((results / "slurm" / job / "requeues.json").read_text())
    assert ledger == {"timeouts": len(stops), "other": 0}, "each stop was a time limit"
    assert_bit_identical(straight, final_tensors(results))


def test_sbatch_template_time_limit_requeues_until_done(
    slurm_env: dict[str, str], shared: tuple[Path, Path], straight: Weights, synth_cache: Path
) -> None:
    folder, ae = shared
    cfg = write_config(folder, synth_cache, "template_limit", ae)
    job = sbatch(REPO / "slurm" / "train.sbatch", "--time=1", "--signal=B:USR1@30", "--cpus-per-task=1",
                 f"--output={folder}/template-%j.out", script_args=["--cfg", str(cfg)],
                 env=job_env(slurm_env), cwd=folder)

    info = wait_for(job, {"COMPLETED"}, timeout=600, env=slurm_env, min_restarts=1)
    log = (folder / f"template-{job}.out").read_text()
    assert "got USR1" in log and "requeueing job" in log and "training finished" in log, log[-3000:]
    assert_nothing_lost(folder / "template_limit", stops=int(info["Restarts"]), reason="SIGUSR1")
    assert_bit_identical(straight, final_tensors(folder / "template_limit"))


def committed(results: Path, step: int) -> bool:
    return (results / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()


def wait_until(ready: tp.Callable[[], bool], job: str, env: dict[str, str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            info = job_info(job, env)
            pytest.fail(f"never ready: {info}\n{output_tail(info)}")
        time.sleep(0.02)


def test_preempted_job_saves_requeues_and_finishes(
    slurm_env: dict[str, str], shared: tuple[Path, Path], straight: Weights, synth_cache: Path
) -> None:
    """``scancel --signal=USR2`` (what a preemption with preempt_send_user_signal sends), long
    before the time limit: counted as a preemption, not a time limit."""
    folder, ae = shared
    cfg = write_config(folder, synth_cache, "preempted", ae, time_min=20)
    results = folder / "preempted"
    job = submit(cfg, job_env(slurm_env))
    wait_until(lambda: committed(results, 2 * EVERY), job, slurm_env)
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_env, check=True, timeout=60)

    wait_for(job, {"COMPLETED"}, timeout=600, env=slurm_env, min_restarts=1)
    assert_nothing_lost(results, stops=1, reason="SIGUSR2")
    ledger = json.loads((results / "slurm" / job / "requeues.json").read_text())
    assert ledger == {"timeouts": 0, "other": 1}
    assert_bit_identical(straight, final_tensors(results))


def test_sigkilled_job_resumes_from_the_last_verified_checkpoint(
    slurm_env: dict[str, str], shared: tuple[Path, Path], straight: Weights, synth_cache: Path
) -> None:
    """Every process of the job step SIGKILLed in the middle of a checkpoint save (a node dies),
    then the job requeued as Slurm does after a node failure: the half-written checkpoint is
    never used, the run resumes from the newest committed one."""
    folder, ae = shared
    cfg = write_config(folder, synth_cache, "killed", ae, time_min=20)
    results = folder / "killed"
    job = submit(cfg, job_env(slurm_env))

    def saving() -> bool:
        ck = results / "checkpoints"
        return committed(results, 2 * EVERY) and any(p.name.startswith(".staging-") for p in ck.iterdir())
    wait_until(saving, job, slurm_env)
    pids = subprocess.run(["pgrep", "-f", f"submitit.core._submit {results}"], capture_output=True,
                          text=True).stdout.split()
    assert pids, "the job's training process"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    newest = max(int(p.name.split("-")[1]) for p in (results / "checkpoints").glob("step-*"))
    wait_for(job, {"FAILED"}, timeout=120, env=slurm_env)
    subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True, timeout=60)

    wait_for(job, {"COMPLETED"}, timeout=600, env=slurm_env, min_restarts=1)
    log = events(results)
    [resumed] = [e for e in log if e["event"] == "resumed"]
    assert resumed["step"] == newest, "resumed from the newest committed checkpoint, not the half-written one"
    assert not [e for e in log if e["event"] == "stopped"], "no stop: the processes were killed"
    assert_bit_identical(straight, final_tensors(results))


def requeue_each_death(job: str, env: dict[str, str], log: Path, runs: int = 12) -> dict[str, str]:
    """Requeue the job each time it fails, as Slurm does after a node failure (or with
    ``RequeueExit``) — the loop the crash-loop brake exists for; stop when it completes or when
    the job itself says it will not go on."""
    restarts = 0
    for _ in range(runs):
        info = wait_for(job, {"COMPLETED", "FAILED"}, timeout=300, env=env, min_restarts=restarts)
        if info["JobState"] == "COMPLETED" or "every checkpoint" in log.read_text():
            return info
        subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=60)
        restarts = int(info["Restarts"]) + 1
    pytest.fail(f"job {job} still dying after {runs} requeues")


def crash_config(folder: Path, synth_cache: Path, name: str, ae: Path, die_from: int, keep: int) -> Path:
    path = write_config(folder, synth_cache, name, ae, time_min=20)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["unet"]["target"] = "tests.slurm.crash_plugins.DiesAfterResumeUNet"
    raw["model"]["unet"]["params"]["die_from"] = die_from
    raw["checkpoint"].update(keep_last=keep, crash_loop_restarts=2)
    raw["trainer"]["train_num_steps"] = 300
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("die_from, keep", [(2 * EVERY + 1, 3), (1, 2)], ids=["fallback", "none-left"])
def test_crash_loop_sets_aside_and_falls_back_or_fails(
    slurm_env: dict[str, str], shared: tuple[Path, Path], synth_cache: Path, die_from: int, keep: int
) -> None:
    """Every run resuming from a checkpoint that had seen ``die_from`` training steps dies
    (SIGKILL). After 2 such runs per checkpoint it is set aside and the next older one used:
    with one from before ``die_from`` kept, the job completes; with none, it fails saying why."""
    folder, ae = shared
    name = f"crash_{die_from}"
    results = folder / name
    job = submit(crash_config(folder, synth_cache, name, ae, die_from, keep), job_env(slurm_env))
    wait_until(lambda: committed(results, 3 * EVERY), job, slurm_env)
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_env, check=True, timeout=60)

    log = results / "slurm" / job / f"{job}_0_log.err"
    info = requeue_each_death(job, slurm_env, log)
    log_events = events(results)
    aside = [e for e in log_events if e["event"] == "checkpoint_set_aside"]
    moved = sorted((results / "checkpoints").glob("crash-loop-*"))
    assert len(moved) == len(aside) and all((m / "SET_ASIDE.txt").exists() for m in moved)
    resumed = [e["step"] for e in log_events if e["event"] == "resumed"]
    if die_from > 1:
        assert info["JobState"] == "COMPLETED"
        assert all(int(Path(e["path"]).name[5:]) >= die_from for e in aside), aside
        assert resumed[-1] == 2 * EVERY, "the run went on from the newest checkpoint before die_from"
        assert committed(results, 300)
    else:
        assert info["JobState"] == "FAILED"
        assert len(aside) == keep and not list((results / "checkpoints").glob("step-*"))
        text = log.read_text()
        assert "every checkpoint" in text and "refusing to start from scratch" in text
    runs_per_checkpoint = {s: resumed.count(s) for s in set(resumed)}
    assert all(n <= 2 for s, n in runs_per_checkpoint.items() if s >= die_from), runs_per_checkpoint


DIST_STEPS = 500
"""Two processes step at about half the speed of one: still longer than the first signal."""


def dist_config(folder: Path, synth_cache: Path, name: str, ae: Path, **slurm: tp.Any) -> Path:
    path = write_config(folder, synth_cache, name, ae, **slurm)
    raw = yaml.safe_load(path.read_text())
    raw["trainer"]["train_num_steps"] = DIST_STEPS
    raw["trainer"]["save_and_sample_every"] = DIST_STEPS
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def straight_two(shared: tuple[Path, Path], synth_cache: Path) -> Weights:
    """An uninterrupted 2-process run (torch's env:// variables on this host, gloo)."""
    from tests.slurm.test_stop_processes import finish, start_ranks

    folder, ae = shared
    cfg = dist_config(folder, synth_cache, "straight_two", ae)
    for code, out in finish(start_ranks(cfg, folder)):
        assert code == 0, out[-3000:]
    return final_tensors(folder / "straight_two")


@pytest.mark.parametrize("nodes, tasks", [(2, 1), (1, 2)], ids=["2-nodes-x-1", "1-node-x-2"])
def test_two_process_job_saves_on_every_rank_requeues_and_matches(
    slurm_env_2nodes: dict[str, str], shared: tuple[Path, Path], straight_two: Weights, synth_cache: Path,
    nodes: int, tasks: int,
) -> None:
    """Through submitit, two tasks — on two hosts of the namespaced cluster (gloo across the
    bridge), or both on one — reach the time limit, both save, the job requeues and resumes."""
    folder, ae = shared
    name = f"two_{nodes}x{tasks}"
    results = folder / name
    job = submit(dist_config(folder, synth_cache, name, ae, nodes=nodes, tasks_per_node=tasks),
                 job_env(slurm_env_2nodes))

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


def test_scancel_commits_a_checkpoint_but_leaves_the_job_cancelled(
    slurm_env: dict[str, str], shared: tuple[Path, Path], straight: Weights, synth_cache: Path
) -> None:
    """``scancel`` sends SIGTERM: the run stops at the next step with a committed checkpoint but does
    not requeue itself (that would undo the cancel); submitting again goes on from there."""
    folder, ae = shared
    cfg = write_config(folder, synth_cache, "cancelled", ae, time_min=20)
    results = folder / "cancelled"
    job = submit(cfg, job_env(slurm_env))
    wait_until(lambda: committed(results, 2 * EVERY), job, slurm_env)
    subprocess.run(["scancel", job], env=slurm_env, check=True, timeout=60)

    info = wait_for(job, {"CANCELLED"}, timeout=120, env=slurm_env)
    time.sleep(15)  # a requeue would show by now (about 11 s on this cluster)
    info = job_info(job, slurm_env)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    [stopped] = [e for e in events(results) if e["event"] == "stopped"]
    assert stopped["reason"] == "SIGTERM" and committed(results, stopped["step"])
    assert "not requeued: SIGTERM ends a job" in (results / "slurm" / job / f"{job}_0_log.err").read_text()

    again = submit(cfg, job_env(slurm_env))
    wait_for(again, {"COMPLETED"}, timeout=600, env=slurm_env)
    assert_nothing_lost(results, stops=1, reason="SIGTERM")
    assert_bit_identical(straight, final_tensors(results))
