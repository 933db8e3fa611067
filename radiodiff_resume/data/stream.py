"""A resumable, rank-sharded stream of training batches.

The stream counts the batches the trainer has *taken* (not the ones DataLoader
workers prefetched), so its ``state_dict`` is the exact data position to resume
from. The order of an epoch depends only on ``(seed, epoch)``: no global RNG.

All ranks move in lockstep over one shared permutation, so the samples consumed
so far in an epoch are always a prefix of it. The position is therefore stored
globally, as that prefix's length (``offset``): the same on every rank, and valid
for a resume with another number of processes or another batch size, which then
continues the epoch without skipping or repeating a sample.
"""

from __future__ import annotations

import numbers
import typing as tp

import torch
from torch.utils.data import DataLoader, Dataset

from radiodiff_resume.errors import DataError
from radiodiff_resume.slurm.signals import STOP


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in ``epoch``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


class _Batches:
    """A fixed list of batches as a DataLoader batch sampler."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> tp.Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchStream:
    """Endless batches for one rank; equal batch counts on every rank (no uneven tails).

    State: ``{"epoch": e, "offset": g}``, ``g`` = samples of epoch ``e``'s permutation
    consumed by all ranks together. Each batch taken advances ``g`` by
    ``batch_size * world_size``; once fewer samples than that remain, the rest of the
    epoch is dropped and the state moves to ``(e + 1, 0)`` straight away, so a state
    always names where the next batch comes from.
    """

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
        self.step = batch_size * world_size  # samples consumed per batch, all ranks together
        self.batches_per_epoch = self.n // self.step
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training set has {self.n} samples, fewer than one global batch: {batch_size} per "
                f"process x {world_size} process(es); lower data.batch_size or add data"
            )
        self.epoch = 0
        self.offset = 0
        self._iterator: tp.Iterator[dict[str, tp.Any]] | None = None

    def rank_batches(self, epoch: int, offset: int = 0) -> list[list[int]]:
        """This rank's batches of ``epoch`` from global ``offset`` on: a strided shard of
        the whole batches left in the shared permutation (the tail is dropped)."""
        used = (self.n - offset) // self.step * self.step
        mine = epoch_order(self.n, self.seed, epoch)[offset : offset + used]
        mine_list = mine[self.rank :: self.world_size].tolist()
        return [mine_list[i : i + self.batch_size] for i in range(0, len(mine_list), self.batch_size)]

    def peek(self) -> dict[str, tp.Any]:
        """The first batch of epoch 0, without moving the stream (for ``scale_by_std``)."""
        indices = self.rank_batches(0)[0]
        return tp.cast(dict, torch.utils.data.default_collate([self.dataset[i] for i in indices]))

    def _roll_over_if_done(self) -> None:
        """Start the next epoch once the current one has no whole batch left."""
        if self.n - self.offset < self.step:
            self.epoch += 1
            self.offset = 0
            self._iterator = None

    def __next__(self) -> dict[str, tp.Any]:
        if self._iterator is None:
            loader = DataLoader(
                self.dataset,
                batch_sampler=_Batches(self.rank_batches(self.epoch, self.offset)),
                num_workers=self.num_workers,
                worker_init_fn=STOP.worker_init_fn(),
                # DataLoader draws its worker base seed from this generator, not the global RNG.
                generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch + self.rank),
            )
            self._iterator = iter(loader)
        batch = next(self._iterator)  # never exhausted: the epoch rolls over after its last batch
        self.offset += self.step
        self._roll_over_if_done()
        return tp.cast(dict, batch)

    def __iter__(self) -> BatchStream:
        return self

    def close(self) -> None:
        """Shut the DataLoader workers down now; the next batch starts new ones.

        They ignore the stop signals (:meth:`StopFlag.worker_init_fn`), SIGTERM included, so the
        ``terminate()`` that multiprocessing sends its daemon children at interpreter exit cannot end
        them; a trainer kept alive by a reference cycle until then would leave the process waiting
        for its workers forever. Dropping the iterator makes it shut them down in order.
        """
        self._iterator = None

    def state_dict(self) -> dict[str, int]:
        """The global data position: identical on every rank."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        """Resume from a state written by any stream over the same data and seed, whatever
        its world size or batch size."""
        values = {}
        for key, low, high in (("epoch", 0, None), ("offset", 0, self.n)):
            value = state.get(key)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise DataError(f"data state field {key!r} must be an integer, got {value!r}")
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f">= {low}"
                raise DataError(f"data state field {key!r} is {value}; it must be {bound}")
            values[key] = int(value)
        self.epoch, self.offset = values["epoch"], values["offset"]
        self._iterator = None
        self._roll_over_if_done()
