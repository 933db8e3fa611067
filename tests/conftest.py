"""Shared fixtures: a tiny synthetic dataset, a tiny config that trains in seconds on CPU, and the one
golden run of the session that the checkpoint, tool and torture tests copy."""

from __future__ import annotations

import copy
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from radiodiff_resume.build import write_untrained_first_stage
from radiodiff_resume.config import Config, build_config
from radiodiff_resume.data.synthetic import ensure_synthetic

REPO = Path(__file__).resolve().parents[1]


def tiny_raw(results: Path, cache: Path) -> dict[str, tp.Any]:
    """A config mapping small enough for unit tests: 32px maps, 8x8 latents."""
    return {
        "model": {
            "first_stage": {
                "params": {
                    "block_out_channels": [8, 8, 8],
                    "down_block_types": ["DownEncoderBlock2D"] * 3,
                    "up_block_types": ["UpDecoderBlock2D"] * 3,
                    "layers_per_block": 1,
                    "latent_channels": 3,
                    "norm_num_groups": 4,
                },
                "ckpt_path": str(results / "ae.safetensors"),
                "trainer": {"train_num_steps": 4, "lr": 1e-3, "save_and_sample_every": 4,
                            "log_freq": 2, "val_batches": 1, "num_sample_images": 2},
            },
            "unet": {
                "params": {
                    "block_out_channels": [16, 16],
                    "down_block_types": ["DownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "UpBlock2D"],
                    "layers_per_block": 1,
                    "norm_num_groups": 4,
                }
            },
            "cond_encoder": {"params": {"hidden_channels": [8, 8], "out_channels": 2}},
            "sampling_timesteps": 3,
        },
        "data": {
            "synthetic": {"cache_dir": str(cache), "num_maps": 6, "tx_per_map": 2, "size": 64},
            "image_size": 32,
            "batch_size": 4,
            "val_fraction": 0.34,
        },
        "trainer": {
            "train_num_steps": 6,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "save_and_sample_every": 6,
            "log_freq": 2,
            "results_folder": str(results),
            "val_batches": 1,
            "num_sample_images": 2,
            "ema_decay": 0.9,
        },
    }


def pytest_terminal_summary(terminalreporter: tp.Any, config: pytest.Config) -> None:
    """Which tests the marker selection left out, said at the end even under -q: scripts/test.sh's
    default run leaves the slow tier out."""
    expression = config.option.markexpr
    if not expression:
        terminalreporter.write_line("marker selection: none (no -m): no test was left out for its markers")
        return
    fast = expression == "not slow"
    tier = ": the fast tier (-m slow runs the slow tier, -m \"\" every test)" if fast else ""
    terminalreporter.write_line(f"marker selection: -m {expression!r}{tier}")


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread() -> tp.Iterator[None]:
    """Torch in the test process uses one intra-op thread: the tiny models gain nothing from more, and on
    a loaded 2-core machine spinning OpenMP workers made in-process tests 2 to 4 times slower. A test
    that needs another count sets it itself; subprocesses choose their own (most pass OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("synth")
    ensure_synthetic(cache, num_maps=6, tx_per_map=2, seed=0, size=64)
    return cache


@pytest.fixture
def make_cfg(tmp_path: Path, synth_cache: Path) -> tp.Callable[..., Config]:
    """``make_cfg("trainer.lr=1e-2", ...)`` → a validated tiny config in ``tmp_path``."""

    def make(*overrides: str, results: Path | None = None) -> Config:
        return build_config(tiny_raw(results or tmp_path / "run", synth_cache), overrides)

    return make


def write_random_first_stage(cfg: Config, seed: int = 0) -> Path:
    """An untrained first stage saved where the config expects trained weights."""
    return write_untrained_first_stage(cfg, seed)


@dataclass(frozen=True)
class Golden:
    results: Path
    """Results folder of a finished 4-step run (checkpoints at steps 2 and 4); tests only copy it."""
    state: dict[str, tp.Any]
    """``trainer.state_dict()`` at the end of the run (what ``step-00000004`` holds)."""


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Golden:
    """The session's one golden run (``tests.checkpoint.helpers.GOLDEN``)."""
    # helpers imports tiny_raw from this module: imported here, once this module is complete
    from tests.checkpoint.helpers import train_golden

    results = tmp_path_factory.mktemp("golden") / "run"
    trainer = train_golden(results, synth_cache)
    assert (results / "config.yaml").is_file()
    return Golden(results, copy.deepcopy(trainer.state_dict()))


@pytest.fixture
def installed_stop_flag() -> tp.Iterator[None]:
    """The process-wide stop flag's handlers installed for the test, uninstalled and cleared after it."""
    from radiodiff_resume.slurm.signals import STOP

    STOP.install()
    yield
    STOP.uninstall()
    STOP.clear()
