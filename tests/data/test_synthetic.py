"""Tests for the synthetic RadioMapSeer generator and its crash/race-safe cache."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radiodiff_resume.data import synthetic
from radiodiff_resume.data.synthetic import ensure_synthetic, generate, radio_map
from radiodiff_resume.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate(root, num_maps=3, tx_per_map=2, seed=7)
    return root


def test_writes_exact_layout(dataset: Path) -> None:
    expected = {f"png/buildings_complete/{m}.png" for m in range(3)}
    expected |= {f"png/antennas/{m}_{tx}.png" for m in range(3) for tx in range(2)}
    expected |= {f"gain/DPM/{m}_{tx}.png" for m in range(3) for tx in range(2)}
    assert set(_files(dataset)) == expected
    for name in expected:
        array = _png(dataset / name)
        assert array.shape == (256, 256)
        assert array.dtype == np.uint8


def test_maps_are_consistent(dataset: Path) -> None:
    for m in range(3):
        buildings = _png(dataset / f"png/buildings_complete/{m}.png")
        assert set(np.unique(buildings)) == {0, 255}
        assert 0.1 < (buildings == 255).mean() < 0.7
        for tx in range(2):
            antenna = _png(dataset / f"png/antennas/{m}_{tx}.png")
            gain = _png(dataset / f"gain/DPM/{m}_{tx}.png")
            hot = np.argwhere(antenna == 255)
            assert len(hot) == 1 and set(np.unique(antenna)) == {0, 255}
            row, col = hot[0]
            assert buildings[row, col] == 0
            assert np.all(gain[buildings == 255] == 0)
            assert gain[row, col] == gain.max() >= 200


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, dataset: Path) -> None:
    generate(tmp_path / "again", num_maps=3, tx_per_map=2, seed=7)
    generate(tmp_path / "other", num_maps=3, tx_per_map=2, seed=8)
    assert _files(tmp_path / "again") == _files(dataset)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(dataset).keys()
    assert other["png/buildings_complete/0.png"] != _files(dataset)["png/buildings_complete/0.png"]
    assert other["gain/DPM/0_0.png"] != _files(dataset)["gain/DPM/0_0.png"]


def _line_of_sight(buildings: np.ndarray, tx: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Independent check: a ray is blocked if any of 512 points on it is inside a building."""
    t = np.linspace(0.0, 1.0, 512)[:, None, None]
    points = np.rint(tx[None, None, :] + t * (pixels[None] - tx[None, None, :])).astype(int)
    return ~buildings[points[..., 0], points[..., 1]].any(axis=0)


def test_gain_falls_with_distance_and_behind_buildings(dataset: Path) -> None:
    rng = np.random.default_rng(0)
    correlations, shadow_drop = [], []
    for m in range(3):
        buildings = _png(dataset / f"png/buildings_complete/{m}.png") == 255
        for tx in range(2):
            source = np.argwhere(_png(dataset / f"png/antennas/{m}_{tx}.png") == 255)[0]
            gain = _png(dataset / f"gain/DPM/{m}_{tx}.png").astype(float)
            free = np.argwhere(~buildings)
            pixels = free[rng.choice(len(free), size=1500, replace=False)]
            dist = np.hypot(*(pixels - source).T)
            values = gain[pixels[:, 0], pixels[:, 1]]
            los = _line_of_sight(buildings, source, pixels)
            near = (dist > 1) & los
            correlations.append(np.corrcoef(np.log(dist[near]), values[near])[0, 1])
            band = (dist > 30) & (dist < 90)
            if (band & los).sum() >= 20 and (band & ~los).sum() >= 20:
                shadow_drop.append(values[band & los].mean() - values[band & ~los].mean())
    assert max(correlations) < -0.9
    assert len(shadow_drop) >= 3
    assert min(shadow_drop) > 10


def test_wall_attenuates_same_pixel() -> None:
    open_field = np.zeros((128, 128), dtype=bool)
    walled = open_field.copy()
    walled[:, 60:80] = True
    clear, blocked = radio_map(open_field, (64, 20)), radio_map(walled, (64, 20))
    assert clear[64, 20] == 255
    assert clear[64, 30] > clear[64, 50] > clear[64, 100]
    assert np.all(clear[64, 21:] <= clear[64, 20:-1])
    assert blocked[64, 100] < clear[64, 100] - 20
    assert blocked[64, 40] == clear[64, 40]
    assert np.all(blocked[walled] == 0)


def _rng_states() -> tuple[object, ...]:
    state = np.random.get_state()
    return (state[0], state[1].tobytes(), *state[2:], random.getstate(), torch.get_rng_state())


def test_does_not_touch_global_rng(tmp_path: Path) -> None:
    np.random.seed(123)
    random.seed(123)
    torch.manual_seed(123)
    before = _rng_states()
    generate(tmp_path / "a", num_maps=2, tx_per_map=2, seed=1, size=32)
    ensure_synthetic(tmp_path / "cache", num_maps=2, tx_per_map=2, seed=1, size=32)
    after = _rng_states()
    assert before[:-1] == after[:-1]
    assert torch.equal(before[-1], after[-1])


def test_ensure_synthetic_is_idempotent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=synthetic.__name__)
    root = ensure_synthetic(tmp_path / "cache", num_maps=2, tx_per_map=3, seed=4, size=64)
    assert root == tmp_path / "cache" / "radiomapseer-synth-s4-m2-t3-64"
    assert (root / "COMPLETE").is_file()
    assert "generating synthetic RadioMapSeer data" in caplog.text
    assert str(root) in caplog.text
    fresh = tmp_path / "fresh"
    generate(fresh, num_maps=2, tx_per_map=3, seed=4, size=64)
    contents = _files(root)
    contents.pop("COMPLETE")
    assert contents == _files(fresh)

    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    caplog.clear()
    time.sleep(0.01)
    assert ensure_synthetic(tmp_path / "cache", 2, 3, 4, size=64) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert "generating" not in caplog.text
    assert os.listdir(tmp_path / "cache") == [root.name]


def test_ensure_synthetic_replaces_incomplete_folder(tmp_path: Path) -> None:
    stale = tmp_path / "radiomapseer-synth-s2-m2-t1-32"
    (stale / "gain" / "DPM").mkdir(parents=True)
    (stale / "gain" / "DPM" / "0_0.png").write_bytes(b"half written")
    (stale / "junk.txt").write_text("left by a crash")
    root = ensure_synthetic(tmp_path, num_maps=2, tx_per_map=1, seed=2, size=32)
    assert root == stale
    assert (root / "COMPLETE").is_file()
    assert not (root / "junk.txt").exists()
    assert _png(root / "gain" / "DPM" / "0_0.png").shape == (32, 32)
    assert os.listdir(tmp_path) == [root.name]


def test_ensure_synthetic_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    root = ensure_synthetic("~/cache", num_maps=2, tx_per_map=1, seed=0, size=16)
    assert root == tmp_path / "cache" / "radiomapseer-synth-s0-m2-t1-16"
    assert (root / "COMPLETE").is_file()


@pytest.mark.slow
def test_concurrent_processes_share_one_copy(tmp_path: Path) -> None:
    start_at = time.time() + 1.0
    code = (
        "import sys, time\n"
        "from radiodiff_resume.data.synthetic import ensure_synthetic\n"
        f"time.sleep(max(0.0, {start_at} - time.time()))\n"
        f"sys.stdout.write(str(ensure_synthetic({str(tmp_path)!r}, 6, 2, 3, size=96)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    root = tmp_path / "radiomapseer-synth-s3-m6-t2-96"
    assert outputs == [str(root)] * 3
    assert os.listdir(tmp_path) == [root.name]
    fresh = tmp_path / "fresh"
    generate(fresh, num_maps=6, tx_per_map=2, seed=3, size=96)
    contents = _files(root)
    assert contents.pop("COMPLETE")
    assert contents == _files(fresh)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_maps": 0}, "num_maps"),
        ({"tx_per_map": 0}, "tx_per_map"),
        ({"seed": -1}, "seed"),
        ({"size": 8}, "size"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int], field: str) -> None:
    args = {"num_maps": 1, "tx_per_map": 1, "seed": 0, "size": 32, **kwargs}
    with pytest.raises(ConfigError, match=field):
        generate(tmp_path, **args)
