"""A checkpoint write that fails on ONE rank of a real 2-process run (CPU, gloo) stops every
rank with the same SaveFailed, promptly (no rank left waiting at a barrier), leaves no staging
folder, keeps the earlier checkpoint intact and verified, and the same command then resumes.

The write error is real: the failing rank runs with ``RLIMIT_FSIZE`` (see dist_save_fail.py),
so the kernel answers a write past the limit with EFBIG ("File too large").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.config import build_config, load_config
from tests.checkpoint.helpers import STEP2, STEP4, build, committed, events, hashes
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.trainer.test_multiprocess import free_port

SCRIPT = REPO / "tests" / "checkpoint" / "dist_save_fail.py"
TRAIN = REPO / "train_cond_ldm.py"
HANG = 300
"""Seconds after which a launch counts as hung (the gloo default timeout is 30 minutes)."""

# Per-file size limits for the failing rank, from the files of a real checkpoint of this config:
# rank-0000N.json ~15 KB and rank-0000N.safetensors ~10 KB (every rank writes its own); rank 0
# also writes config.yaml ~2.4 KB, model.json ~31 KB, ema.json ~4.5 KB, optimizer.json ~19 KB,
# probe.safetensors ~35 KB, ema.safetensors ~290 KB, model.safetensors ~390 KB,
# optimizer.safetensors ~590 KB, and before the save the results folder's events.jsonl,
# metrics.jsonl, config.yaml and a ~4 KB sample grid (all a few KB).
# - rank 1 writes nothing but its rank files, so 1 KiB makes its first one (rank-00001.json) fail;
# - rank 0 at 64 KiB passes every small file (the largest, probe.safetensors, is ~35 KB) and its
#   own rank files, and fails on the first large shared file (model/ema/optimizer .safetensors).
LIMITS = {0: 64 * 1024, 1: 1024}


def write_config(tmp_path: Path, synth_cache: Path) -> Path:
    raw = tiny_raw(tmp_path / "run", synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(tmp_path / "ae.safetensors")
    raw["trainer"].update(train_num_steps=4, val_batches=0, num_sample_images=1)
    raw["checkpoint"] = {"every": 2}
    write_random_first_stage(build_config(raw))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def launch(*args: str) -> tuple[int, str]:
    """``accelerate launch`` 2 CPU processes; (exit code, output). A hang kills it and fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch still running after {HANG} s (a rank waits forever?):\n{out[-6000:]}")
    return proc.returncode, out


def rank_reports(out: Path) -> list[dict[str, tp.Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@dataclass(frozen=True)
class Committed:
    cfg: Path
    """The run's config; its results folder is ``cfg.parent / "run"``."""
    snapshot: Path
    """A copy of that results folder right after the 2-process launch committed step 2."""

    def reset(self) -> Path:
        """The run's results folder, put back as it was right after step 2 was committed."""
        results = self.cfg.parent / "run"
        shutil.rmtree(results)
        shutil.copytree(self.snapshot, results)
        return results


@pytest.fixture(scope="module")
def committed_step2(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Committed:
    """One real 2-process launch to step 2 for both failing ranks (each test starts from a copy of its
    results, at the same path, so the config and its recorded folder stay those of the launch)."""
    folder = tmp_path_factory.mktemp("save-failure")
    cfg = write_config(folder, synth_cache)
    code, log = launch(str(TRAIN), "--cfg", str(cfg), "trainer.train_num_steps=2")
    assert code == 0, log[-6000:]
    assert committed(folder / "run") == [STEP2]
    shutil.copytree(folder / "run", folder / "run-at-step-2")
    return Committed(cfg, folder / "run-at-step-2")


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_write_error_on_one_rank_stops_every_rank(committed_step2: Committed, tmp_path: Path,
                                                  fail_rank: int) -> None:
    cfg = committed_step2.cfg
    results = committed_step2.reset()
    checkpoints = results / "checkpoints"
    assert committed(results) == [STEP2]
    before = hashes(checkpoints / STEP2)

    out = tmp_path / "out"
    out.mkdir()
    code, log = launch(str(SCRIPT), str(cfg), str(out), str(fail_rank), str(LIMITS[fail_rank]),
                       "trainer.train_num_steps=4")
    assert code != 0, log[-6000:]
    reports = rank_reports(out)
    other = 1 - fail_rank
    for rank, report in enumerate(reports):
        assert report["type"] == "SaveFailed", (rank, report, log[-6000:])
        message = report["message"]
        assert "checkpoint of step 4 could not be written" in message, message
        assert f"rank {fail_rank}: OSError: [Errno 27] File too large" in message, message
        assert f"rank {other}:" not in message, message  # the rank that wrote fine is not blamed
        assert "earlier checkpoints are untouched" in message, message
        assert f"the newest committed checkpoint is {checkpoints / STEP2}" in message, message
        assert "run the same command to resume" in message, message
    assert reports[0]["message"] == reports[1]["message"], "every rank stops with the same message"
    assert "File too large" in reports[fail_rank]["cause"], reports[fail_rank]

    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")], "staging folder left behind"
    assert committed(results) == [STEP2]
    assert hashes(checkpoints / STEP2) == before
    assert [e["step"] for e in events(results, "checkpoint_saved")] == [2]
    assert [e["step"] for e in events(results, "resumed")] == [2]  # the failed run had resumed from 2

    trainer = build(load_config(cfg))
    report = trainer.checkpointer.verify_and_load(checkpoints / STEP2)
    assert report.ok, report.describe()
    assert trainer.state.step == 2

    code, log = launch(str(TRAIN), "--cfg", str(cfg))
    assert code == 0, log[-6000:]
    assert [e["step"] for e in events(results, "resumed")] == [2, 2]
    assert [e["step"] for e in events(results, "checkpoint_saved")] == [2, 4]
    assert committed(results) == [STEP2, STEP4]
    assert hashes(checkpoints / STEP2) == before
