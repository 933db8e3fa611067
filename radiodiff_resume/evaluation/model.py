"""The model an evaluation samples with. One entry point, :func:`evaluation_model`, whatever the weights
come from, so that another source (a RadioDiff ``model-N.pt``) plugs in here and nowhere else.

A checkpoint is restored through the trainer ``train`` uses, built read-only as ``dry-run`` builds it:
the same verification levels, the same restore of every rank, the same repair of running statistics, and
the EMA weights with the statistics recomputed for them exactly as validation and the final export get
them. Nothing is written to the run's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.data import Dataset

    from radiodiff_resume.config import Config
    from radiodiff_resume.models.ldm import ConditionalLDM
    from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer

LATEST = "latest"


@dataclass
class EvalModel:
    """An LDM ready to sample (eval mode, on this process's device) and what identifies its weights."""

    ldm: ConditionalLDM
    name: str
    """Short label for the default output folder: the checkpoint's folder name."""
    identity: dict[str, tp.Any]
    """What the samples depend on, compared when an evaluation resumes (the main process's view)."""
    ema: bool
    where: Path


@contextlib.contextmanager
def evaluation_model(cfg: Config, accelerator: Accelerator, train_set: Dataset, val_set: Dataset, *,
                     checkpoint: str | None, weights: str | None, ema: bool | None) -> tp.Iterator[EvalModel]:
    """The model of ``--checkpoint`` (a folder, or ``latest``: the newest that verifies) or of
    ``--weights`` (a RadioDiff LDM file), with its EMA weights in unless ``ema`` is False (None: EMA when
    the run keeps one). Every process must enter it together."""
    if weights is not None:
        with _from_weights(cfg, accelerator, Path(weights).expanduser(), ema) as model:
            yield model
        return
    with _from_checkpoint(cfg, accelerator, train_set, val_set, checkpoint or LATEST, ema) as model:
        yield model


def check_weights_file(weights: str) -> None:
    """``--weights`` names a regular file, through links (the user's own file: a ``latest.pt`` link is
    common), never a FIFO or a device; checked before any data is loaded."""
    from radiodiff_resume.io import NotRegularFile, open_regular

    path = Path(weights).expanduser()
    try:
        os.close(open_regular(path.resolve(), advice="pass RadioDiff's model-N.pt"))
    except NotRegularFile as exc:
        raise UserError(f"--weights {weights}: {exc}") from None
    except OSError as exc:
        raise UserError(f"--weights {weights} cannot be read ({exc.strerror or exc}): pass RadioDiff's "
                        "model-N.pt, or --checkpoint DIR for a checkpoint of this project") from None


@contextlib.contextmanager
def _from_weights(cfg: Config, accelerator: Accelerator, path: Path,
                  ema: bool | None) -> tp.Iterator[EvalModel]:
    """A RadioDiff LDM file loaded as upstream's ``sample_cond_ldm.py`` loads it (read with
    ``weights_only=True``, mapped; strictly into this config's network; non-finite weights refused)."""
    import torch
    from accelerate.utils import broadcast_object_list

    from radiodiff_resume.build import build_first_stage, build_ldm
    from radiodiff_resume.compat.radiodiff_ldm import sampling_state, sha256_of
    from radiodiff_resume.compat.torch_files import load_pickled

    try:
        ckpt = load_pickled(path, mmap=True)
        state, use_ema = sampling_state(path, ckpt, cfg, ema)
    except UserError as exc:
        raise UserError(f"evaluate --weights: {str(exc).removeprefix('import: ')}") from None
    which = "EMA" if use_ema else "online"
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"evaluate --weights: {path}: tensor {bad} of the {which} weights holds NaN/Inf; "
                        "evaluate an earlier model-N.pt, or the other weights (--ema/--online)")
    ldm = build_ldm(cfg, build_first_stage(cfg))
    ldm.load_state_dict(state, strict=True)
    ldm.to(accelerator.device).eval()
    step = ckpt.get("step")
    identity = [{"source": "weights", "name": path.name, "step": step if isinstance(step, int) else None,
                 "content": sha256_of(path)[:16] if accelerator.is_main_process else None}]
    del ckpt, state
    broadcast_object_list(identity)
    yield EvalModel(ldm, path.stem, identity[0], use_ema, path)


@contextlib.contextmanager
def _from_checkpoint(cfg: Config, accelerator: Accelerator, train_set: Dataset, val_set: Dataset,
                     checkpoint: str, ema: bool | None) -> tp.Iterator[EvalModel]:
    from radiodiff_resume.build import build_first_stage
    from radiodiff_resume.data.stream import BatchStream
    from radiodiff_resume.run import ldm_trainer

    named = None if checkpoint == LATEST else Path(checkpoint).expanduser()
    if named is not None and not (named / "manifest.json").is_file():
        raise UserError(f"--checkpoint {checkpoint}: not a checkpoint folder (no manifest.json); pass a "
                        f"{cfg.results_folder / 'checkpoints'}/step-… folder, or {LATEST}")
    # The first stage's weights come with the checkpoint (the LDM's state holds them).
    trainer = ldm_trainer(cfg, accelerator, build_first_stage(cfg), train_set, val_set, read_only=True)
    # Statistics recomputed for the EMA weights (and repaired ones) come from the batches one process takes,
    # on every rank alike, so the samples do not depend on how many processes evaluate.
    d = cfg.data
    trainer.train_stream = BatchStream(train_set, tp.cast(int, d.batch_size or d.batch_size_per_process),
                                       seed=cfg.trainer.seed)
    path = trainer.restore("auto" if named is None else str(named))
    if path is None:
        raise UserError(f"no checkpoint in {trainer.checkpointer.store.folder}: train first, or pass "
                        "--checkpoint DIR")
    if named is not None and path.resolve() != named.resolve():
        raise UserError(f"--checkpoint {checkpoint}: a run resumed from it and went on, so the trainer "
                        f"restores {path} instead; pass that one, or copy {named} elsewhere to evaluate it")
    use_ema = trainer.ema is not None if ema is None else ema
    if use_ema and trainer.ema is None:
        raise UserError("--ema: this config keeps no EMA (trainer.use_ema: false); pass --online, or "
                        "trainer.use_ema=true to read the checkpoint's EMA weights")
    identity = trainer.ranks.broadcast(_identity(trainer, path) if trainer.ranks.is_main else None)
    with trainer.ema_weights() if use_ema else contextlib.nullcontext():
        trainer.model.eval()
        yield EvalModel(trainer.ldm, path.name, identity, use_ema, path)


def _identity(trainer: LatentDiffusionTrainer, path: Path) -> dict[str, tp.Any]:
    """The checkpoint's step and a digest of its files' hashes (its content, wherever it lies)."""
    report = tp.cast(tp.Any, trainer.checkpointer.verified)
    files = report.checkpoint.manifest.files
    text = "".join(f"{name} {files[name].digest}\n" for name in sorted(files))
    return {"source": "checkpoint", "name": path.name, "step": trainer.state.step,
            "content": hashlib.sha256(text.encode()).hexdigest()[:16]}
