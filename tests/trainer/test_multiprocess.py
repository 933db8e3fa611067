"""A real 2-process ``accelerate launch`` run (CPU, gloo): ranks see different data and
end with identical weights, buffers and EMA, which only DDP's all-reduce can give."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_end_with_equal_weights(tmp_path: Path, synth_cache: Path) -> None:
    raw = tiny_raw(tmp_path / "run", synth_cache)
    raw["model"]["first_stage"]["train_if_missing"] = True
    raw["trainer"].update(train_num_steps=6, gradient_accumulate_every=2)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    out.mkdir()
    proc = accelerate_launch(str(REPO / "tests" / "trainer" / "dist_train.py"), str(cfg), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"], "ranks must draw different data"
    assert len(ranks[0]["first_batch"]) == len(ranks[1]["first_batch"]) == 2, \
        "data.batch_size 4 is the global batch (as in RadioDiff): 2 per rank"
    assert ranks[0]["model"] == ranks[1]["model"]
    assert ranks[0]["ema"] == ranks[1]["ema"]
    assert ranks[0]["scale_factor"] == ranks[1]["scale_factor"] != 1.0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_skip_a_corrupt_checkpoint_together(tmp_path: Path, synth_cache: Path) -> None:
    """Rank 0 quarantines the corrupt newest checkpoint; both ranks resume from the older one."""
    raw = tiny_raw(tmp_path / "run", synth_cache)
    raw["model"]["first_stage"]["train_if_missing"] = True
    raw["trainer"].update(train_num_steps=10, val_batches=0, save_and_sample_every=10)
    raw["checkpoint"] = {"every": 5}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    entry = [str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg)]
    assert accelerate_launch(*entry).returncode == 0
    weights = tmp_path / "run" / "checkpoints" / "step-00000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    proc = accelerate_launch(*entry, "trainer.train_num_steps=12")
    assert proc.returncode == 0, proc.stderr[-4000:]
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    quarantined = [e for e in events if e["event"] == "checkpoint_quarantined"]
    assert len(quarantined) == 1 and "xxh3_128 mismatch" in quarantined[0]["reason"]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [5]
    assert (tmp_path / "run" / "checkpoints" / "step-00000012" / "manifest.json").is_file()
