"""This process's place in a multi-process launch, known before accelerate or torch is imported, and the
logging set-up that depends on it (every entry point: the CLI, a submitted job, ``train_cond_ldm.py``)."""

from __future__ import annotations

import logging
import os


def is_main_process() -> bool:
    """Rank 0 of ``accelerate launch``/torchrun (``RANK``) or of an ``srun`` step (``SLURM_PROCID``)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def setup_logging() -> None:
    """INFO on the main process, WARNING elsewhere: one copy of each line in a multi-process log."""
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
