"""Counters of a run, kept as a ``state_dict`` so a checkpoint can carry them."""

from __future__ import annotations

import dataclasses
import hashlib
import typing as tp
from dataclasses import dataclass


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken and samples consumed (all ranks)."""

    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: tp.Mapping[str, tp.Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state[f.name]))


def derive_seed(seed: int, *tags: int | str) -> int:
    """A 63-bit seed for one purpose/rank, independent of every other stream of the run."""
    text = ":".join(str(t) for t in (seed, *tags))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
