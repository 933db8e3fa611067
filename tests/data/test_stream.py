"""BatchStream: rank shards are disjoint, order depends only on (seed, epoch), the
state_dict position resumes to exactly the batches an uninterrupted stream would give,
and a resume with another world size or batch size neither skips nor repeats a sample."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from radiodiff_resume.data.stream import BatchStream, epoch_order
from radiodiff_resume.errors import DataError
from tests.conftest import REPO


class Numbers(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": torch.tensor([i])}


def ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["image"].flatten().tolist()


def test_ranks_get_disjoint_equal_shards() -> None:
    streams = [BatchStream(Numbers(23), 3, rank=r, world_size=2, seed=1) for r in (0, 1)]
    assert streams[0].batches_per_epoch == 3
    epoch = [[i for b in s.rank_batches(0) for i in b] for s in streams]
    assert len(epoch[0]) == len(epoch[1]) == 9
    assert not set(epoch[0]) & set(epoch[1])


def test_epochs_reshuffle_deterministically() -> None:
    a = BatchStream(Numbers(12), 4, seed=7)
    b = BatchStream(Numbers(12), 4, seed=7)
    first = [ids(next(a)) for _ in range(6)]
    assert first == [ids(next(b)) for _ in range(6)]
    assert sorted(i for batch in first[:3] for i in batch) == list(range(12))
    assert first[:3] != first[3:], "a new epoch reshuffles"
    assert a.state_dict() == {"epoch": 2, "offset": 0}, "the last batch of an epoch rolls over"
    next(a)
    assert a.state_dict() == {"epoch": 2, "offset": 4}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_dict_continues_exactly(workers: int) -> None:
    straight = BatchStream(Numbers(10), 3, seed=3, num_workers=workers)
    expected = [ids(next(straight)) for _ in range(8)]
    first = BatchStream(Numbers(10), 3, seed=3, num_workers=workers)
    head = [ids(next(first)) for _ in range(4)]
    resumed = BatchStream(Numbers(10), 3, seed=3, num_workers=workers)
    resumed.load_state_dict(first.state_dict())
    assert head + [ids(next(resumed)) for _ in range(4)] == expected


def test_peek_does_not_move_the_stream() -> None:
    s = BatchStream(Numbers(8), 2, seed=0)
    peeked = ids(s.peek())
    assert s.state_dict() == {"epoch": 0, "offset": 0}
    assert ids(next(s)) == peeked


def test_too_small_dataset_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"3 samples, fewer than one global batch: 2 per process x 2 process"):
        BatchStream(Numbers(3), 2, rank=0, world_size=2)


def test_no_global_rng_side_effects() -> None:
    before = torch.get_rng_state()
    s = BatchStream(Numbers(8), 2, seed=0)
    for _ in range(5):
        next(s)
    assert torch.equal(before, torch.get_rng_state())


def test_state_is_global_and_equal_on_every_rank() -> None:
    streams = [BatchStream(Numbers(29), 3, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for s in streams:
        next(s)
        next(s)
    assert streams[0].state_dict() == streams[1].state_dict() == {"epoch": 0, "offset": 12}


N, SEED = 29, 5


def take_epoch0(streams: list[BatchStream], k: int | None = None) -> list[int]:
    """Lockstep batches from all ranks, ``k`` rounds or until the state says epoch 1."""
    taken: list[int] = []
    rounds = 0
    while streams[0].state_dict()["epoch"] == 0 and (k is None or rounds < k):
        taken += [i for s in streams for i in ids(next(s))]
        rounds += 1
    return taken


def switch(old_batch: int, old_world: int, k: int, new_batch: int, new_world: int) -> None:
    old = [BatchStream(Numbers(N), old_batch, r, old_world, SEED) for r in range(old_world)]
    before = take_epoch0(old, k)
    states = [s.state_dict() for s in old]
    assert all(state == states[0] for state in states)
    assert states[0] == {"epoch": 0, "offset": k * old_batch * old_world}
    perm = epoch_order(N, SEED, 0).tolist()
    assert sorted(before) == sorted(perm[: len(before)]), "consumed so far is a prefix"

    new = [BatchStream(Numbers(N), new_batch, r, new_world, SEED) for r in range(new_world)]
    for s in new:
        s.load_state_dict(states[0])
    after = take_epoch0(new)
    assert after, "the resumed stream continued epoch 0"
    consumed = before + after
    assert len(consumed) == len(set(consumed)), "no sample repeated"
    left = set(range(N)) - set(consumed)
    assert left == set(perm[len(consumed) :]), "only the final tail is dropped"
    assert len(left) < new_batch * new_world
    assert new[0].state_dict() == {"epoch": 1, "offset": 0}


@pytest.mark.parametrize("new_batch", [3, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_resume_two_processes_into_one(new_batch: int, k: int) -> None:
    switch(old_batch=3, old_world=2, k=k, new_batch=new_batch, new_world=1)


@pytest.mark.parametrize("new_batch", [3, 2])
@pytest.mark.parametrize("k", [1, 5])
def test_resume_one_process_into_two(new_batch: int, k: int) -> None:
    switch(old_batch=3, old_world=1, k=k, new_batch=new_batch, new_world=2)


def test_resharded_stream_crosses_into_a_full_fresh_epoch() -> None:
    old = [BatchStream(Numbers(N), 3, r, 2, SEED) for r in (0, 1)]
    take_epoch0(old, 2)
    new = [BatchStream(Numbers(N), 4, r, 3, SEED) for r in range(3)]
    for s in new:
        s.load_state_dict(old[0].state_dict())
    take_epoch0(new)
    fresh = [BatchStream(Numbers(N), 4, r, 3, SEED) for r in range(3)]
    for s, f in zip(new, fresh, strict=True):
        for _ in range(f.batches_per_epoch):
            next(f)
        assert f.state_dict() == {"epoch": 1, "offset": 0}
        epoch1 = [ids(next(s)) for _ in range(s.batches_per_epoch)]
        assert epoch1 == [ids(next(f)) for _ in range(f.batches_per_epoch)]
    assert new[0].state_dict() == {"epoch": 2, "offset": 0}


def test_load_of_an_exhausted_offset_starts_the_next_epoch() -> None:
    s = BatchStream(Numbers(N), 4, seed=SEED)
    s.load_state_dict({"epoch": 0, "offset": 27})  # a W=3 x 9 stream's end; 2 left < 4
    assert s.state_dict() == {"epoch": 1, "offset": 0}
    assert ids(next(s)) == s.rank_batches(1)[0]


@pytest.mark.parametrize(
    ("state", "field"),
    [
        ({"epoch": 0, "offset": N + 1}, "offset"),
        ({"epoch": 0, "offset": -1}, "offset"),
        ({"epoch": -1, "offset": 0}, "epoch"),
        ({"epoch": 0, "offset": 1.5}, "offset"),
        ({"epoch": "0", "offset": 0}, "epoch"),
        ({"epoch": True, "offset": 0}, "epoch"),
        ({"epoch": 0, "position": 0}, "offset"),
    ],
)
def test_load_state_dict_rejects_bad_states(state: dict, field: str) -> None:
    s = BatchStream(Numbers(N), 3, seed=SEED)
    with pytest.raises(DataError, match=f"'{field}'"):
        s.load_state_dict(state)
    assert s.state_dict() == {"epoch": 0, "offset": 0}, "a rejected state changes nothing"


def test_offset_zero_keeps_the_full_epoch() -> None:
    s = BatchStream(Numbers(N), 3, rank=1, world_size=2, seed=SEED)
    perm = epoch_order(N, SEED, 0).tolist()
    assert s.rank_batches(0) == [perm[1:24:2][i : i + 3] for i in range(0, 12, 3)]
    assert s.rank_batches(0, 12) == s.rank_batches(0)[2:]


EXIT_SCRIPT = """
import sys

import torch

from radiodiff_resume.data.stream import BatchStream
from radiodiff_resume.slurm.signals import STOP

STOP.install()  # as a command does first: its DataLoader workers then ignore SIGTERM too


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.tensor(i)}


KEPT = BatchStream(Items(), 2, num_workers=1)  # alive until after multiprocessing's exit handler
next(KEPT)
if sys.argv[1] == "close":
    KEPT.close()
print("done", flush=True)
"""


@pytest.mark.parametrize("close", [True, False], ids=["closed", "left-open"])
def test_a_closed_stream_lets_the_process_exit(tmp_path: Path, close: bool) -> None:
    """At exit, multiprocessing terminates its daemon children with SIGTERM, which our workers ignore,
    then joins them: a stream still open then hangs the process (the stop test's hang), a closed one
    does not. The left-open case shows the hang is real, so the closed case can fail."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), "close" if close else "open"], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60 if close else 10)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the process and its stuck worker
        out, _ = proc.communicate()
        hung = True
    assert out.strip() == "done"
    assert hung is not close
    if close:
        assert proc.returncode == 0
