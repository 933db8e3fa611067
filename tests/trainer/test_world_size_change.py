"""Resuming on another number of processes: every sample of the epoch is read exactly once.

Real runs (``train_cond_ldm.py`` for one process, ``accelerate launch --multi_gpu
--num_processes 2`` on CPU with gloo) over a plugged-in dataset that logs each read
(:mod:`tests.trainer.counting_data`). Run A trains ``k`` steps on ``a`` processes and commits
step ``k``; run B resumes it on ``b`` processes, finishes epoch 0 and goes into epoch 1. The
reads of both runs must be the shared permutation of epoch 0 consumed as one prefix (nothing
skipped, nothing repeated, only a tail shorter than one global batch dropped), then epoch 1;
B says that the resume is exact in data but not bit-exact in noise and logs ``resharded``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import typing as tp
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from radiodiff_resume.config import build_config
from radiodiff_resume.data.radiomapseer import RadioMapSeer
from radiodiff_resume.data.stream import epoch_order
from radiodiff_resume.data.synthetic import ensure_synthetic
from tests.checkpoint.helpers import read_component
from tests.conftest import REPO, tiny_raw, write_random_first_stage
from tests.trainer.test_multiprocess import free_port

BS = 4
SEED = 3
RESHARD_MESSAGE = "exact in data but not bit-exact in noise"
# 9 training maps x 4 transmitters, cut to 34 samples: with 4 x 2 or 4 x 1 per global batch
# epoch 0 ends with a tail shorter than a global batch in both scenarios.
TRAIN_PARAMS: dict[str, tp.Any] = dict(image_size=32, val_fraction=0.25, split_seed=0, max_samples=34)
VAL_PARAMS: dict[str, tp.Any] = dict(image_size=32, val_fraction=0.25, split_seed=0, max_samples=4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth-counting")
    return ensure_synthetic(folder, num_maps=12, tx_per_map=4, seed=0, size=64)


class Run(tp.NamedTuple):
    stderr: str
    reads: list[list[int]]
    """Per process: training indices read through the DataLoader, in order."""


class Scenario:
    """One results folder, its config file and the runs made on it."""

    def __init__(self, tmp_path: Path, cache: Path, k: int) -> None:
        self.tmp = tmp_path
        self.results = tmp_path / "run"
        self.logs = tmp_path / "reads"
        raw = tiny_raw(self.results, cache)
        raw["model"]["scale_by_std"] = False  # no peek at the first batch
        raw["model"]["first_stage"]["ckpt_path"] = str(tmp_path / "ae.safetensors")
        raw["data"].update(
            batch_size=None, batch_size_per_process=BS, num_workers=0, image_size=32,  # BS per process
            train={"target": "tests.trainer.counting_data.CountingMaps",
                   "params": {"log_dir": str(self.logs), "root": str(cache), "split": "train",
                              **TRAIN_PARAMS}},
            validation={"target": "tests.trainer.counting_data.CountingMaps",
                        "params": {"log_dir": str(self.logs), "root": str(cache), "split": "val",
                                   **VAL_PARAMS}},
        )
        raw["trainer"].update(train_num_steps=k, save_and_sample_every=1000, val_batches=0, log_freq=1,
                              seed=SEED)
        raw["checkpoint"] = {"every": k}
        self.cfg = tmp_path / "cfg.yaml"
        self.cfg.write_text(yaml.safe_dump(raw))
        write_random_first_stage(build_config(raw))
        self.runs = 0

    def run(self, processes: int, steps: int) -> Run:
        """Train to ``steps`` on ``processes`` processes; exit status 0 required."""
        entry = [str(REPO / "train_cond_ldm.py"), "--cfg", str(self.cfg), f"trainer.train_num_steps={steps}"]
        if processes == 1:
            cmd = [sys.executable, *entry]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                   "no", "--main_process_port", str(free_port()), *entry]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=self.tmp, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        # This run's logs move aside, so the next run's processes start new files (even on a reused pid).
        done = self.tmp / f"reads-{self.runs}"
        self.runs += 1
        shutil.move(self.logs, done)
        files = sorted(done.glob("train-*.txt"))
        assert len(files) == processes, [f.name for f in files]
        return Run(proc.stderr, [loader_reads(f) for f in files])

    def events(self) -> list[dict[str, tp.Any]]:
        return [json.loads(line) for line in (self.results / "events.jsonl").read_text().splitlines()]

    def checkpoint(self, step: int) -> Path:
        return self.results / "checkpoints" / f"step-{step:08d}"


def loader_reads(path: Path) -> list[int]:
    """The indices a process read through the DataLoader; any other read of the training set
    (the builder's item check) must come before the first of them, i.e. before training."""
    lines = [line.split() for line in path.read_text().splitlines()]
    sources = [source for _, source in lines]
    assert set(sources) <= {"loader", "direct"}, sources
    if "loader" in sources:
        first = sources.index("loader")
        assert "direct" not in sources[first:], f"{path.name}: a read during training bypassed the stream"
    return [int(index) for index, source in lines if source == "loader"]


def shards(order: torch.Tensor, start: int, batches: int, world: int) -> list[list[int]]:
    """Per rank: the samples of ``batches`` global batches from position ``start`` of ``order``
    (global batch j = positions ``start + j*BS*world ...``, dealt to ranks by stride)."""
    block = order[start : start + batches * BS * world].tolist()
    return [block[rank::world] for rank in range(world)]


def check_world_size_change(tmp_path: Path, cache: Path, a: int, b: int, k: int) -> tuple[Scenario, int]:
    """Runs A (``a`` processes, ``k`` steps) and B (``b`` processes); the scenario and B's last step."""
    n = len(RadioMapSeer(cache, split="train", **TRAIN_PARAMS))
    assert n == 34
    perm0, perm1 = epoch_order(n, SEED, 0), epoch_order(n, SEED, 1)
    start = k * BS * a  # global position of run A's checkpoint
    assert n - start >= BS * a, "run A must stop inside epoch 0"
    in_epoch0 = (n - start) // (BS * b)  # B's whole global batches left in epoch 0
    tail = n - start - in_epoch0 * BS * b
    assert 0 < tail < BS * b, "the scenario must drop a tail"
    into_epoch1 = 2
    total = k + in_epoch0 + into_epoch1

    s = Scenario(tmp_path, cache, k)
    run_a = s.run(a, k)
    assert read_component(s.checkpoint(k), "data") == {"epoch": 0, "offset": start}
    run_b = s.run(b, total)

    # Each process read exactly its steps' batches, no more (no prefetch, no peek).
    assert [len(r) for r in run_a.reads] == [k * BS] * a
    assert [len(r) for r in run_b.reads] == [(total - k) * BS] * b
    per_rank_b = in_epoch0 * BS
    epoch0 = [i for r in run_a.reads for i in r] + [i for r in run_b.reads for i in r[:per_rank_b]]
    repeated = [i for i, c in Counter(epoch0).items() if c > 1]
    assert not repeated, f"samples read twice in epoch 0: {repeated}"
    assert len(epoch0) == k * BS * a + in_epoch0 * BS * b
    assert {i for r in run_a.reads for i in r} == set(perm0[:start].tolist())
    assert set(epoch0) == set(perm0[: len(epoch0)].tolist()), "epoch 0 is not consumed as one prefix"
    never = set(range(n)) - set(epoch0)
    assert len(never) == tail < BS * b, sorted(never)

    # Exactly the shared permutation, in order: A's shards, then B's shards of the rest, then epoch 1.
    assert sorted(run_a.reads) == sorted(shards(perm0, 0, k, a))
    expected_b = [e0 + e1 for e0, e1 in zip(shards(perm0, start, in_epoch0, b),
                                          shards(perm1, 0, into_epoch1, b), strict=True)]
    assert sorted(run_b.reads) == sorted(expected_b)

    assert RESHARD_MESSAGE in run_b.stderr
    assert f"saved by {a} process(es), resumed by {b}" in run_b.stderr
    assert RESHARD_MESSAGE not in run_a.stderr
    events = s.events()
    assert [(e["step"], e["reason"]) for e in events if e["event"] == "resharded"] == [
        (k, f"saved by {a} process(es), resumed by {b}")]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [k]
    assert not [e for e in events if e["event"] == "checkpoint_quarantined"]
    assert read_component(s.checkpoint(total), "data") == {"epoch": 1, "offset": into_epoch1 * BS * b}
    return s, total


@pytest.mark.slow
def test_two_processes_to_one(tmp_path: Path, cache: Path) -> None:
    k = 2
    s, total = check_world_size_change(tmp_path, cache, a=2, b=1, k=k)

    # A resume on the same number of processes restores each rank's own streams: no reshard.
    run_c = s.run(1, total + 1)
    assert RESHARD_MESSAGE not in run_c.stderr
    events = s.events()
    assert [e["step"] for e in events if e["event"] == "resharded"] == [k]
    assert [e["step"] for e in events if e["event"] == "resumed"] == [k, total]
    # B left epoch 1 after two batches of 4 x 1; C reads the third.
    assert run_c.reads == [epoch_order(34, SEED, 1)[2 * BS : 3 * BS].tolist()]


@pytest.mark.slow
def test_one_process_to_two(tmp_path: Path, cache: Path) -> None:
    k = 3
    s, total = check_world_size_change(tmp_path, cache, a=1, b=2, k=k)
    # Run B's two ranks drew their noise from streams re-derived per rank, not from one saved state.
    noise = [read_component(s.checkpoint(total), f"rank-{r:05d}")["noise_rng"] for r in (0, 1)]
    assert not torch.equal(noise[0], noise[1])
