"""The whole training job (``train_cond_ldm.py``, real processes) refuses a results folder whose
lock is held, before writing anything into it, and takes over the lock of a SIGKILLed holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from radiodiff_resume.config import build_config
from radiodiff_resume.lock import RunLock
from tests.conftest import REPO, tiny_raw, write_random_first_stage

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TRAIN = str(REPO / "train_cond_ldm.py")


def write_config(tmp_path: Path, synth_cache: Path) -> Path:
    """A 1-step config whose first-stage weights live outside the results folder."""
    raw = tiny_raw(tmp_path / "run", synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(tmp_path / "ae.safetensors")
    raw["trainer"].update(train_num_steps=1, val_batches=0, num_sample_images=1)
    write_random_first_stage(build_config(raw))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, TRAIN, "--cfg", str(cfg)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def recorded_pid(lock_file: Path) -> int | None:
    """The pid in the lock file's holder record; None while absent, empty or half written."""
    try:
        return int(json.loads(lock_file.read_text())["pid"])
    except (FileNotFoundError, ValueError):
        return None


def test_held_folder_is_refused_untouched_then_trains_once_released(
    tmp_path: Path, synth_cache: Path
) -> None:
    cfg = write_config(tmp_path, synth_cache)
    results = tmp_path / "run"
    lock = RunLock(results)
    lock.acquire()
    try:
        proc = train(cfg)
        assert proc.returncode == 2, proc.stderr[-4000:]
        errors = error_lines(proc.stderr)
        assert len(errors) == 1, proc.stderr[-4000:]
        assert f"pid {os.getpid()}" in errors[0], errors[0]
        assert str(results / ".lock") in errors[0], errors[0]
        assert "another trainer.results_folder" in errors[0], errors[0]
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        assert sorted(os.listdir(results)) == [".lock"]
    finally:
        lock.release()

    proc = train(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (results / "checkpoints" / "step-00000001" / "manifest.json").is_file()
    assert (results / "config.yaml").is_file()


def test_sigkilled_holder_is_taken_over(tmp_path: Path, synth_cache: Path) -> None:
    cfg = write_config(tmp_path, synth_cache)
    results = tmp_path / "run"
    code = ("import sys, time\nfrom radiodiff_resume.lock import RunLock\n"
            "RunLock(sys.argv[1]).acquire()\ntime.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(results)], env=ENV)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert holder.poll() is None, "the holder died before taking the lock"
            if recorded_pid(results / ".lock") == holder.pid:
                break
            assert time.monotonic() < deadline, "the holder never wrote its record"
            time.sleep(0.02)
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()

    proc = train(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    notes = [line for line in proc.stderr.splitlines() if "took over the lock" in line]
    assert len(notes) == 1, proc.stderr[-4000:]
    assert f"pid {holder.pid}" in notes[0], notes[0]
    assert (results / "checkpoints" / "step-00000001" / "manifest.json").is_file()
