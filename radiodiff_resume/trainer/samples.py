"""A trainer's validation pass and sample grids: this rank's share of the validation set, the metrics
with the EMA weights in, a grid of finite samples, and a sampling generator that never touches the
training noise stream.
"""

from __future__ import annotations

import logging
import typing as tp

import torch
from torch.utils.data import DataLoader, Subset

from radiodiff_resume.guard.sanitize import finite_batch
from radiodiff_resume.images import save_grid
from radiodiff_resume.slurm.signals import STOP
from radiodiff_resume.trainer.probe import finite_samples
from radiodiff_resume.trainer.state import derive_seed
from radiodiff_resume.trainer.validation import ValidationResult, evaluate

if tp.TYPE_CHECKING:
    from radiodiff_resume.trainer.base import Batch, Trainer

logger = logging.getLogger(__name__)


def val_batches(trainer: Trainer) -> list[Batch]:
    """This rank's share of the first ``val_batches`` validation batches."""
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    n = len(trainer.val_set)  # type: ignore[arg-type]
    indices = list(range(rank, n, world))[: trainer.loop.val_batches * trainer.batch_size]
    loader = DataLoader(Subset(trainer.val_set, indices), batch_size=trainer.batch_size,
                        num_workers=trainer.num_workers, worker_init_fn=STOP.worker_init_fn(),
                        generator=torch.Generator().manual_seed(0))
    return [trainer.to_device(b) for b in loader]


def validate_and_sample(trainer: Trainer) -> ValidationResult | None:
    """Validate with EMA weights (if any), log the result, write a sample grid."""
    trainer.check_state("before validation", weights=False)
    step = trainer.state.step
    with trainer.ema_weights():
        trainer.model.eval()
        result = None
        if trainer.loop.val_batches > 0:
            result = evaluate(
                trainer.val_batches(), trainer.predict,
                lambda t: trainer.accelerator.reduce(t, "sum"), trainer.accelerator.device,
            )
            logger.info("%s step %d: %s", trainer.stage, step, result.describe())
            trainer.log.write(step, result.log_values())
        if trainer.accelerator.is_main_process:
            trainer.write_samples()
        trainer.model.train()
    trainer.accelerator.wait_for_everyone()
    return result


def write_samples(trainer: Trainer) -> None:
    """The grid of the first finite validation samples, written under ``samples/``."""
    batch = finite_batch(trainer.to_device(
        torch.utils.data.default_collate(finite_samples(trainer.val_set, trainer.loop.num_sample_images))
    ))[0]
    path = trainer.results_folder / "samples" / f"step-{trainer.state.step:08d}.png"
    save_grid(path, trainer.sample_columns(batch))
    logger.info("%s step %d: samples written to %s", trainer.stage, trainer.state.step, path)


def sample_generator(seed: int, stage: str, device: torch.device) -> torch.Generator:
    """A fresh generator for samples: never touches the training noise stream."""
    return torch.Generator(device).manual_seed(derive_seed(seed, stage, "sample"))
