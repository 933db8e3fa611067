"""Shared fixtures: a tiny synthetic dataset and a tiny config that trains in seconds on CPU."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest

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
