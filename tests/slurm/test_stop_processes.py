"""Two real training processes (torch's env:// variables, gloo, as ``srun`` gives them through
:func:`radiodiff_resume.slurm.environment.export_torch_env`): a signal sent to ONE rank's process
group — its DataLoader workers included — stops BOTH ranks at the same step with one committed
checkpoint and exit status 3; running the same command again finishes bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.cli import EXIT_STOPPED
from radiodiff_resume.config import build_config
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.trainer.test_multiprocess import free_port
from tests.trainer.test_resume_exact import assert_bit_identical, final_tensors

pytestmark = pytest.mark.slow

STEPS = 16


def write_config(tmp_path: Path, synth_cache: Path, name: str, ae: Path) -> Path:
    raw = tiny_raw(tmp_path / name, synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(ae)
    raw["trainer"].update(train_num_steps=STEPS, save_and_sample_every=STEPS, val_batches=0, log_freq=4)
    raw["data"]["num_workers"] = 1
    raw["checkpoint"] = {"every": 4, "keep_last": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Rank(tp.NamedTuple):
    proc: subprocess.Popen[bytes]
    log: Path


def start_ranks(cfg: Path, cwd: Path) -> list[Rank]:
    """Each rank writes to its own log file: a pipe that nobody drains while the other rank is
    awaited could fill and block a rank inside a collective, and a hang would show no output."""
    port = str(free_port())
    ranks = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        log = cwd / f"{cfg.stem}-{time.monotonic_ns()}-rank{rank}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg)],
                                    cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        ranks.append(Rank(proc, log))
    return ranks


def finish(ranks: list[Rank], timeout: float = 600) -> list[tuple[int, str]]:
    """Both ranks' exit codes and output; on a hang both are killed and both outputs shown."""
    deadline = time.monotonic() + timeout
    while any(r.proc.poll() is None for r in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    hung = [r.proc for r in ranks if r.proc.poll() is None]
    for proc in hung:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    outputs = [r.log.read_text(errors="replace") for r in ranks]
    assert not hung, "ranks hung:\n" + "\n".join(f"--- rank {i}:\n{o[-4000:]}" for i, o in enumerate(outputs))
    return [(tp.cast(int, r.proc.returncode), o) for r, o in zip(ranks, outputs, strict=True)]


def test_a_signal_to_one_rank_stops_both_at_one_step(tmp_path: Path, synth_cache: Path) -> None:
    ae = tmp_path / "ae.safetensors"
    straight_cfg = write_config(tmp_path, synth_cache, "straight", ae)
    write_random_first_stage(build_config(yaml.safe_load(straight_cfg.read_text())))
    stopped_cfg = write_config(tmp_path, synth_cache, "stopped", ae)
    results = tmp_path / "stopped"

    for code, out in finish(start_ranks(straight_cfg, tmp_path)):
        assert code == 0, out[-3000:]

    ranks = start_ranks(stopped_cfg, tmp_path)
    deadline = time.monotonic() + 300
    while not (results / "checkpoints" / "step-00000004" / "manifest.json").exists():
        assert time.monotonic() < deadline and all(r.proc.poll() is None for r in ranks), "no step 4"
        time.sleep(0.01)
    os.killpg(ranks[1].proc.pid, signal.SIGUSR1)  # rank 1 and its DataLoader worker only
    ended = finish(ranks)
    for code, out in ended:
        assert code == EXIT_STOPPED, out[-3000:]
    assert "stopped: ldm stopped at step" in ended[0][1] and "run the same command to resume" in ended[0][1]

    events = [json.loads(x) for x in (results / "events.jsonl").read_text().splitlines()]
    [stop] = [e for e in events if e["event"] == "stopped"]
    assert (stop["reason"], stop["rank"]) == ("SIGUSR1", 1), \
        "rank 0 (which writes events and decides a requeue) knows which signal rank 1 got"
    assert "stop requested (SIGUSR1 on rank 1)" in ended[0][1] and "(SIGUSR1 on rank 1)" in ended[1][1]
    assert 4 <= stop["step"] < STEPS
    committed = sorted(p.name for p in (results / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert committed[-1] == f"step-{stop['step']:08d}", "the stop step's checkpoint is the newest"
    rank_files = {p.name for p in (results / "checkpoints" / committed[-1]).iterdir() if "rank" in p.name}
    assert {f"rank-0000{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")} <= rank_files, \
        "both ranks saved their state in the stop's checkpoint"

    for code, out in finish(start_ranks(stopped_cfg, tmp_path)):
        assert code == 0, out[-3000:]
    events = [json.loads(x) for x in (results / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [stop["step"]]
    assert_bit_identical(final_tensors(tmp_path / "straight"), final_tensors(results))
