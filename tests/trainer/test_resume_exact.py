"""N steps straight == the same command killed with SIGKILL at several moments (one of
them in the middle of a checkpoint save) and re-run until done — compared bit for bit.

Real processes, real SIGKILL (of the whole process group), real files; single process
and ``accelerate launch --multi_gpu --num_processes 2`` (CPU, gloo).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from radiodiff_resume.config import build_config
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.trainer.test_multiprocess import free_port

STEPS, EVERY = 30, 5


def write_config(tmp_path: Path, synth_cache: Path, name: str, ae: Path, **model: tp.Any) -> Path:
    """The tiny config of these runs, written to ``<name>.yaml``; ``model``: extra ``model.*`` keys."""
    raw = tiny_raw(tmp_path / name, synth_cache)
    raw["model"].update(model)
    raw["model"]["first_stage"]["ckpt_path"] = str(ae)
    raw["trainer"].update(train_num_steps=STEPS, save_and_sample_every=STEPS, val_batches=0, log_freq=5)
    raw["checkpoint"] = {"every": EVERY, "keep_last": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def command(cfg: Path, processes: int) -> list[str]:
    entry = [str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg)]
    if processes == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *entry]


def start(cfg: Path, processes: int, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command(cfg, processes), cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen[str], ready: tp.Callable[[], bool], delay: float = 0.0,
              timeout: float = 300) -> bool:
    """SIGKILL the whole process group once ``ready()``; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.003)
    raise AssertionError("trigger never fired")


def run_to_end(cfg: Path, processes: int, cwd: Path) -> str:
    proc = start(cfg, processes, cwd)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


Weights = dict[str, dict[str, torch.Tensor]]


def final_tensors(folder: Path) -> Weights:
    return {name: load_file(str(folder / "final" / name))
            for name in ("model.safetensors", "model_ema.safetensors")}


def assert_bit_identical(a: Weights, b: Weights) -> None:
    for name in a:
        assert a[name].keys() == b[name].keys()
        different = [k for k in a[name] if not torch.equal(a[name][k], b[name][k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_killed_and_rerun_equals_straight(tmp_path: Path, synth_cache: Path, processes: int) -> None:
    ae = tmp_path / "ae.safetensors"
    write_config(tmp_path, synth_cache, "probe", ae)
    write_random_first_stage(build_config(yaml.safe_load((tmp_path / "probe.yaml").read_text())))
    straight_cfg = write_config(tmp_path, synth_cache, "straight", ae)
    killed_cfg = write_config(tmp_path, synth_cache, "killed", ae)
    checkpoints = tmp_path / "killed" / "checkpoints"
    rng = random.Random(processes)

    run_to_end(straight_cfg, processes, tmp_path)

    def staging() -> bool:
        return checkpoints.is_dir() and any(p.name.startswith(".staging-") for p in checkpoints.iterdir())

    def committed(step: int) -> tp.Callable[[], bool]:
        return lambda: (checkpoints / f"step-{step:08d}" / "manifest.json").exists()

    # 1: in the middle of the first save; 2: mid-step after step 10 committed;
    # 3: in the middle of a later save; 4: at a random moment after step 20 committed.
    assert kill_when(start(killed_cfg, processes, tmp_path), staging)
    assert staging(), "the first kill must land inside a save (staging folder left behind)"
    assert kill_when(start(killed_cfg, processes, tmp_path), committed(10), delay=rng.uniform(0.0, 0.05))
    assert kill_when(start(killed_cfg, processes, tmp_path), lambda: committed(15)() and staging())
    assert kill_when(start(killed_cfg, processes, tmp_path), committed(20), delay=rng.uniform(0.0, 0.1))
    out = run_to_end(killed_cfg, processes, tmp_path)

    assert "resumed from verified checkpoint" in out
    events = [json.loads(x) for x in (tmp_path / "killed" / "events.jsonl").read_text().splitlines()]
    resumed = [e["step"] for e in events if e["event"] == "resumed"]
    assert len(resumed) >= 3 and resumed == sorted(resumed), resumed
    assert not any(e["event"] == "checkpoint_quarantined" for e in events)
    assert_bit_identical(final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "killed"))
