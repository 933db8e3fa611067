"""BatchStream: rank shards are disjoint, order depends only on (seed, epoch), and the
state_dict position resumes to exactly the batches an uninterrupted stream would give."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from radiodiff_resume.data.stream import BatchStream
from radiodiff_resume.errors import DataError


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
    assert a.state_dict() == {"epoch": 1, "position": 3}


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
    assert s.state_dict() == {"epoch": 0, "position": 0}
    assert ids(next(s)) == peeked


def test_too_small_dataset_is_a_clear_error() -> None:
    with pytest.raises(DataError, match=r"3 samples, fewer than data.batch_size \(2\) x processes \(2\)"):
        BatchStream(Numbers(3), 2, rank=0, world_size=2)


def test_no_global_rng_side_effects() -> None:
    before = torch.get_rng_state()
    s = BatchStream(Numbers(8), 2, seed=0)
    for _ in range(5):
        next(s)
    assert torch.equal(before, torch.get_rng_state())
