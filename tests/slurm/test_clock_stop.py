"""A stop fits the time that is left, on a real SLURM cluster (issue 18 item 1), through the sbatch
template (``slurm/train.sbatch``):

- a job submitted without any ``--signal`` (the template with its ``--signal`` line taken out) stops
  by its own clock (``slurm.stop_margin_s``) with a committed checkpoint before its time limit,
  requeues, and finishes bit for bit as an uninterrupted run;
- a job validating at every step, so that its time-limit signal lands on a validation step: the
  stop never waits for a validation that has not begun (it is deferred to the resume), the job
  requeues and finishes bit for bit as an uninterrupted run, with every step's metrics logged once
  and equal to that run's.

The jobs are scenarios (``scenarios.py``), submitted with the other SLURM tests' jobs, and train the
paced denoiser (``paced.py``): each step takes a fixed wall time, whatever the machine's load.
"""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.config import build_config
from radiodiff_resume.slurm.budget import CLOCK
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.slurm.cluster import sbatch, wait_for
from tests.slurm.scenarios import ClusterJobs, Job, scenario
from tests.slurm.test_requeue import events, job_env
from tests.trainer.test_resume_exact import Weights, assert_bit_identical, final_tensors, run_to_end

TIME_MIN, MARGIN_S, LEAD_S = 2, 30, 30
"""A 2-minute limit; the clock keeps 30 s spare; the signal job asks for USR1 30 s ahead."""
STEPS, EVERY, STEP_S = 100, 10, 1.0
"""The clock job: 100 paced steps of 1 s outlive an incarnation, which trains less than 120 - 30 s."""
VAL_STEPS, VAL_STEP_S = 60, 1.5
"""The validating job: 90 s of paced training outlive the first incarnation (the signal comes 60-90 s
after the start, start-up included)."""


def write_config(folder: Path, synth_cache: Path, name: str, ae: Path, *, steps: int, validate: bool,
                 step_s: float | None, **slurm: tp.Any) -> Path:
    raw = tiny_raw(folder / name, synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(ae)
    if step_s is not None:
        raw["model"]["unet"]["target"] = "tests.slurm.paced.PacedUNet"
        raw["model"]["unet"]["params"]["step_s"] = step_s
    raw["trainer"].update(train_num_steps=steps, log_freq=100, num_sample_images=1,
                          **({"save_and_sample_every": 1, "val_batches": 1} if validate
                             else {"save_and_sample_every": steps, "val_batches": 0}))
    raw["checkpoint"] = {"every": EVERY, "keep_last": 2}
    raw["slurm"] = {"time_min": TIME_MIN, "signal_lead_s": LEAD_S, "cpus_per_task": 1, **slurm}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def setup(jobs: ClusterJobs) -> tuple[Path, Path]:
    def make() -> tuple[Path, Path]:
        folder = jobs.tmp.mktemp("clock")
        ae = folder / "ae.safetensors"
        cfg = write_config(folder, jobs.synth_cache, "first_stage", ae, steps=1, validate=False, step_s=None)
        write_random_first_stage(build_config(yaml.safe_load(cfg.read_text())))
        return folder, ae

    return jobs.once("clock", make)


def template_without_signal(folder: Path) -> Path:
    """``slurm/train.sbatch`` with its ``#SBATCH --signal`` line taken out: Slurm signals nothing
    before the time limit."""
    text = (REPO / "slurm" / "train.sbatch").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#SBATCH --signal")]
    assert len(lines) == len(text.splitlines()) - 1, "the template has one --signal line"
    path = folder / "train-no-signal.sbatch"
    path.write_text("\n".join(lines) + "\n")
    return path


def straight_run(jobs: ClusterJobs, name: str, **kwargs: tp.Any) -> Weights:
    """The uninterrupted run (plain denoiser), on this host once every job is submitted."""
    folder, ae = setup(jobs)
    jobs.wait_submitted()
    cfg = write_config(folder, jobs.synth_cache, name, ae, step_s=None, **kwargs)
    run_to_end(cfg, 1, folder)
    return final_tensors(folder / name)


def val_rows(results: Path) -> dict[int, dict[str, tp.Any]]:
    found: dict[int, dict[str, tp.Any]] = {}
    for row in map(json.loads, (results / "metrics.jsonl").read_text().splitlines()):
        values = {k: v for k, v in row.items() if k.startswith("val/")}
        if values:
            assert row["step"] not in found, f"step {row['step']} validated twice"
            found[row["step"]] = values
    return found


def assert_resumed_where_stopped(results: Path, steps: int) -> list[dict[str, tp.Any]]:
    log = events(results)
    stopped = [e for e in log if e["event"] == "stopped"]
    assert stopped, "the job stopped at least once"
    resumed = [e["step"] for e in log if e["event"] == "resumed"]
    assert resumed == [e["step"] for e in stopped if e["step"] > 0], f"resumed {resumed}, stopped {stopped}"
    saved = [e["step"] for e in log if e["event"] == "checkpoint_saved"]
    assert saved[-1] == steps and sorted(set(saved)) == saved, "every step saved once, in order"
    return stopped


# ----- no --signal: the job's clock


@scenario("clock_no_signal", priority=9)
def submit_without_signal(job: Job) -> str:
    folder, ae = setup(job.jobs)
    cfg = write_config(folder, job.jobs.synth_cache, job.name, ae, steps=STEPS, validate=False, step_s=STEP_S,
                       stop_margin_s=MARGIN_S)
    return sbatch(template_without_signal(folder), f"--time={TIME_MIN}", "--cpus-per-task=1",
                  f"--output={folder}/{job.name}-%j.out", script_args=["--cfg", str(cfg)],
                  env=job_env(job.env), cwd=folder)


@pytest.mark.scenario("clock_no_signal")
def test_a_job_without_signal_stops_on_its_clock_requeues_and_finishes(cluster_jobs: ClusterJobs) -> None:
    job = cluster_jobs["clock_no_signal"].submitted()
    straight = straight_run(cluster_jobs, "straight_clock", steps=STEPS, validate=False)

    info = wait_for(job, {"COMPLETED"}, timeout=900, env=cluster_jobs.env, min_restarts=1)
    folder = setup(cluster_jobs)[0]
    log = (folder / f"clock_no_signal-{job}.out").read_text()
    assert "radiodiff_resume: got " not in log, "no signal reached the job"
    assert "radiodiff_resume: requeueing job" in log and "training finished" in log, log[-3000:]
    stopped = assert_resumed_where_stopped(folder / "clock_no_signal", STEPS)
    assert len(stopped) == int(info["Restarts"]) and {e["reason"] for e in stopped} == {CLOCK}, stopped
    assert_bit_identical(straight, final_tensors(folder / "clock_no_signal"))


# ----- a time-limit signal on a validation step


@scenario("signal_on_validation", priority=8)
def submit_validating(job: Job) -> str:
    folder, ae = setup(job.jobs)
    cfg = write_config(folder, job.jobs.synth_cache, job.name, ae, steps=VAL_STEPS, validate=True,
                       step_s=VAL_STEP_S, stop_margin_s=None)
    return sbatch(REPO / "slurm" / "train.sbatch", f"--time={TIME_MIN}", f"--signal=B:USR1@{LEAD_S}",
                  "--cpus-per-task=1", f"--output={folder}/{job.name}-%j.out",
                  script_args=["--cfg", str(cfg)], env=job_env(job.env), cwd=folder)


@pytest.mark.scenario("signal_on_validation")
def test_a_signal_on_a_validation_step_defers_it_requeues_and_finishes(cluster_jobs: ClusterJobs) -> None:
    job = cluster_jobs["signal_on_validation"].submitted()
    straight = straight_run(cluster_jobs, "straight_validating", steps=VAL_STEPS, validate=True)

    wait_for(job, {"COMPLETED"}, timeout=900, env=cluster_jobs.env, min_restarts=1)
    folder = setup(cluster_jobs)[0]
    results = folder / "signal_on_validation"
    log = (folder / f"signal_on_validation-{job}.out").read_text()
    assert "got USR1" in log and "training finished" in log, log[-3000:]
    stopped = assert_resumed_where_stopped(results, VAL_STEPS)
    assert {e["reason"] for e in stopped} <= {"SIGUSR1", "SIGTERM"}, stopped
    deferred = [e["step"] for e in events(results) if e["event"] == "validation_deferred"]
    assert set(deferred) <= {e["step"] for e in stopped}, "only a stop defers a validation"
    # Each step's validation ran exactly once — before its stop, or after the resume — as uninterrupted.
    assert val_rows(results) == val_rows(folder / "straight_validating")
    assert_bit_identical(straight, final_tensors(results))
