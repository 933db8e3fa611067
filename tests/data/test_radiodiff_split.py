"""``data.split: radiodiff``: RadioDiff's fixed map split of RadioMapSeer and its sample names.

The expected lists are rebuilt here from RadioDiff's ``lib/loaders.py`` (``RadioUNet_c``):
``np.arange(0, 700, 1, dtype=np.int16)`` shuffled by ``np.random.seed(42);
np.random.shuffle`` on the global RNG, phases ``ind1..ind2`` inclusive (train 0..500, val
600..650, test 600..699), file id = value + 1, 80 transmitters per map.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff_resume.build import build_datasets
from radiodiff_resume.config import build_config
from radiodiff_resume.data.radiomapseer import RadioMapSeer, radiodiff_split
from radiodiff_resume.data.synthetic import generate
from radiodiff_resume.errors import DataError
from radiodiff_resume.guard.sanitize import finite_batch
from tests.data.radiodiff_facts import TX

pytestmark = pytest.mark.usefixtures("few_transmitters")

SIZE = 4


def test_lists_are_radiodiffs_global_rng_shuffle(radiodiff_order: list[int]) -> None:
    split = radiodiff_split()
    assert sorted(radiodiff_order) == list(range(700))
    ids = [i + 1 for i in radiodiff_order]  # dataset_map_ind = maps_inds[...] + 1
    assert split["train"] == ids[0:501]
    assert split["val"] == ids[600:651]
    assert split["test"] == ids[600:700]


def test_stated_facts_of_the_split() -> None:
    split = radiodiff_split()
    train, val, test = split["train"], split["val"], split["test"]
    assert (len(train), len(val), len(test)) == (501, 51, 100)
    # Literal values: a change in the permutation or the +1 offset shows here.
    assert train[:5] == [159, 501, 397, 156, 322] and train[-1] == 187
    assert val[:5] == [289, 419, 392, 593, 499] and val[-1] == 14
    assert test[:5] == val[:5] and test[-1] == 103
    for ids in (train, val, test):
        assert len(set(ids)) == len(ids) and min(ids) >= 1 and max(ids) <= 700
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test)
    assert test[:51] == val  # val is the first 51 test maps: every val map is a test map
    used = set(train) | set(test)
    assert len(used) == 601 and 0 not in used
    assert len(set(range(1, 701)) - used) == 99  # positions 501..599


def test_split_leaves_global_rng_alone() -> None:
    np.random.seed(7)
    before = np.random.get_state()
    radiodiff_split()
    after = np.random.get_state()
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert after[2:] == before[2:]


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_maps(root: Path, maps: dict[int, int]) -> None:
    """``maps``: map id -> number of transmitters; gain pixels hold ``id % 251`` to tell maps apart."""
    gain, antennas, buildings = (
        root / "gain" / "DPM", root / "png" / "antennas", root / "png" / "buildings_complete"
    )
    for folder in (gain, antennas, buildings):
        folder.mkdir(parents=True, exist_ok=True)
    antenna, building = _png(255), _png(0)
    for m, count in maps.items():
        (buildings / f"{m}.png").write_bytes(building)
        map_gain = _png(m % 251)
        for tx in range(count):
            (gain / f"{m}_{tx}.png").write_bytes(map_gain)
            (antennas / f"{m}_{tx}.png").write_bytes(antenna)


@pytest.fixture(scope="module")
def val_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every val map with its transmitters, plus what val must skip: map 0, a train map and one
    transmitter too many (RadioDiff reads transmitters 0..numTx-1 only)."""
    root = tmp_path_factory.mktemp("radiodiff") / "RadioMapSeer"
    split = radiodiff_split()
    maps = {m: TX for m in split["val"]}
    _write_maps(root, {**maps, split["val"][0]: TX + 1, 0: TX, split["train"][0]: TX})
    return root


def test_val_dataset_has_exactly_radiodiffs_samples_in_its_order(val_root: Path) -> None:
    val = radiodiff_split()["val"]
    ds = RadioMapSeer(val_root, split="val", image_size=SIZE, split_mode="radiodiff")
    assert ds.map_ids == val
    assert len(ds) == 51 * TX
    assert ds.samples == [(m, tx) for m in val for tx in range(TX)]
    for index in (0, 1, TX - 1, TX, len(ds) - 1):
        m, tx = val[index // TX], index % TX  # RadioDiff's idxr / idxc
        sample = ds[index]
        assert sample["img_name"] == f"{m}_{tx}.png"
        assert sample["name"] == f"{m}_{tx}"
        assert torch.allclose(sample["image"], torch.full((1, SIZE, SIZE), (m % 251) / 127.5 - 1))
    truncated = RadioMapSeer(val_root, split="val", image_size=SIZE, split_mode="radiodiff",
                             max_samples=3)
    assert [truncated[i]["img_name"] for i in range(3)] == [f"{val[0]}_0.png", f"{val[0]}_1.png",
                                                            f"{val[1]}_0.png"]


def test_maps_missing_from_the_split_name_the_count(val_root: Path) -> None:
    with pytest.raises(DataError) as info:
        RadioMapSeer(val_root, split="test", split_mode="radiodiff")
    message = str(info.value)
    assert "49 of the 100 maps of RadioDiff's 'test' split are missing" in message
    assert "full RadioMapSeer release" in message and "data.split: radiodiff" in message
    with pytest.raises(DataError, match="500 of the 501 maps of RadioDiff's 'train' split"):
        RadioMapSeer(val_root, split="train", split_mode="radiodiff")


def test_missing_transmitter_is_named(val_root: Path, tmp_path: Path) -> None:
    val = radiodiff_split()["val"]
    victim = val_root / "gain" / "DPM" / f"{val[7]}_{TX - 1}.png"
    aside = victim.rename(tmp_path / victim.name)  # put back below: the folder is shared
    try:
        with pytest.raises(DataError, match=f"1 of the {51 * TX} samples") as info:
            RadioMapSeer(val_root, split="val", split_mode="radiodiff")
    finally:
        aside.rename(victim)
    assert f"{victim} is missing" in str(info.value)


def test_synthetic_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    generate(root, num_maps=4, tx_per_map=1, seed=0, size=16)
    with pytest.raises(DataError, match="full RadioMapSeer release") as info:
        RadioMapSeer(root, split="val", split_mode="radiodiff")
    assert "data.split: maps" in str(info.value)
    maps_mode = RadioMapSeer(root, split="val", image_size=16)
    m, tx = maps_mode.samples[0]
    assert maps_mode[0]["img_name"] == f"{m}_{tx}.png"


def test_bad_split_mode_and_phase(val_root: Path) -> None:
    with pytest.raises(DataError, match="split_mode must be one of maps, radiodiff"):
        RadioMapSeer(val_root, split_mode="RadioDiff")
    with pytest.raises(DataError, match="'train', 'val' or 'test'"):
        RadioMapSeer(val_root, split="validation", split_mode="radiodiff")
    with pytest.raises(DataError, match="'train' or 'val'"):
        RadioMapSeer(val_root, split="test")


def test_img_name_survives_collation_and_the_batch_guard(val_root: Path) -> None:
    ds = RadioMapSeer(val_root, split="val", image_size=SIZE, split_mode="radiodiff")
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    val = radiodiff_split()["val"]
    assert batch["img_name"] == [f"{val[0]}_0.png", f"{val[0]}_1.png", f"{val[1]}_0.png"]
    batch["image"][1, 0, 0, 0] = float("nan")
    clean, ok = finite_batch(batch)
    assert ok is not None and ok.tolist() == [True, False, True]
    assert clean["img_name"] == batch["img_name"] and clean["name"] == batch["name"]


def test_build_datasets_passes_data_split(val_root: Path, tmp_path: Path) -> None:
    common = [f"data.root={val_root}", f"model.first_stage.ckpt_path={tmp_path / 'fs.safetensors'}"]
    cfg = build_config({}, [*common, "data.split=radiodiff"])
    with pytest.raises(DataError, match="RadioDiff's 'train' split"):
        build_datasets(cfg, val_root)
    cfg = build_config({}, [*common, "data.split=maps", "data.image_size=8"])
    train, val = build_datasets(cfg, val_root)
    assert isinstance(train, RadioMapSeer) and train.split_mode == "maps"
    assert len(train) + len(val) == 53 * TX + 1  # the maps split takes every sample in the folder
