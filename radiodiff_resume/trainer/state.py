"""Counters of a run, kept as a ``state_dict`` so a checkpoint can carry them."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import typing as tp
from dataclasses import dataclass

import numpy as np
import torch


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


def capture_rng(device: torch.device) -> dict[str, tp.Any]:
    """Global RNG states of this process: python, numpy, torch, and the CUDA generator of the
    one GPU this rank uses (not of every visible GPU: a node may show another number)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, tp.Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: tp.Mapping[str, tp.Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng`; a CUDA state is restored only onto a GPU."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
