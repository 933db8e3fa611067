"""A plugged-in dataset (``data.train`` / ``data.validation``) that records every read.

It wraps :class:`~radiodiff_resume.data.radiomapseer.RadioMapSeer` and appends one line per
sample read to ``<log_dir>/<split>-<pid>.txt`` (flushed at once, so a run's reads are on disk
when it exits): ``<index> loader`` for a read made by a DataLoader fetching a batch (the
DataLoader calls ``__getitems__`` for a whole batch), ``<index> direct`` for any other read
(``dataset[i]``: the builder's item check, probe inputs, sample grids).
"""

from __future__ import annotations

import os
import typing as tp
from pathlib import Path

from torch.utils.data import Dataset

from radiodiff_resume.data.radiomapseer import RadioMapSeer


class CountingMaps(Dataset):
    def __init__(self, log_dir: str, root: str, split: str = "train", **params: tp.Any) -> None:
        self.inner = RadioMapSeer(root, split=split, **params)
        self.split = split
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.inner)

    def _record(self, indices: list[int], source: str) -> None:
        path = self.log_dir / f"{self.split}-{os.getpid()}.txt"
        with open(path, "a", encoding="utf-8") as log:
            log.writelines(f"{int(i)} {source}\n" for i in indices)
            log.flush()

    def __getitem__(self, index: int) -> dict[str, tp.Any]:
        self._record([index], "direct")
        return self.inner[index]

    def __getitems__(self, indices: list[int]) -> list[dict[str, tp.Any]]:
        self._record(indices, "loader")
        return [self.inner[i] for i in indices]
