"""The data RadioDiff trains on beyond the paper's DPM split: ``data.split: radiodiff_600``, the cars
input (``data.cars``) and the IRT2 simulation, checked against RadioDiff's ``lib/loaders.py``.

Facts of RadioDiff's loaders these tests hold the dataset to:

- ``RadioUNet_c`` at RadioDiff's head and ``RadioUNet_c_WithCar_NOK_or_K`` (``DPMCAR``) take phase
  positions ``train`` 0..600, ``val`` 600..650, ``test`` 600..699 of the seed-42 shuffle, inclusive; the
  paper release's ``RadioUNet_c`` trains on 0..500 (``tests/data/test_radiodiff_split.py``).
- ``DPMCAR`` (``carsSimul`` and ``carsInput`` "yes", ``have_K2`` "no") reads the target from
  ``gain/carsDPM`` and stacks the uint8 (buildings, transmitter, cars) maps, cars from ``png/cars/{map}.png``,
  before ``ToTensor`` (uint8: / 255) and ``Normalize(0.5, 0.5)``; the target is ``gain / 255`` and the
  same ``Normalize``.
- ``simulation="IRT2"`` changes only the folder the target is read from (``gain/IRT2``).
"""

from __future__ import annotations

import io
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff_resume.build import build_datasets
from radiodiff_resume.config import build_config
from radiodiff_resume.data.radiomapseer import RadioMapSeer, radiodiff_split
from radiodiff_resume.data.synthetic import ensure_synthetic, generate
from radiodiff_resume.errors import ConfigError, DataError
from tests.data.radiodiff_facts import TX

pytestmark = pytest.mark.usefixtures("few_transmitters")

SIZE = 8


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(array))


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# -- data.split: radiodiff_600 ---------------------------------------------------------------------


def test_radiodiff_600_is_the_head_loaders_phases(radiodiff_order: list[int]) -> None:
    ids = [i + 1 for i in radiodiff_order]  # dataset_map_ind = maps_inds[idxr + ind1] + 1
    split = radiodiff_split("radiodiff_600")
    assert split["train"] == ids[0:601]
    assert split["val"] == ids[600:651]
    assert split["test"] == ids[600:700]
    paper = radiodiff_split("radiodiff")
    assert paper["train"] == ids[0:501] and radiodiff_split() == paper


def test_radiodiff_600_beside_the_paper_split() -> None:
    new, paper = radiodiff_split("radiodiff_600"), radiodiff_split("radiodiff")
    train, val, test = new["train"], new["val"], new["test"]
    assert (len(train), len(val), len(test)) == (601, 51, 100)
    assert (val, test) == (paper["val"], paper["test"])
    assert train[:501] == paper["train"]  # the paper's training maps, then 100 more
    # The overlap: position 600, the first val and test map, is trained on; nothing else is.
    assert set(train) & set(val) == {val[0]} and set(train) & set(test) == {test[0]}
    assert train[-1] == val[0] == test[0]
    assert set(train) | set(test) == set(range(1, 701))  # every position is used; map 0 never
    with pytest.raises(DataError, match="must be one of radiodiff, radiodiff_600"):
        radiodiff_split("radiodiff600")


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Maps 1..700 with TX transmitters, gain pixels ``map % 251`` to tell maps apart."""
    root = tmp_path_factory.mktemp("release") / "RadioMapSeer"
    folders = [root / "gain" / "DPM", root / "png" / "antennas", root / "png" / "buildings_complete"]
    for folder in folders:
        folder.mkdir(parents=True)
    flat = {v: _png_bytes(np.full((SIZE, SIZE), v, np.uint8)) for v in range(256)}
    for m in range(1, 701):
        (folders[2] / f"{m}.png").write_bytes(flat[0])
        for tx in range(TX):
            (folders[0] / f"{m}_{tx}.png").write_bytes(flat[m % 251])
            (folders[1] / f"{m}_{tx}.png").write_bytes(flat[255])
    return root


def test_radiodiff_600_reads_the_head_loaders_samples_in_its_order(release: Path,
                                                                   radiodiff_order: list[int]) -> None:
    ids = [i + 1 for i in radiodiff_order]
    train = RadioMapSeer(release, split="train", image_size=SIZE, split_mode="radiodiff_600")
    assert train.map_ids == ids[0:601]
    assert len(train) == 601 * TX  # (ind2 - ind1 + 1) * numTx
    assert train.samples == [(m, tx) for m in ids[0:601] for tx in range(TX)]
    last = train[len(train) - 1]  # idxr = 600: the first val and test map
    assert last["img_name"] == f"{ids[600]}_{TX - 1}.png"
    assert torch.allclose(last["image"], torch.full((1, SIZE, SIZE), (ids[600] % 251) / 127.5 - 1))
    paper = RadioMapSeer(release, split="train", image_size=SIZE, split_mode="radiodiff")
    assert len(paper) == 501 * TX and train.samples[: len(paper)] == paper.samples
    for phase in ("val", "test"):
        new = RadioMapSeer(release, split=phase, image_size=SIZE, split_mode="radiodiff_600")
        old = RadioMapSeer(release, split=phase, image_size=SIZE, split_mode="radiodiff")
        assert new.samples == old.samples and new.samples[0] == train.samples[-TX]


# -- cars and IRT2 on a folder of RadioDiff's val maps -----------------------------------------------


def _maps(m: int) -> dict[str, np.ndarray]:
    """Per-pixel different maps, so a swapped channel or a wrong scale shows."""
    rng = np.random.default_rng(m)
    maps = {
        name: rng.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8)
        for name in ("buildings", "cars", "DPM", "carsDPM", "IRT2")
    }
    maps["cars"][0, 0] = 255
    return maps


IRT2_MAPS = 10
"""``gain/IRT2`` holds only the first IRT2_MAPS val maps: a simulation a copy has for some maps only."""


@pytest.fixture(scope="module")
def val_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cars") / "RadioMapSeer"
    val = radiodiff_split()["val"]
    for i, m in enumerate(val):
        maps = _maps(m)
        _write(root / "png" / "buildings_complete" / f"{m}.png", maps["buildings"])
        _write(root / "png" / "cars" / f"{m}.png", maps["cars"])
        for tx in range(TX):
            _write(root / "png" / "antennas" / f"{m}_{tx}.png", np.roll(maps["buildings"], tx + 1))
            for simulation in ("DPM", "carsDPM") + ("IRT2",) * (i < IRT2_MAPS):
                _write(root / "gain" / simulation / f"{m}_{tx}.png", np.roll(maps[simulation], tx))
    return root


def _dpmcar(root: Path, m: int, tx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RadioDiff's DPMCAR sample ``(cond, image)``, its steps redone in numpy."""
    buildings = _read(root / "png" / "buildings_complete" / f"{m}.png")
    antenna = _read(root / "png" / "antennas" / f"{m}_{tx}.png")
    cars = _read(root / "png" / "cars" / f"{m}.png")
    inputs = np.stack([buildings, antenna, cars], axis=2)  # uint8, so ToTensor divides by 255
    cond = torch.from_numpy(inputs.transpose(2, 0, 1).copy()).float() / 255
    gain = np.expand_dims(_read(root / "gain" / "carsDPM" / f"{m}_{tx}.png"), axis=2) / 255
    image = torch.from_numpy(gain.transpose(2, 0, 1).copy()).float()  # float: ToTensor keeps it
    return (cond - 0.5) / 0.5, (image - 0.5) / 0.5


def test_cars_sample_is_radiodiffs_dpmcar(val_root: Path) -> None:
    val = radiodiff_split()["val"]
    ds = RadioMapSeer(val_root, split="val", image_size=SIZE, split_mode="radiodiff", cars=True)
    assert ds.gain_dir == val_root / "gain" / "carsDPM" and len(ds) == 51 * TX
    for index in (0, 1, TX, len(ds) - 1):
        m, tx = val[index // TX], index % TX
        sample = ds[index]
        cond, image = _dpmcar(val_root, m, tx)
        assert sample["img_name"] == f"{m}_{tx}.png"
        assert sample["cond"].shape == (3, SIZE, SIZE) and sample["image"].shape == (1, SIZE, SIZE)
        assert sample["cond"].dtype == sample["image"].dtype == torch.float32
        assert torch.allclose(sample["cond"], cond, atol=1e-6)
        assert torch.allclose(sample["image"], image, atol=1e-6)
        # DPMCAR scales the cars by 255 like the rest (RadioUNet_c's own cars branch uses 256).
        assert sample["cond"][2, 0, 0] == 1.0


def test_without_cars_the_condition_repeats_the_buildings(val_root: Path) -> None:
    m = radiodiff_split()["val"][0]
    sample = RadioMapSeer(val_root, split="val", image_size=SIZE, split_mode="radiodiff")[0]
    with_cars = RadioMapSeer(val_root, split="val", image_size=SIZE, split_mode="radiodiff", cars=True)[0]
    assert torch.equal(sample["cond"][2], sample["cond"][0])
    assert torch.equal(sample["cond"][:2], with_cars["cond"][:2])
    assert not torch.equal(sample["cond"][2], with_cars["cond"][2])
    dpm = torch.from_numpy(_read(val_root / "gain" / "DPM" / f"{m}_0.png").astype(np.float32)) / 127.5 - 1
    assert torch.allclose(sample["image"][0], dpm) and not torch.allclose(with_cars["image"][0], dpm)


def test_missing_car_map_is_named(val_root: Path, tmp_path: Path) -> None:
    m = radiodiff_split()["val"][5]
    victim = val_root / "png" / "cars" / f"{m}.png"
    aside = victim.rename(tmp_path / victim.name)  # put back below: the folder is shared
    try:
        with pytest.raises(DataError, match="png/cars folders") as info:
            RadioMapSeer(val_root, split="val", split_mode="radiodiff", cars=True)
        RadioMapSeer(val_root, split="val", split_mode="radiodiff")  # without cars it is not read
    finally:
        aside.rename(victim)
    assert f"{victim} is missing" in str(info.value)


def test_cars_refuses_what_upstream_cannot_pair(val_root: Path) -> None:
    with pytest.raises(DataError, match="set data.simulation=DPM"):
        RadioMapSeer(val_root, split="val", split_mode="radiodiff", simulation="carsDPM", cars=True)
    with pytest.raises(DataError, match="gain/carsIRT2 does not exist, which data.cars: true reads"):
        RadioMapSeer(val_root, split="val", simulation="IRT2", cars=True)


def test_irt2_for_some_maps_only(val_root: Path) -> None:
    val = radiodiff_split()["val"]
    with pytest.raises(DataError) as info:
        RadioMapSeer(val_root, split="val", split_mode="radiodiff", simulation="IRT2")
    message = str(info.value)
    assert f"{51 - IRT2_MAPS} of the 51 maps of RadioDiff's 'val' split are missing" in message
    assert f"{val_root / 'gain' / 'IRT2'}, which holds {IRT2_MAPS} maps" in message
    assert "data.split: maps" in message
    train = RadioMapSeer(val_root, split="train", image_size=SIZE, simulation="IRT2")
    held = RadioMapSeer(val_root, split="val", image_size=SIZE, simulation="IRT2")
    assert {m for m, _ in train.samples + held.samples} == set(val[:IRT2_MAPS])
    m, tx = held.samples[0]
    sample = held[0]
    irt2 = torch.from_numpy(_read(val_root / "gain" / "IRT2" / f"{m}_{tx}.png").astype(np.float32))
    assert torch.allclose(sample["image"][0], irt2 / 127.5 - 1)  # gain / 255, Normalize(0.5, 0.5)
    assert torch.equal(sample["cond"][2], sample["cond"][0])


# -- synthetic folders with cars and IRT2 -----------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, num_maps=2, tx_per_map=2, seed=3, simulations=("DPM", "IRT2"), cars=True)
    return root


def test_synthetic_extras_layout_and_physics(synthetic: Path, tmp_path: Path) -> None:
    names = {str(p.relative_to(synthetic)) for p in synthetic.rglob("*.png")}
    samples = [f"{m}_{tx}.png" for m in range(2) for tx in range(2)]
    expected = {f"png/{folder}/{m}.png" for folder in ("buildings_complete", "cars") for m in range(2)}
    expected |= {f"png/antennas/{s}" for s in samples}
    expected |= {f"gain/{sim}/{s}" for sim in ("DPM", "IRT2", "carsDPM", "carsIRT2") for s in samples}
    assert names == expected
    for m in range(2):
        buildings = _read(synthetic / f"png/buildings_complete/{m}.png") == 255
        cars = _read(synthetic / f"png/cars/{m}.png") == 255
        assert set(np.unique(_read(synthetic / f"png/cars/{m}.png"))) == {0, 255}
        assert cars.any() and not (cars & buildings).any()  # cars stand in the streets
        for s in (f"{m}_{tx}.png" for tx in range(2)):
            dpm, irt2, cars_dpm, cars_irt2 = (
                _read(synthetic / "gain" / sim / s).astype(int)
                for sim in ("DPM", "IRT2", "carsDPM", "carsIRT2")
            )
            for gain in (irt2, cars_dpm, cars_irt2):
                assert (gain[buildings] == 0).all() and (gain <= dpm).all() and (gain < dpm).any()
            assert (cars_irt2 <= irt2).all() and (cars_irt2 < irt2).any()
    plain = tmp_path / "plain"
    generate(plain, num_maps=2, tx_per_map=2, seed=3)
    for path in plain.rglob("*.png"):  # asking for extras leaves the default files as they were
        assert path.read_bytes() == (synthetic / path.relative_to(plain)).read_bytes()


def test_synthetic_extras_read_as_radiodiff_shapes(synthetic: Path) -> None:
    ds = RadioMapSeer(synthetic, split="train", simulation="IRT2", cars=True)
    m, tx = ds.samples[0]
    sample = ds[0]
    assert sample["cond"].shape == (3, 256, 256) and sample["image"].shape == (1, 256, 256)
    for key in ("cond", "image"):
        assert sample[key].min() >= -1 and sample[key].max() <= 1
    cars = torch.from_numpy(_read(synthetic / f"png/cars/{m}.png").astype(np.float32)) / 127.5 - 1
    gain = torch.from_numpy(_read(synthetic / f"gain/carsIRT2/{m}_{tx}.png").astype(np.float32)) / 127.5 - 1
    assert torch.equal(sample["cond"][2], cars) and torch.allclose(sample["image"][0], gain)


def test_ensure_synthetic_names_only_folders_with_extras(tmp_path: Path) -> None:
    plain = ensure_synthetic(tmp_path, num_maps=2, tx_per_map=1, seed=0, size=16)
    extras = ensure_synthetic(tmp_path, num_maps=2, tx_per_map=1, seed=0, size=16,
                              simulations=("IRT2", "DPM"), cars=True)
    assert plain.name == "radiomapseer-synth-s0-m2-t1-16"
    assert extras.name == "radiomapseer-synth-s0-m2-t1-16-DPM+IRT2-cars"
    assert (extras / "COMPLETE").is_file() and (extras / "gain" / "carsIRT2" / "1_0.png").is_file()
    assert not (plain / "png" / "cars").exists() and not (plain / "gain" / "IRT2").exists()
    with pytest.raises(ConfigError, match="simulations must be some of DPM, IRT2"):
        generate(tmp_path / "bad", num_maps=1, tx_per_map=1, seed=0, size=16, simulations=("IRT4",))


# -- config --------------------------------------------------------------------------------------------


def _cfg(tmp_path: Path, *overrides: str) -> tp.Any:
    return build_config({}, [f"model.first_stage.ckpt_path={tmp_path / 'fs.safetensors'}", *overrides])


def test_config_keys(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "data.root=/data/RadioMapSeer", "data.split=radiodiff_600", "data.cars=true")
    assert (cfg.data.split, cfg.data.cars, cfg.data.simulation) == ("radiodiff_600", True, "DPM")
    assert _cfg(tmp_path).data.cars is False
    for overrides, message in (
        (("data.split=radiodiff_600",), "data.split: radiodiff_600 selects RadioDiff's maps"),
        (("data.root=/d", "data.cars=true", "data.simulation=carsIRT2"), "set data.simulation=IRT2"),
        (("data.simulation=IRT4",), "the synthetic stand-in simulates DPM and IRT2 only"),
    ):
        with pytest.raises(ConfigError, match=message):
            _cfg(tmp_path, *overrides)


def test_build_datasets_passes_data_cars(val_root: Path, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, f"data.root={val_root}", "data.cars=true", f"data.image_size={SIZE}")
    train, val = build_datasets(cfg, val_root)
    assert isinstance(train, RadioMapSeer) and isinstance(val, RadioMapSeer)
    assert train.cars and val.cars and train.gain_dir == val_root / "gain" / "carsDPM"
