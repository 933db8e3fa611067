"""RadioMapSeer dataset: radio maps conditioned on building and transmitter maps.

Reads the layout of the public RadioMapSeer release (and of
:mod:`radiodiff_resume.data.synthetic`)::

    png/buildings_complete/{m}.png   buildings, 255 inside
    png/antennas/{m}_{tx}.png        transmitter pixel, 255
    gain/{simulation}/{m}_{tx}.png   radio map (the diffusion target)

Every file is checked at construction so a broken copy fails before training starts, not
hours into it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from radiodiff_resume.errors import DataError

SAMPLE_NAME = re.compile(r"^(\d+)_(\d+)\.png$")
"""``{map}_{tx}.png``: anything else in the gain folder (notes, thumbnails) is ignored."""


def split_maps(map_ids: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split map ids into (train, val) so that no city appears in both.

    Transmitters of one map share its buildings; splitting at the sample level would leak
    the validation cities into training. The split depends only on the set of ids and the
    seed, so every run and every process agrees on it.
    """
    unique = sorted(set(map_ids))
    if len(unique) < 2:
        raise DataError(f"the train/val split needs >= 2 maps, got {len(unique)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    val = sorted(unique[i] for i in order[:n_val])
    train = sorted(unique[i] for i in order[n_val:])
    return train, val


def _listing(folder: Path) -> set[str]:
    """File names in ``folder``; one listing replaces thousands of per-file stat calls."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _read_png(path: Path) -> np.ndarray:
    """Load a PNG as a 2-D uint8 array, turning decoder failures into a DataError."""
    try:
        with Image.open(path) as image:
            image.load()
            array = np.asarray(image if image.mode == "L" else image.convert("L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read {path}: {exc}; the file is missing, corrupt or not a PNG. "
            "Restore it from the original RadioMapSeer archive, or delete the synthetic "
            "dataset folder so it is regenerated"
        ) from exc
    return array


def _resize(x: torch.Tensor, size: int, keep_peaks: bool = False) -> torch.Tensor:
    """Resize a [C, H, W] tensor in [0, 1] to ``size`` x ``size``.

    Area averaging avoids aliasing when shrinking; ``keep_peaks`` max-pools instead so a
    one-pixel transmitter survives (averaging would dim it to 1/k^2).
    """
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    if size < height or size < width:
        if keep_peaks:
            return F.adaptive_max_pool2d(x[None], size)[0]
        return F.interpolate(x[None], size=(size, size), mode="area")[0]
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


class RadioMapSeer(Dataset):
    """Samples ``{"image": [1,H,W], "cond": [3,H,W], "name": "m_tx"}`` scaled to [-1, 1].

    ``cond`` is (buildings, antenna, buildings): three channels so conditioning encoders
    built for RGB inputs apply unchanged, as in RadioDiff.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: int = 256,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        simulation: str = "DPM",
        max_samples: int | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        if max_samples is not None and max_samples < 1:
            raise DataError(f"max_samples must be >= 1 or unset, got {max_samples}")
        self.root = Path(root).expanduser()
        self.split = split
        self.image_size = image_size
        self.simulation = simulation
        if not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist; pass data.root=/path/to/RadioMapSeer "
                "or leave data.root unset to use the synthetic default"
            )
        self.gain_dir = self.root / "gain" / simulation
        self.building_dir = self.root / "png" / "buildings_complete"
        self.antenna_dir = self.root / "png" / "antennas"

        samples = sorted(
            (int(match[1]), int(match[2]))
            for match in map(SAMPLE_NAME.match, _listing(self.gain_dir))
            if match
        )
        if not samples:
            state = "does not exist" if not self.gain_dir.is_dir() else "has no <map>_<tx>.png"
            raise DataError(
                f"{self.gain_dir} {state}; data.root={self.root} must be a RadioMapSeer folder "
                f"with gain/{simulation}/<map>_<tx>.png files (check data.root and the "
                "simulation name)"
            )
        all_maps = sorted({m for m, _ in samples})
        if len(all_maps) < 2:
            raise DataError(
                f"{self.gain_dir} holds only map {all_maps[0]}; the map-level train/val split "
                "needs >= 2 maps, so add more maps to data.root"
            )
        train_maps, val_maps = split_maps(all_maps, val_fraction, split_seed)
        self.map_ids: list[int] = train_maps if split == "train" else val_maps
        wanted = set(self.map_ids)
        self.samples: list[tuple[int, int]] = [s for s in samples if s[0] in wanted]
        if max_samples is not None:
            self.samples = self.samples[:max_samples]
        self._check_files()

    def _check_files(self) -> None:
        """Fail at construction, naming the first missing file, rather than mid-epoch."""
        buildings = _listing(self.building_dir)
        antennas = _listing(self.antenna_dir)
        missing = [
            path
            for m, tx in self.samples
            for path, present in (
                (self.building_dir / f"{m}.png", f"{m}.png" in buildings),
                (self.antenna_dir / f"{m}_{tx}.png", f"{m}_{tx}.png" in antennas),
            )
            if not present
        ]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"{missing[0]} is missing{more}; data.root={self.root} is an incomplete "
                "RadioMapSeer copy: restore the png/buildings_complete and png/antennas "
                "folders, or point data.root at a complete copy"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path, keep_peaks: bool = False) -> torch.Tensor:
        array = _read_png(path)
        x = torch.from_numpy(array.astype(np.float32))[None] / 255.0
        return _resize(x, self.image_size, keep_peaks) * 2.0 - 1.0

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        m, tx = self.samples[index]
        image = self._load(self.gain_dir / f"{m}_{tx}.png")
        buildings = self._load(self.building_dir / f"{m}.png")
        antenna = self._load(self.antenna_dir / f"{m}_{tx}.png", keep_peaks=True)
        return {
            "image": image,
            "cond": torch.cat([buildings, antenna, buildings]),
            "name": f"{m}_{tx}",
        }
