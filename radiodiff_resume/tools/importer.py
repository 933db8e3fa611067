"""``radiodiff-resume import SRC --cfg CFG [--out OUT]``: another trainer's state → what our run uses: one
of our verified checkpoints, so that ``radiodiff-resume train`` continues it, or our first stage's weights.

What SRC is decides how it is read and what ``--out`` names (:data:`SOURCE_KINDS`): an accelerate
``save_state`` folder, converted here into a checkpoint of the run (``--out``: its results folder), or a
RadioDiff ``model-N.pt``: a whole LDM run when CFG builds RadioDiff's network
(:mod:`radiodiff_resume.compat.radiodiff_ldm`; ``--out``: the results folder), else its first stage, which
becomes our first stage's weights (:mod:`radiodiff_resume.compat.radiodiff_ckpt`; ``--out``: that
``.safetensors`` file).
This module is the command; the work is in :mod:`radiodiff_resume.compat`: a source is first read into
plain tensors and numbers — safetensors as they are, every ``.bin`` / ``.pt`` / ``.pkl`` through torch's
weights-only unpickler (:mod:`~radiodiff_resume.compat.torch_files`), so a file that would run code is
refused before any of it runs — then written as one verified checkpoint
(:mod:`~radiodiff_resume.compat.ldm_import`). Torch is imported only when a command runs, so the CLI
stays cheap to start.
"""

from __future__ import annotations

import argparse
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from radiodiff_resume.compat.accelerate_folder import is_accelerate_folder, read_accelerate_folder
from radiodiff_resume.compat.ldm_import import import_into_ldm, load_run_config, resume_command
from radiodiff_resume.compat.torch_files import is_torch_file, load_pickled
from radiodiff_resume.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``import`` to the ``radiodiff-resume`` sub-commands."""
    cmd = sub.add_parser(
        "import", help="convert another trainer's saved state: an accelerate save_state folder or a "
                       "RadioDiff LDM model-N.pt into a verified checkpoint that `train` resumes from, a "
                       "RadioDiff first stage into our first stage's weights",
        usage="radiodiff-resume import SRC --cfg CFG [--out DIR [--step-from-name] | --out FILE.safetensors "
              "[--force]] [key=value ...]",
        description="Convert SRC for the run CFG describes, with a report of where every tensor came from. "
                    "An accelerate save_state folder becomes one verified checkpoint, exact in weights, "
                    "optimizer state, step and EMA (not in random streams or data position). A RadioDiff "
                    "LDM model-N.pt (train_cond_ldm.py), with a config that builds RadioDiff's network, "
                    "becomes one too, exact in weights, Adam moments, step and EMA; its first stage is "
                    "written to model.first_stage.ckpt_path when that file is not there yet, and what our "
                    "checkpoint does not hold is kept beside it for `radiodiff-resume export`. Otherwise a "
                    "RadioDiff checkpoint (train_vae.py or train_cond_ldm.py) gives its first stage, as the "
                    "weights file model.first_stage.ckpt_path names.",
    )
    cmd.add_argument("src", metavar="SRC",
                     help="what to import: a folder written by accelerate's Accelerator.save_state "
                          "(model.safetensors or pytorch_model.bin, optimizer.bin, scheduler.bin, "
                          "random_states_*.pkl; EMA folders such as unet_ema/), or a RadioDiff checkpoint "
                          "file (.pt, .pth or .ckpt)")
    cmd.add_argument("--cfg", required=True,
                     help="YAML config of the run that will use it (as for `train`), e.g. "
                          "configs/radio_tiny.yaml; for a save_state folder its first-stage weights must "
                          "exist")
    cmd.add_argument("--out", metavar="OUT",
                     help="for a save_state folder or a RadioDiff LDM run: the results folder to write "
                          "<OUT>/checkpoints/step-N into (default: the config's trainer.results_folder), "
                          "which must hold no checkpoint yet; for a RadioDiff first stage (or any RadioDiff "
                          "file, when OUT ends in .safetensors): the file to write the first stage to "
                          "(default: the config's model.first_stage.ckpt_path)")
    cmd.add_argument("--force", action="store_true",
                     help="RadioDiff first-stage import only: replace an existing first-stage file at OUT")
    cmd.add_argument("--step-from-name", action="store_true",
                     help="RadioDiff {'model'}-only file (saved with enable_resume: False, which records no "
                          "step): continue at step = the milestone in its name (model-<milestone>.pt) x "
                          "trainer.save_and_sample_every, with empty Adam moments and the EMA restarting "
                          "from the weights; without it the weights start a fine-tune at step 0, as "
                          "RadioDiff's finetune.ckpt_path does")
    overrides = cmd.add_argument("overrides", nargs="+", default=[], metavar="key=value",
                                 help="config overrides, as for `train`, e.g. trainer.lr=1e-4")
    # '+' and not required: with '*', argparse would consume the (empty) overrides together with SRC
    # and then reject overrides written after --cfg, as in `import SRC --cfg CFG key=value`.
    overrides.required = False
    cmd.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> None:
    src = Path(args.src).expanduser()
    kind = source_kind(src)
    print("\n".join(kind.command(src, args)), flush=True)


@dataclass(frozen=True)
class SourceKind:
    """One kind of thing ``import`` reads: how to recognise it and how to convert it."""

    what: str
    detects: tp.Callable[[Path], bool]
    command: tp.Callable[[Path, argparse.Namespace], list[str]]
    """Converts SRC as the parsed command asks (``--out`` means what this kind writes); returns the
    report's lines, the command to run next last."""
    looks_like: str
    """What such a source holds, for the message when SRC is none of the kinds."""


def source_kind(src: Path) -> SourceKind:
    if not src.exists():
        raise UserError(f"import: {src} does not exist (SRC is what to import: "
                        f"{' or '.join(k.what for k in SOURCE_KINDS)})")
    for kind in SOURCE_KINDS:
        if kind.detects(src):
            return kind
    raise UserError(f"import: {src} is not {' or '.join(k.what for k in SOURCE_KINDS)} "
                    f"({'; '.join(k.looks_like for k in SOURCE_KINDS)})")


def import_accelerate(src: Path, args: argparse.Namespace) -> list[str]:
    """``--out`` is the results folder of the run that continues the source."""
    if args.force or args.step_from_name:
        raise UserError(f"import: {'--force' if args.force else '--step-from-name'} is for RadioDiff "
                        "checkpoints; an accelerate import never writes over a run (pass --out with a new "
                        "results folder) and takes its step from optimizer.bin")
    cfg = load_run_config(args)
    report = import_into_ldm(read_accelerate_folder(src), cfg)
    return [*report, f"resume with: {resume_command(args, cfg)}"]


def import_radiodiff(src: Path, args: argparse.Namespace) -> list[str]:
    """A RadioDiff ``model-N.pt``: a whole LDM run when it is one and CFG builds RadioDiff's network
    (``--out``: the results folder), else its first stage (``--out``: the weights file). The readers live
    in the RadioDiff compatibility package; the file is read once, mapped rather than copied."""
    from radiodiff_resume.compat import radiodiff_ckpt, radiodiff_ldm

    ckpt = load_pickled(src, mmap=True)
    if (args.out is None or not args.out.endswith(".safetensors")) and radiodiff_ldm.is_ldm_run(ckpt):
        cfg = load_run_config(args)
        if radiodiff_ldm.builds_radiodiff_unet(cfg):
            return radiodiff_ldm.import_run(src, ckpt, cfg, args)
    if args.step_from_name:
        raise UserError("import: --step-from-name is for a RadioDiff LDM file imported as a run (a config "
                        "whose model.unet.target is RadioDiff's network)")
    return radiodiff_ckpt.import_radiodiff(src, args, ckpt)


SOURCE_KINDS: tuple[SourceKind, ...] = (
    SourceKind("an accelerate save_state folder", is_accelerate_folder, import_accelerate,
               "an accelerate save_state folder holds optimizer.bin, random_states_0.pkl and "
               "model.safetensors"),
    SourceKind("a RadioDiff checkpoint file (.pt, .pth or .ckpt)", is_torch_file, import_radiodiff,
               "RadioDiff's train_vae.py and train_cond_ldm.py write model-N.pt"),
)
"""Checked in order; the first whose ``detects`` accepts SRC converts it."""
