"""The ``train`` job: first stage (when its weights are missing and the config says so),
then the conditional LDM. One Accelerator per process serves both stages.
"""

from __future__ import annotations

import logging
import os
import typing as tp
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from torch.utils.data import Dataset

from radiodiff_resume.build import (
    build_datasets,
    build_first_stage,
    build_ldm,
    dataset_root,
    load_first_stage_weights,
)
from radiodiff_resume.config import (
    Config,
    config_hash,
    measures_scale_factor,
    resolved_mixed_precision,
    to_yaml,
)
from radiodiff_resume.errors import ConfigError, StopRequested, UserError
from radiodiff_resume.io import write_text_atomic
from radiodiff_resume.lock import LockHeld, RunLock
from radiodiff_resume.models.autoencoder import AutoencoderWithLoss
from radiodiff_resume.trainer import AutoencoderTrainer, LatentDiffusionTrainer
from radiodiff_resume.trainer.trackers import init_kwargs as tracker_init_kwargs

logger = logging.getLogger(__name__)


def make_accelerator(cfg: Config) -> Accelerator:
    """One Accelerator per process; without a GPU, processes started by torchrun use gloo."""
    if cfg.trainer.deterministic:
        use_deterministic_kernels()
    if "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ and not torch.cuda.is_available():
        logger.warning(
            "accelerate launch --num_processes N starts ONE process on a machine without a GPU; "
            "add --multi_gpu to start N CPU processes (gloo), e.g. "
            "accelerate launch --multi_gpu --num_processes 2 train_cond_ldm.py --cfg ..."
        )
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolved_mixed_precision(cfg.trainer),
        log_with=list(cfg.trainer.log_with) or None,
        project_dir=str(cfg.results_folder),
    )
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        logger.warning(
            "trainer.mixed_precision=fp16 on %s: accelerate runs fp32 here (no autocast, no GradScaler); "
            "use trainer.mixed_precision=bf16 for mixed precision on a CPU", accelerator.device.type,
        )
    return accelerator


def use_deterministic_kernels() -> None:
    """What a bit-exact GPU run needs (cuBLAS reads its variable when its first handle is made)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def train(cfg: Config, accelerator: Accelerator | None = None) -> LatentDiffusionTrainer:
    """Run the whole job, holding the results folder's lock; returns the finished LDM trainer."""
    accelerator = accelerator or make_accelerator(cfg)
    lock = RunLock(cfg.results_folder)
    refusal = None
    if accelerator.is_main_process:
        try:
            note = lock.acquire()
        except LockHeld as exc:
            refusal = str(exc)
        else:
            if note:
                logger.warning("run: %s", note)
    if accelerator.num_processes > 1:
        box = [refusal]
        broadcast_object_list(box, from_process=0)
        refusal = box[0]
    if refusal is not None:
        raise UserError(refusal)
    try:
        trainer = build_ldm_trainer(cfg, accelerator)
        trainer.fit()
    except StopRequested:
        lock.release()
        accelerator.wait_for_everyone()  # every rank stopped at the same step, after the same save
        accelerator.end_training()
        raise
    finally:
        lock.release()
    # Tear the process group down together: a gloo rank that destroys its group while a peer is
    # still working (rank 0 draws the curves last) was seen to abort at exit under load.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return trainer


def build_ldm_trainer(cfg: Config, accelerator: Accelerator) -> LatentDiffusionTrainer:
    """Data, first stage (trained first if missing and allowed), LDM and its trainer."""
    set_seed(cfg.trainer.seed)  # same on every rank: identical model init everywhere
    results = cfg.results_folder
    if accelerator.is_main_process:
        write_text_atomic(results / "config.yaml", to_yaml(cfg))
    logger.info(
        "run: %s (config %s), %d process(es), device %s, mixed precision %s",
        results, config_hash(cfg), accelerator.num_processes, accelerator.device,
        accelerator.mixed_precision,
    )
    if cfg.trainer.log_with:
        accelerator.init_trackers("radiodiff_resume", config={"config_hash": config_hash(cfg)},
                                  init_kwargs=tracker_init_kwargs(accelerator, cfg.trainer.log_with))
    train_set, val_set = load_data(cfg, accelerator)
    first_stage = ready_first_stage(cfg, accelerator, train_set, val_set)
    return ldm_trainer(cfg, accelerator, first_stage, train_set, val_set)


def ldm_trainer(cfg: Config, accelerator: Accelerator, first_stage: nn.Module, train_set: Dataset,
                val_set: Dataset, read_only: bool = False) -> LatentDiffusionTrainer:
    """The LDM trainer over a loaded first stage (``read_only``: the dry-run's, which writes nothing)."""
    set_seed(cfg.trainer.seed)  # LDM init independent of whether stage 1 just ran
    return LatentDiffusionTrainer(
        cfg.trainer, build_ldm(cfg, first_stage), train_set, val_set,
        accelerator=accelerator, results_folder=cfg.results_folder, seed=cfg.trainer.seed,
        batch_size=per_process_batch(cfg, accelerator), num_workers=cfg.data.num_workers,
        checkpoint=cfg.checkpoint, config=cfg, read_only=read_only,
        measure_scale=measures_scale_factor(cfg.model), configured_scale_factor=cfg.model.scale_factor,
    )


def per_process_batch(cfg: Config, accelerator: Accelerator, first_stage: bool = False) -> int:
    """What each process loads per micro-step: the global ``data.batch_size`` (or
    ``model.first_stage.batch_size``) split across the processes, as RadioDiff's
    ``split_batches=True`` does, unless ``data.batch_size_per_process`` is set."""
    d, world = cfg.data, accelerator.num_processes
    key, batch = "data.batch_size", d.batch_size
    if first_stage and cfg.model.first_stage.batch_size is not None:
        key, batch = "model.first_stage.batch_size", cfg.model.first_stage.batch_size
    elif batch is None:
        return tp.cast(int, d.batch_size_per_process)
    if batch % world:
        raise ConfigError(
            f"{key}: {batch} is the global batch (as in RadioDiff) and does not split evenly across "
            f"{world} processes; set a multiple of {world}, or data.batch_size=null with "
            "data.batch_size_per_process=N")
    return batch // world


def load_data(cfg: Config, accelerator: Accelerator) -> tuple[Dataset, Dataset]:
    root = None
    if cfg.data.train is None:
        with accelerator.main_process_first():
            root = dataset_root(cfg)
        logger.info("data: %s", root)
    train_set, val_set = build_datasets(cfg, root)
    logger.info("data: %d training / %d validation samples", len(train_set), len(val_set))  # type: ignore[arg-type]
    return train_set, val_set


def ready_first_stage(
    cfg: Config, accelerator: Accelerator, train_set: Dataset, val_set: Dataset
) -> nn.Module:
    """The trained first stage, loaded strictly from ``model.first_stage.ckpt_path``.

    When the file is missing and ``train_if_missing`` is set, it is trained here first;
    otherwise a missing file is an error (never a silently random first stage).
    """
    fs = cfg.model.first_stage
    ckpt = Path(tp.cast(str, fs.ckpt_path))
    if not ckpt.exists():
        if not fs.train_if_missing:
            raise UserError(
                f"first-stage weights {ckpt} not found (model.first_stage.ckpt_path); point it at a trained "
                "autoencoder, write it from RadioDiff's first stage with `radiodiff-resume import "
                "model-N.pt --cfg CFG`, or set model.first_stage.train_if_missing=true to train one first"
            )
        logger.info(
            "first stage: %s is missing and model.first_stage.train_if_missing=true: "
            "training the first stage now", ckpt,
        )
        first_stage_trainer(cfg, accelerator, train_set, val_set).fit()
        accelerator.free_memory()
    logger.info("first stage: loading %s", ckpt)
    first_stage = build_first_stage(cfg)
    load_first_stage_weights(first_stage, ckpt)
    return first_stage


def first_stage_trainer(cfg: Config, accelerator: Accelerator, train_set: Dataset, val_set: Dataset,
                        read_only: bool = False) -> AutoencoderTrainer:
    """The trainer of the first stage, which exports its weights to ``model.first_stage.ckpt_path``."""
    fs = cfg.model.first_stage
    model = AutoencoderWithLoss(build_first_stage(cfg), fs.loss, cfg.data.image_size)
    return AutoencoderTrainer(
        fs.trainer, model, train_set, val_set,
        accelerator=accelerator, results_folder=cfg.first_stage_folder(),
        seed=cfg.trainer.seed, batch_size=per_process_batch(cfg, accelerator, first_stage=True),
        num_workers=cfg.data.num_workers, export_path=Path(tp.cast(str, fs.ckpt_path)),
        checkpoint=cfg.checkpoint, config=cfg, read_only=read_only,
    )
