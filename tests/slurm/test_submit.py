"""``radiodiff-resume submit`` through submitit's local executor: what is pickled is the config
only; a real USR2 (submitit's time-limit and preemption signal) sent to the training task stops
the job at a step boundary with a committed checkpoint, the job requeues itself (the local
controller's restart status), and the requeued run finishes bit-identical to a straight run.
The same job on the real SLURM cluster is in ``test_requeue.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.cli import train_in_job
from radiodiff_resume.config import build_config
from radiodiff_resume.slurm.submit import TrainJob, submit
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.trainer.test_resume_exact import assert_bit_identical, final_tensors, run_to_end

STEPS = 24


def tiny(tmp_path: Path, synth_cache: Path, name: str, ae: Path) -> Path:
    raw = tiny_raw(tmp_path / name, synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(ae)
    raw["trainer"].update(train_num_steps=STEPS, save_and_sample_every=STEPS, val_batches=0, log_freq=4)
    raw["checkpoint"] = {"every": 4, "keep_last": 2}
    raw["slurm"] = {"time_min": 10, "signal_lead_s": 60}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_local_job_stopped_by_usr2_requeues_and_finishes_bit_identical(
    tmp_path: Path, synth_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as run_to_end's straight run: same kernels, same bits
    ae = tmp_path / "ae.safetensors"
    straight = tiny(tmp_path, synth_cache, "straight", ae)
    write_random_first_stage(build_config(yaml.safe_load(straight.read_text())))
    run_to_end(straight, 1, tmp_path)

    cfg = build_config(yaml.safe_load(tiny(tmp_path, synth_cache, "job", ae).read_text()))
    job = submit(cfg, train_in_job, local=True)
    submitted = pickle.loads(job.paths.submitted_pickle.read_bytes())
    assert isinstance(submitted.function, TrainJob)
    assert set(vars(submitted.function)) == {"config", "cwd", "train"}, "nothing but the config is pickled"
    assert submitted.function.train is train_in_job, "the function by name"
    assert job.paths.submitted_pickle.stat().st_size < 20_000

    first = cfg.results_folder / "checkpoints" / "step-00000004" / "manifest.json"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert time.monotonic() < deadline and not job.done(), job.paths.stderr.read_text()[-3000:]
        time.sleep(0.05)
    # USR2 to the training task, as the local controller does near its time limit and Slurm does
    # to every task (submitit's own job._interrupt() signals the controller, which dies of it).
    [task] = subprocess.run(["pgrep", "-P", str(job.job_id)], capture_output=True, text=True).stdout.split()
    os.kill(int(task), signal.SIGCONT)  # as Slurm resumes a suspended job; submitit logs it in a handler
    os.kill(int(task), signal.SIGUSR2)
    job.wait()
    log = job.paths.stderr.read_text()
    assert job.state == "FINISHED" and job.result() is None, log[-3000:]

    assert "stop requested (SIGUSR2)" in log and "requeueing job" in log
    assert "Bypassing signal SIGCONT" not in log, "submitit's SIGCONT handler was taken over"
    events = [json.loads(x) for x in (cfg.results_folder / "events.jsonl").read_text().splitlines()]
    [stopped] = [e for e in events if e["event"] == "stopped"]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [stopped["step"]]
    ledger = json.loads((cfg.results_folder / "slurm" / str(job.job_id) / "requeues.json").read_text())
    assert ledger == {"timeouts": 1, "other": 0}, "a local job has no preemption: counted as a time limit"
    assert_bit_identical(final_tensors(tmp_path / "straight"), final_tensors(cfg.results_folder))


def test_submit_without_sbatch_says_what_to_do(tmp_path: Path, synth_cache: Path) -> None:
    cfg = tiny(tmp_path, synth_cache, "nosbatch", tmp_path / "ae.safetensors")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "radiodiff_resume.cli", "submit", "--cfg", str(cfg)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "sbatch not found" in out.stderr and "slurm/local_cluster.sh start" in out.stderr
    assert "Traceback" not in out.stderr
