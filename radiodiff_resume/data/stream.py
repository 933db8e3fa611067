"""A resumable, rank-sharded stream of training batches.

The stream counts the batches the trainer has *taken* (not the ones DataLoader
workers prefetched), so its ``state_dict`` is the exact data position to resume
from. The order of an epoch depends only on ``(seed, epoch)``: no global RNG.
"""

from __future__ import annotations

import typing as tp

import torch
from torch.utils.data import DataLoader, Dataset

from radiodiff_resume.errors import DataError


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class _EpochBatches:
    """Batch sampler over one epoch of one rank, starting at batch ``start``."""

    def __init__(self, stream: BatchStream, epoch: int, start: int) -> None:
        self.batches = stream.rank_batches(epoch)[start:]

    def __iter__(self) -> tp.Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchStream:
    """Endless batches for one rank; equal batch counts on every rank (no uneven tails)."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = num_workers
        self.batches_per_epoch = self.n // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training set has {self.n} samples, fewer than data.batch_size "
                f"({batch_size}) x processes ({world_size}); lower data.batch_size or add data"
            )
        self.epoch = 0
        self.position = 0
        self._iterator: tp.Iterator[dict[str, tp.Any]] | None = None

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``: a strided shard of the shared permutation."""
        used = self.batches_per_epoch * self.batch_size * self.world_size
        mine = epoch_order(self.n, self.seed, epoch)[:used][self.rank :: self.world_size].tolist()
        return [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def peek(self) -> dict[str, tp.Any]:
        """The first batch of epoch 0, without moving the stream (for ``scale_by_std``)."""
        indices = self.rank_batches(0)[0]
        return tp.cast(dict, torch.utils.data.default_collate([self.dataset[i] for i in indices]))

    def __next__(self) -> dict[str, tp.Any]:
        if self._iterator is None:
            loader = DataLoader(
                self.dataset,
                batch_sampler=_EpochBatches(self, self.epoch, self.position),
                num_workers=self.num_workers,
                # DataLoader draws its worker base seed from this generator, not the global RNG.
                generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch + self.rank),
            )
            self._iterator = iter(loader)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self.position = 0
            self._iterator = None
            return next(self)
        self.position += 1
        return tp.cast(dict, batch)

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: tp.Mapping[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._iterator = None
