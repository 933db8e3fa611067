"""Synthetic data in the RadioMapSeer folder layout.

The real dataset is large and licensed separately, so smoke runs, tests and first-time users
train on a small city-like stand-in that is generated from a seed and read by the very same
:class:`~radiodiff_resume.data.radiomapseer.RadioMapSeer` loader as the real data.

Layout written under the dataset root (``m`` = map index, ``tx`` = transmitter index)::

    png/buildings_complete/{m}.png   255 inside buildings, 0 outside
    png/antennas/{m}_{tx}.png        255 at the transmitter pixel, 0 elsewhere
    gain/DPM/{m}_{tx}.png            received gain, 0 inside buildings

and, only when asked for, the other parts of the release that RadioDiff reads::

    gain/IRT2/{m}_{tx}.png           a second simulation (``simulations``)
    png/cars/{m}.png                 255 inside cars parked in the streets (``cars``)
    gain/cars{sim}/{m}_{tx}.png      each simulation with the cars as obstacles (``cars``)
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import typing as tp
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from radiodiff_resume.errors import ConfigError, DataError
from radiodiff_resume.io import fsync_dir

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
"""Written last into a generated folder; a folder without it is never used."""

RAY_SAMPLES = 64
"""Points sampled along each transmitter-to-pixel ray to measure metres of wall crossed."""

# Gain model in PNG units: 255 at one metre, minus GAIN_SLOPE per decade of distance,
# minus WALL_LOSS per metre of building on the straight ray. RadioMapSeer maps 256 m onto
# 256 px, so other sizes scale the metres per pixel to keep the same look.
GAIN_AT_1M = 255.0
GAIN_SLOPE = 75.0
WALL_LOSS = 1.5
MAP_METRES = 256.0

SIMULATION_WALL_LOSS = {"DPM": WALL_LOSS, "IRT2": 2.5}
"""The simulations the generator can write, by their RadioMapSeer folder name. The stand-in
IRT2 is the same model with deeper building shadows: a different target on the same inputs,
which is what swapping ``data.simulation`` means for the model."""

CAR_LOSS = 4.0
"""Gain lost per metre of car on the straight ray (``gain/cars<simulation>``)."""

CARS_STREAM = 1
"""Third seed word of the cars' generator, so cars never shift the buildings or transmitters."""


def _blocks(rng: np.random.Generator, size: int) -> list[tuple[int, int]]:
    """Cut one axis into city blocks separated by streets, as (start, stop) intervals."""
    lo_block, hi_block = max(3, size // 8), max(4, size // 4)
    lo_street, hi_street = max(1, size // 32), max(2, size // 14)
    blocks = []
    pos = int(rng.integers(0, hi_street))
    while pos < size:
        stop = min(size, pos + int(rng.integers(lo_block, hi_block + 1)))
        if stop - pos >= 2:
            blocks.append((pos, stop))
        pos = stop + int(rng.integers(lo_street, hi_street + 1))
    return blocks


def _split(rng: np.random.Generator, start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    """Split a block side into lots of similar length so one block holds several buildings."""
    parts = max(1, min(parts, (stop - start) // 6))
    weights = np.cumsum(rng.uniform(0.6, 1.4, size=parts))
    edges = [start, *(start + np.rint(weights / weights[-1] * (stop - start))).astype(int)]
    return list(itertools.pairwise(edges))


def city_layout(rng: np.random.Generator, size: int) -> np.ndarray:
    """Axis-aligned buildings on a rough street grid, so maps look like city blocks."""
    buildings = np.zeros((size, size), dtype=bool)
    setback = max(1, size // 64)
    for r0, r1 in _blocks(rng, size):
        for c0, c1 in _blocks(rng, size):
            if rng.random() < 0.12:  # squares and parks keep some blocks open
                continue
            rows = _split(rng, r0, r1, int(rng.integers(1, 3)))
            cols = _split(rng, c0, c1, int(rng.integers(1, 4)))
            for a0, a1 in rows:
                for b0, b1 in cols:
                    if rng.random() < 0.1:
                        continue
                    i0, i1 = a0 + int(rng.integers(0, setback + 1)), a1 - int(rng.integers(0, 2))
                    j0, j1 = b0 + int(rng.integers(0, setback + 1)), b1 - int(rng.integers(0, 2))
                    buildings[i0:i1, j0:j1] = True
    return buildings


def car_layout(rng: np.random.Generator, buildings: np.ndarray) -> np.ndarray:
    """Cars: small rectangles along both street directions, never inside a building.

    About 2 x 4 m, the size of RadioMapSeer's cars, scaled with the map like the metres.
    """
    size = buildings.shape[0]
    short, long = max(1, size // 128), max(2, size // 64)
    cars = np.zeros(buildings.shape, dtype=bool)
    for _ in range(max(4, size * size // 1024)):
        height, width = (short, long) if rng.random() < 0.5 else (long, short)
        r = int(rng.integers(0, size - height + 1))
        c = int(rng.integers(0, size - width + 1))
        if not buildings[r : r + height, c : c + width].any():
            cars[r : r + height, c : c + width] = True
    return cars


def _crossed(mask: np.ndarray, sample_rows: np.ndarray, sample_cols: np.ndarray) -> np.ndarray:
    """How many of a pixel's RAY_SAMPLES ray samples fall inside ``mask``."""
    solid = mask.astype(np.uint8)
    count = np.zeros(mask.shape, dtype=np.uint8)  # at most RAY_SAMPLES, fits uint8
    for k in range(RAY_SAMPLES):
        count += solid.take(sample_rows[k], axis=0).take(sample_cols[k], axis=1)
    return count


def radio_map(
    buildings: np.ndarray,
    tx: tuple[int, int],
    wall_loss: float = WALL_LOSS,
    cars: np.ndarray | None = None,
) -> np.ndarray:
    """Gain map for a transmitter at pixel ``tx`` = (row, col), as uint8 PNG values.

    Log-distance path loss plus ``wall_loss`` per metre of building crossed on the straight
    ray, and :data:`CAR_LOSS` per metre of ``cars`` (a mask) when given. The ray samples are
    separable (a sample's row depends only on the pixel's row), so the wall count is two 1-D
    gathers per sample instead of a per-pixel ray march.
    """
    height, width = buildings.shape
    metres_per_px = MAP_METRES / max(height, width)
    ty, tx_col = tx
    rows = np.arange(height, dtype=np.float64) - ty
    cols = np.arange(width, dtype=np.float64) - tx_col
    t = (np.arange(RAY_SAMPLES, dtype=np.float64) + 0.5) / RAY_SAMPLES
    sample_rows = np.rint(ty + t[:, None] * rows[None, :]).astype(np.intp)
    sample_cols = np.rint(tx_col + t[:, None] * cols[None, :]).astype(np.intp)
    dist_m = np.hypot(rows[:, None], cols[None, :]) * metres_per_px
    wall_m = _crossed(buildings, sample_rows, sample_cols) / RAY_SAMPLES * dist_m
    gain = GAIN_AT_1M - GAIN_SLOPE * np.log10(np.maximum(dist_m, 1.0)) - wall_loss * wall_m
    if cars is not None:
        gain -= CAR_LOSS * (_crossed(cars, sample_rows, sample_cols) / RAY_SAMPLES * dist_m)
    gain = np.clip(np.rint(gain), 0, 255).astype(np.uint8)
    gain[buildings] = 0
    return gain


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write and fsync, so the COMPLETE marker written afterwards never outlives the data."""
    with open(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())


def generate(
    root: Path,
    num_maps: int,
    tx_per_map: int,
    seed: int,
    size: int = 256,
    simulations: tp.Sequence[str] = ("DPM",),
    cars: bool = False,
) -> None:
    """Write ``num_maps`` maps with ``tx_per_map`` transmitters each into ``root``.

    One ``gain/<simulation>`` folder per entry of ``simulations``; with ``cars``, the car maps
    and a ``gain/cars<simulation>`` folder per simulation too. Map ``m`` draws from its own
    generator seeded with ``(seed, m)``, its cars from ``(seed, m, CARS_STREAM)``: the output is
    a pure function of the arguments, asking for more leaves the other files byte for byte as
    they are, and the global RNGs are never touched.
    """
    problems = [
        f"{name} must be >= {low} (got {value})"
        for name, value, low in (
            ("num_maps", num_maps, 1),
            ("tx_per_map", tx_per_map, 1),
            ("seed", seed, 0),
            ("size", size, 16),
        )
        if value < low
    ]
    if not simulations or any(sim not in SIMULATION_WALL_LOSS for sim in simulations):
        problems.append(
            f"simulations must be some of {', '.join(SIMULATION_WALL_LOSS)} (got {list(simulations)})"
        )
    if problems:
        raise ConfigError("synthetic data: " + "; ".join(problems))
    root = Path(root)
    building_dir = root / "png" / "buildings_complete"
    antenna_dir = root / "png" / "antennas"
    cars_dir = root / "png" / "cars"
    gains = [
        (root / "gain" / f"{prefix}{sim}", SIMULATION_WALL_LOSS[sim], bool(prefix))
        for prefix in ("", "cars")[: 1 + cars]
        for sim in dict.fromkeys(simulations)
    ]
    folders = [building_dir, antenna_dir, *[cars_dir] * cars, *(folder for folder, _, _ in gains)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for m in range(num_maps):
        rng = np.random.default_rng([seed, m])
        buildings = city_layout(rng, size)
        free = np.flatnonzero(~buildings)
        if free.size < tx_per_map:
            raise ConfigError(f"synthetic map {m} has too few free pixels for {tx_per_map} tx")
        _save_png(np.where(buildings, 255, 0).astype(np.uint8), building_dir / f"{m}.png")
        car_mask = car_layout(np.random.default_rng([seed, m, CARS_STREAM]), buildings) if cars else None
        if car_mask is not None:
            _save_png(np.where(car_mask, 255, 0).astype(np.uint8), cars_dir / f"{m}.png")
        for tx, flat in enumerate(rng.choice(free, size=tx_per_map, replace=False)):
            pos = divmod(int(flat), size)
            antenna = np.zeros((size, size), dtype=np.uint8)
            antenna[pos] = 255
            _save_png(antenna, antenna_dir / f"{m}_{tx}.png")
            for folder, wall_loss, with_cars in gains:
                gain = radio_map(buildings, pos, wall_loss, car_mask if with_cars else None)
                _save_png(gain, folder / f"{m}_{tx}.png")
    for folder in (*folders, root / "png", root / "gain", root):
        fsync_dir(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _move_aside(path: Path) -> None:
    """Clear an incomplete folder (crash of an older version) out of the final path.

    Renaming first makes the final path free at once even if deleting takes a while, and a
    concurrent process doing the same just finds it already gone.
    """
    aside = path.with_name(f".{path.name}.incomplete-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    _remove(aside)


def synthetic_root(
    cache_dir: str | Path,
    num_maps: int,
    tx_per_map: int,
    seed: int,
    size: int = 256,
    simulations: tp.Sequence[str] = ("DPM",),
    cars: bool = False,
) -> Path:
    """Where :func:`ensure_synthetic` keeps this parameter set (complete once it holds ``COMPLETE``).

    Only folders with more than the default gain/DPM have the extras in their name, so caches
    written before those existed stay valid.
    """
    sims = sorted(set(simulations))
    extras = "" if sims == ["DPM"] and not cars else "-" + "+".join(sims) + "-cars" * cars
    return (
        Path(cache_dir).expanduser()
        / f"radiomapseer-synth-s{seed}-m{num_maps}-t{tx_per_map}-{size}{extras}"
    )


def ensure_synthetic(
    cache_dir: str | Path,
    num_maps: int,
    tx_per_map: int,
    seed: int,
    size: int = 256,
    simulations: tp.Sequence[str] = ("DPM",),
    cars: bool = False,
) -> Path:
    """Return a complete synthetic dataset root, generating it once per parameter set.

    Generation happens in a private staging folder that is renamed into place only after the
    ``COMPLETE`` marker is written, so concurrent jobs sharing a cache never see a half
    written dataset and a crash never leaves one behind under the final name.
    """
    final = synthetic_root(cache_dir, num_maps, tx_per_map, seed, size, simulations, cars)
    cache_dir = final.parent
    if (final / COMPLETE_MARKER).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".{final.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info(
        "generating synthetic RadioMapSeer data (%d maps x %d tx, %dpx, seed %d) into %s",
        num_maps,
        tx_per_map,
        size,
        seed,
        final,
    )
    try:
        generate(staging, num_maps, tx_per_map, seed, size, simulations, cars)
        with open(staging / COMPLETE_MARKER, "w") as f:
            f.write(f"seed={seed} num_maps={num_maps} tx_per_map={tx_per_map} size={size}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(staging)
        if (final.exists() or final.is_symlink()) and not (final / COMPLETE_MARKER).is_file():
            logger.info("replacing incomplete synthetic data folder %s", final)
            _move_aside(final)
        try:
            staging.rename(final)
        except OSError as exc:
            if not (final / COMPLETE_MARKER).is_file():
                raise DataError(
                    f"cannot move generated synthetic data {staging} to {final}: {exc}; "
                    f"check permissions and free space in {cache_dir}"
                ) from exc
            logger.info("another process finished %s first; using its copy", final)
    finally:
        if staging.exists():
            _remove(staging)
    fsync_dir(cache_dir)
    return final
