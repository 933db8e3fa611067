"""Tests for the RadioMapSeer dataset on real files in the RadioMapSeer layout."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff_resume.data.radiomapseer import RadioMapSeer, split_maps
from radiodiff_resume.data.synthetic import generate
from radiodiff_resume.errors import DataError


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def _scaled(path: Path) -> torch.Tensor:
    return torch.from_numpy(_png(path).astype(np.float32)) / 127.5 - 1


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rms") / "RadioMapSeer"
    generate(path, num_maps=6, tx_per_map=3, seed=11)
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A private copy that a test may break."""
    path = tmp_path / "RadioMapSeer"
    generate(path, num_maps=3, tx_per_map=2, seed=5, size=32)
    return path


def test_sample_shapes_dtypes_and_values(root: Path) -> None:
    ds = RadioMapSeer(root, split="train")
    sample = ds[0]
    m, tx = ds.samples[0]
    assert sample["name"] == f"{m}_{tx}"
    assert sample["image"].shape == (1, 256, 256)
    assert sample["cond"].shape == (3, 256, 256)
    assert sample["image"].dtype == sample["cond"].dtype == torch.float32
    for key in ("image", "cond"):
        assert sample[key].min() >= -1 and sample[key].max() <= 1
    assert torch.allclose(sample["image"][0], _scaled(root / f"gain/DPM/{m}_{tx}.png"))
    assert sample["cond"].min() == -1 and sample["cond"].max() == 1


def test_cond_is_buildings_antenna_buildings(root: Path) -> None:
    ds = RadioMapSeer(root, split="val")
    for index in range(len(ds)):
        sample = ds[index]
        m, tx = ds.samples[index]
        cond = sample["cond"]
        buildings = _scaled(root / f"png/buildings_complete/{m}.png")
        assert torch.equal(cond[0], buildings) and torch.equal(cond[2], buildings)
        hot = torch.nonzero(cond[1] > -1)
        assert hot.tolist() == np.argwhere(_png(root / f"png/antennas/{m}_{tx}.png")).tolist()
        assert len(hot) == 1 and cond[1].max() == 1


def test_resize_keeps_transmitter_visible(root: Path) -> None:
    full = RadioMapSeer(root, split="train", max_samples=4)
    small = RadioMapSeer(root, split="train", image_size=64, max_samples=4)
    for index in range(4):
        big, sample = full[index], small[index]
        assert sample["image"].shape == (1, 64, 64) and sample["cond"].shape == (3, 64, 64)
        row, col = torch.nonzero(big["cond"][1] > -1)[0].tolist()
        assert sample["cond"][1, row // 4, col // 4] == 1
        assert (sample["cond"][1] > -1).sum() == 1
        assert torch.allclose(sample["image"].mean(), big["image"].mean(), atol=1e-4)
    larger = RadioMapSeer(root, split="train", image_size=320, max_samples=1)[0]
    assert larger["cond"].shape == (3, 320, 320)
    assert larger["cond"][1].max() > -0.5


def test_map_level_split(root: Path) -> None:
    train = RadioMapSeer(root, split="train")
    val = RadioMapSeer(root, split="val")
    assert set(train.map_ids).isdisjoint(val.map_ids)
    assert sorted(train.map_ids + val.map_ids) == list(range(6))
    assert len(val.map_ids) == 1 and len(train) == 15 and len(val) == 3
    assert {m for m, _ in train.samples} == set(train.map_ids)
    assert {m for m, _ in val.samples} == set(val.map_ids)
    again = RadioMapSeer(root, split="val")
    assert again.map_ids == val.map_ids and again.samples == val.samples
    wider = RadioMapSeer(root, split="val", val_fraction=0.5)
    assert len(wider.map_ids) == 3


def test_split_maps_is_deterministic_and_covers_all() -> None:
    ids = list(range(20))
    train, val = split_maps(ids, 0.25, seed=3)
    assert len(val) == 5 and sorted(train + val) == ids and not set(train) & set(val)
    shuffled = ids[::-1]
    assert split_maps(shuffled, 0.25, seed=3) == (train, val)
    assert split_maps(ids, 0.25, seed=4) != (train, val)
    assert split_maps([4, 9], 0.0, seed=0)[1] in ([4], [9])
    assert len(split_maps([1, 2, 3], 0.9, seed=0)[0]) == 1
    with pytest.raises(DataError, match="2 maps"):
        split_maps([7], 0.1, seed=0)


def test_samples_sorted_numerically_and_other_files_ignored(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate(root, num_maps=12, tx_per_map=2, seed=0, size=16)
    (root / "gain" / "DPM" / "notes.txt").write_text("not a sample")
    (root / "gain" / "DPM" / "preview.png").write_bytes(b"not a sample either")
    ds = RadioMapSeer(root, split="train", image_size=16, val_fraction=0.2)
    assert len(ds) == 2 * len(ds.map_ids) == 2 * (12 - 2)
    assert ds.map_ids == sorted(ds.map_ids) and ds.map_ids[-1] >= 10
    expected = [f"{m}_{tx}" for m in ds.map_ids for tx in range(2)]
    assert [ds[i]["name"] for i in range(len(ds))] == expected
    truncated = RadioMapSeer(root, split="train", image_size=16, val_fraction=0.2, max_samples=3)
    assert truncated.samples == ds.samples[:3] and len(truncated) == 3


def test_getitem_is_deterministic_and_leaves_global_rng(small: Path) -> None:
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    np_state, py_state, torch_state = (
        np.random.get_state(),
        random.getstate(),
        torch.get_rng_state(),
    )
    ds = RadioMapSeer(small, split="train", image_size=32)
    first, second = ds[1], ds[1]
    assert torch.equal(first["image"], second["image"])
    assert torch.equal(first["cond"], second["cond"])
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="leave data.root unset") as info:
        RadioMapSeer(missing)
    assert f"data.root={missing}" in str(info.value)


def test_missing_gain_folder(small: Path) -> None:
    shutil.rmtree(small / "gain" / "DPM")
    with pytest.raises(DataError, match="does not exist") as info:
        RadioMapSeer(small)
    assert str(small / "gain" / "DPM") in str(info.value)


def test_empty_gain_folder(small: Path) -> None:
    for path in (small / "gain" / "DPM").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="no <map>_<tx>.png") as info:
        RadioMapSeer(small)
    assert str(small / "gain" / "DPM") in str(info.value)


def test_wrong_simulation_name(small: Path) -> None:
    with pytest.raises(DataError) as info:
        RadioMapSeer(small, simulation="IRT4")
    assert str(small / "gain" / "IRT4") in str(info.value)


def test_single_map_cannot_be_split(small: Path) -> None:
    for path in (small / "gain" / "DPM").glob("[12]_*.png"):
        path.unlink()
    with pytest.raises(DataError, match=">= 2 maps") as info:
        RadioMapSeer(small)
    assert str(small / "gain" / "DPM") in str(info.value)


@pytest.mark.parametrize("split", ["test", "validation", ""])
def test_bad_split(small: Path, split: str) -> None:
    with pytest.raises(DataError, match="'train' or 'val'"):
        RadioMapSeer(small, split=split)


@pytest.mark.parametrize(
    "relative", ["png/buildings_complete/{m}.png", "png/antennas/{m}_{tx}.png"]
)
def test_missing_condition_file_fails_at_construction(small: Path, relative: str) -> None:
    m, tx = RadioMapSeer(small, split="val").samples[-1]
    victim = small / relative.format(m=m, tx=tx)
    victim.unlink()
    with pytest.raises(DataError, match="is missing") as info:
        RadioMapSeer(small, split="val")
    assert str(victim) in str(info.value)
    RadioMapSeer(small, split="train")


@pytest.mark.parametrize("relative", ["gain/DPM/{m}_{tx}.png", "png/buildings_complete/{m}.png"])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png_names_the_file(small: Path, relative: str, damage: str) -> None:
    ds = RadioMapSeer(small, split="train", image_size=32)
    m, tx = ds.samples[0]
    victim = small / relative.format(m=m, tx=tx)
    data = victim.read_bytes()
    victim.write_bytes(b"\x00garbage, not a png" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read") as info:
        ds[0]
    assert str(victim) in str(info.value)


def test_rejects_bad_arguments(small: Path) -> None:
    with pytest.raises(DataError, match="max_samples"):
        RadioMapSeer(small, max_samples=0)
    with pytest.raises(DataError, match="val_fraction"):
        RadioMapSeer(small, val_fraction=1.0)
