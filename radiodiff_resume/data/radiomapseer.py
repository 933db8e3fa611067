"""RadioMapSeer dataset: radio maps conditioned on building and transmitter maps.

Reads the layout of the public RadioMapSeer release (and of
:mod:`radiodiff_resume.data.synthetic`)::

    png/buildings_complete/{m}.png   buildings, 255 inside
    png/antennas/{m}_{tx}.png        transmitter pixel, 255
    png/cars/{m}.png                 cars, 255 inside (read with ``cars=True`` only)
    gain/{simulation}/{m}_{tx}.png   radio map (the diffusion target): DPM, IRT2, ...
    gain/cars{simulation}/{m}_{tx}.png   the same simulation with the cars (``cars=True``)

Every file is checked at construction so a broken copy fails before training starts, not
hours into it.

Three ways to split the maps (``data.split``): ``maps``, a seeded split of whatever maps the
folder holds (:func:`split_maps`), and ``radiodiff`` / ``radiodiff_600``, RadioDiff's fixed
splits of the full release (:func:`radiodiff_split`), so that validation numbers compare with
RadioDiff's.
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

RADIODIFF_NUM_MAPS = 700
"""RadioDiff shuffles positions ``0..699``; file ids are position + 1, so map 0 is never used."""

RADIODIFF_TX_PER_MAP = 80
"""RadioDiff's ``numTx``: every map contributes transmitters ``0..79``."""

RADIODIFF_POSITIONS = {
    "radiodiff": {"train": (0, 500), "val": (600, 650), "test": (600, 699)},
    "radiodiff_600": {"train": (0, 600), "val": (600, 650), "test": (600, 699)},
}
"""First and last (inclusive) position in the shuffled map list, per RadioDiff split and phase.

``radiodiff``: ``RadioUNet_c`` as released with the paper. ``radiodiff_600``: RadioDiff's later
loaders (``RadioUNet_c`` at the current head, and ``RadioUNet_c_WithCar_NOK_or_K``, which its
``DPMCAR`` dataset uses), which train on 100 more maps, position 600 among them.
"""

SPLIT_MODES = ("maps", *RADIODIFF_POSITIONS)
"""``data.split`` values: how the maps are divided between train and val."""

CARS = "cars"
"""RadioMapSeer's prefix of the simulations with cars (``gain/carsDPM``) and the car maps' folder."""


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


def radiodiff_split(mode: str = "radiodiff") -> dict[str, list[int]]:
    """RadioDiff's map ids (file names ``{id}.png``) for ``train`` / ``val`` / ``test``.

    As RadioDiff's ``lib/loaders.py``: positions ``0..699`` are shuffled with
    ``np.random.seed(42); np.random.shuffle``, each phase takes positions ``ind1..ind2``
    *inclusive* (its ``__len__`` is ``(ind2 - ind1 + 1) * numTx``), and the file id is the
    position's value plus one. Both modes have the same val (positions 600..650, 51 maps, all
    of them also in test) and test (600..699, 100 maps), and map 0 of the release in no phase:

    - ``radiodiff``, as released with the paper: train is positions 0..500, 501 maps, disjoint
      from val and test; positions 501..599 (99 maps) are in no phase.
    - ``radiodiff_600``, RadioDiff's later loaders: train is positions 0..600, 601 maps: those
      501, the 99 unused ones and position 600, the first val and test map, which is therefore
      trained on (1 of the 51 val maps, 1 of the 100 test maps).

    A private ``RandomState(42)`` draws the very permutation of the global call without
    touching the global RNG.
    """
    if mode not in RADIODIFF_POSITIONS:
        raise DataError(f"RadioDiff split must be one of {', '.join(RADIODIFF_POSITIONS)}, got {mode!r}")
    order = np.arange(RADIODIFF_NUM_MAPS, dtype=np.int64)
    np.random.RandomState(42).shuffle(order)
    return {
        phase: [int(i) + 1 for i in order[first : last + 1]]
        for phase, (first, last) in RADIODIFF_POSITIONS[mode].items()
    }


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
    """Samples ``{"image": [1,H,W], "cond": [3,H,W], "name": "m_tx", "img_name": "m_tx.png"}``,
    tensors scaled to [-1, 1] (PNG value / 127.5 - 1); ``img_name`` is RadioDiff's name for
    the sample.

    ``cond`` is (buildings, antenna, buildings): three channels so conditioning encoders
    built for RGB inputs apply unchanged, as in RadioDiff. ``cars=True`` is RadioDiff's
    dynamic radio map (its ``DPMCAR`` dataset, ``carsSimul`` and ``carsInput`` on): the car map
    takes the third channel, (buildings, antenna, cars), scaled like the other two, and the
    target is ``gain/cars<simulation>``, the same simulation with those cars in the city.

    ``split_mode="maps"`` splits the maps found in the folder with :func:`split_maps`
    (``split`` is ``train`` or ``val``). ``split_mode="radiodiff"`` or ``"radiodiff_600"``
    takes RadioDiff's map lists (:func:`radiodiff_split`; ``split`` may also be ``test``),
    transmitters ``0..79`` of each, in RadioDiff's order, so ``dataset[i]["img_name"]`` is
    RadioDiff's ``i``-th sample; ``val_fraction`` and ``split_seed`` are then unused, and every
    one of those samples must be in the folder.
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
        split_mode: str = "maps",
        cars: bool = False,
    ) -> None:
        if split_mode not in SPLIT_MODES:
            raise DataError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, got {split_mode!r}")
        if split_mode in RADIODIFF_POSITIONS and split not in RADIODIFF_POSITIONS[split_mode]:
            raise DataError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if split_mode == "maps" and split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        if max_samples is not None and max_samples < 1:
            raise DataError(f"max_samples must be >= 1 or unset, got {max_samples}")
        if cars and simulation.startswith(CARS):
            raise DataError(
                f"data.simulation={simulation} with data.cars: true would read gain/{CARS}{simulation}; "
                "data.cars picks the simulation with cars itself, so set data.simulation="
                f"{simulation.removeprefix(CARS)}"
            )
        self.root = Path(root).expanduser()
        self.split = split
        self.split_mode = split_mode
        self.image_size = image_size
        self.simulation = simulation
        self.cars = cars
        self.target = f"{CARS}{simulation}" if cars else simulation  # the gain/ folder read
        if not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist; pass data.root=/path/to/RadioMapSeer "
                "or leave data.root unset to use the synthetic default"
            )
        self.gain_dir = self.root / "gain" / self.target
        self.building_dir = self.root / "png" / "buildings_complete"
        self.antenna_dir = self.root / "png" / "antennas"
        self.cars_dir = self.root / "png" / CARS

        samples = sorted(
            (int(match[1]), int(match[2]))
            for match in map(SAMPLE_NAME.match, _listing(self.gain_dir))
            if match
        )
        if not samples:
            state = "does not exist" if not self.gain_dir.is_dir() else "has no <map>_<tx>.png"
            why = f", which data.cars: true reads for simulation {simulation}" if cars else ""
            raise DataError(
                f"{self.gain_dir} {state}{why}; data.root={self.root} must be a RadioMapSeer folder "
                f"with gain/{self.target}/<map>_<tx>.png files (check data.root and data.simulation)"
            )
        if split_mode in RADIODIFF_POSITIONS:
            self.map_ids: list[int] = radiodiff_split(split_mode)[split]
            self.samples: list[tuple[int, int]] = self._radiodiff_samples(set(samples))
        else:
            all_maps = sorted({m for m, _ in samples})
            if len(all_maps) < 2:
                raise DataError(
                    f"{self.gain_dir} holds only map {all_maps[0]}; the map-level train/val split "
                    "needs >= 2 maps, so add more maps to data.root"
                )
            train_maps, val_maps = split_maps(all_maps, val_fraction, split_seed)
            self.map_ids = train_maps if split == "train" else val_maps
            wanted = set(self.map_ids)
            self.samples = [s for s in samples if s[0] in wanted]
        if max_samples is not None:
            self.samples = self.samples[:max_samples]
        self._check_files()

    def _radiodiff_samples(self, present: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """RadioDiff's samples of ``self.split`` in its order; all must be in the gain folder."""
        wanted = [(m, tx) for m in self.map_ids for tx in range(RADIODIFF_TX_PER_MAP)]
        found = {m for m, _ in present}
        absent = [m for m in self.map_ids if m not in found]
        if absent:
            raise DataError(
                f"{len(absent)} of the {len(self.map_ids)} maps of RadioDiff's {self.split!r} split "
                f"are missing from {self.gain_dir}, which holds {len(found)} maps (e.g. map "
                f"{', '.join(map(str, absent[:3]))}): data.split: {self.split_mode} needs the full "
                f"RadioMapSeer release (maps 1..700, {RADIODIFF_TX_PER_MAP} transmitters each) "
                f"simulated in gain/{self.target} at data.root; for a folder with other maps, such as "
                "the synthetic default or a simulation your copy holds for some maps only, use "
                "data.split: maps"
            )
        missing = [s for s in wanted if s not in present]
        if missing:
            m, tx = missing[0]
            raise DataError(
                f"{self.gain_dir / f'{m}_{tx}.png'} is missing ({len(missing)} of the "
                f"{len(wanted)} samples of RadioDiff's {self.split!r} split are): data.split: "
                f"{self.split_mode} needs all {RADIODIFF_TX_PER_MAP} transmitters of each map; "
                "restore the gain folder from the original RadioMapSeer archive"
            )
        return wanted

    def _check_files(self) -> None:
        """Fail at construction, naming the first missing file, rather than mid-epoch."""
        buildings = _listing(self.building_dir)
        antennas = _listing(self.antenna_dir)
        cars = _listing(self.cars_dir) if self.cars else set()
        missing = [
            path
            for m, tx in self.samples
            for path, present in (
                (self.building_dir / f"{m}.png", f"{m}.png" in buildings),
                (self.antenna_dir / f"{m}_{tx}.png", f"{m}_{tx}.png" in antennas),
                *([(self.cars_dir / f"{m}.png", f"{m}.png" in cars)] if self.cars else []),
            )
            if not present
        ]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            folders = "png/buildings_complete, png/antennas" + (f" and png/{CARS}" if self.cars else "")
            raise DataError(
                f"{missing[0]} is missing{more}; data.root={self.root} is an incomplete "
                f"RadioMapSeer copy: restore the {folders} folders, or point data.root at a "
                "complete copy"
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
        third = self._load(self.cars_dir / f"{m}.png") if self.cars else buildings
        return {
            "image": image,
            "cond": torch.cat([buildings, antenna, third]),
            "name": f"{m}_{tx}",
            "img_name": f"{m}_{tx}.png",
        }
