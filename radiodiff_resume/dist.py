"""Host-side agreement between the processes of one run.

Every decision that changes what the ranks do next (stop, a failed save, a failed
resume) must reach every rank, or the others wait in a collective until the process
group times out. These helpers travel over a gloo group, so they never sync a GPU stream.
"""

from __future__ import annotations

import copy
import typing as tp

import torch
from accelerate import Accelerator


class Ranks:
    """The processes of this run, as seen from one of them."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.group = _cpu_group() if self.world > 1 else None
        self._background: Ranks | None = None

    def background(self) -> Ranks:
        """The same ranks over a gloo group of their own, for the checkpoint writer thread: collectives
        of two threads on one group could reach the ranks in different orders and deadlock. Made once,
        on first use, which every rank must reach at the same point (``new_group`` is collective)."""
        if self._background is None:
            other = copy.copy(self)
            if self.world > 1:
                other.group = torch.distributed.new_group(backend="gloo")
            other._background = other
            self._background = other
        return self._background

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (the same answer on every rank)."""
        if self.group is None:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def gather(self, obj: tp.Any) -> list[tp.Any]:
        """Every rank's ``obj``, in rank order, on every rank (small picklable values only)."""
        if self.group is None:
            return [obj]
        out: list[tp.Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: tp.Any) -> tp.Any:
        """Rank 0's ``obj`` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def failures(self, error: str | None) -> list[str]:
        """``rank r: error`` for every rank that reports one; empty when all succeeded."""
        return [f"rank {r}: {e}" for r, e in enumerate(self.gather(error)) if e is not None]


def _cpu_group() -> tp.Any:
    """A gloo process group for small host-side values (the default group when it is gloo)."""
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo")
