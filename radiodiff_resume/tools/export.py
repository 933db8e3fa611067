"""``radiodiff-resume export CHECKPOINT OUT``: a checkpoint of a run imported from RadioDiff → RadioDiff's own
``model-N.pt``, so that a user can go back (``trainer.enable_resume: True`` and ``resume_milestone``).

Upstream's ``Trainer.load`` loads ``model`` and ``ema`` strictly, so every tensor of the file must be there:
what our checkpoint holds (weights, Adam moments, EMA, step, LR) is written under upstream's names in
upstream's order, and what it does not — the first stage's LPIPS/discriminator losses, the DDPM schedule
buffers, the EMA's copy of the first stage, its buffers and frozen parameters — comes from the passengers
the import kept (:mod:`radiodiff_resume.compat.radiodiff_ldm`), checked against the sha256 it recorded.
A run that was never imported has none: RadioDiff's losses are trained weights that nothing here can
compute, so such a run is refused. Torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import typing as tp
from collections import Counter, OrderedDict
from pathlib import Path

from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    import torch

    from radiodiff_resume.checkpoint.verify import Checkpoint

Tensors = dict[str, "torch.Tensor"]
PROVENANCE = re.compile(r"^radiodiff passengers: (.+) sha256 ([0-9a-f]{64}) ")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``radiodiff-resume`` sub-commands."""
    cmd = sub.add_parser(
        "export", help="write a checkpoint of a run imported from RadioDiff back as RadioDiff's model-N.pt",
        usage="radiodiff-resume export CHECKPOINT OUT [--force]",
        description="Write CHECKPOINT (a checkpoint folder of a run that `radiodiff-resume import "
                    "model-N.pt` started, imported or trained further here) in RadioDiff's format: step, "
                    "model, opt, lr_scheduler, ema, scaler, every key, shape and dtype as in the imported "
                    "file and in its order. Tensors our checkpoint does not hold come back bit for bit from "
                    "the passengers the import kept in <results_folder>/radiodiff/, verified by their "
                    "sha256.",
        epilog="Exit 0: written and read back; 2: a user error (not a checkpoint, damaged, never imported "
               "from RadioDiff, OUT exists; one 'error:' line, nothing written).",
    )
    cmd.add_argument("checkpoint", metavar="CHECKPOINT",
                     help="a checkpoint folder, e.g. results/ldm/checkpoints/step-00012200")
    cmd.add_argument("out", metavar="OUT",
                     help="the .pt file to write, or a folder to write model-<step // "
                          "trainer.save_and_sample_every>.pt into (RadioDiff's name for it)")
    cmd.add_argument("--force", action="store_true", help="replace an existing OUT")
    cmd.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    lines = export(Path(args.checkpoint).expanduser(), Path(args.out).expanduser(), args.force)
    print("\n".join(lines), flush=True)


def export(path: Path, out: Path, force: bool) -> list[str]:
    """Read and check the checkpoint and the passengers, build the file, write it atomically, read it
    back; the report's lines."""
    ckpt = read_checkpoint(path)
    loop = trainer_section(ckpt)
    layout, passengers, record = read_passengers(ckpt)
    out = target(out, ckpt.manifest.step, loop, layout, force)
    data, lines = build(ckpt, layout, passengers, loop)
    write(data, out)
    size = read_back(out, layout)
    head = (f"export: {path.resolve()} (step {ckpt.manifest.step}; imported from {layout['source']} at step "
            f"{layout['import_step']}; passengers {record} verified by sha256)")
    milestone = re.fullmatch(r"model-(\d+)\.pt", out.name)
    load = (f"load it in RadioDiff with trainer.enable_resume: True, trainer.resume_milestone: "
            f"{milestone.group(1)}, trainer.results_folder: {out.parent}" if milestone else
            "RadioDiff loads results_folder/model-<resume_milestone>.pt: rename it so")
    return [head, *lines, f"written: {out} ({size / 2**30:.2f} GiB; read back with "
                          "torch.load(weights_only=True): every key, shape and dtype as recorded)", load]


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint, every byte hash-checked, its tensors finite and its ``scale_factor`` consistent."""
    from radiodiff_resume.checkpoint.files import CheckpointCorrupt
    from radiodiff_resume.checkpoint.manifest import ManifestError
    from radiodiff_resume.checkpoint.verify import Report, check_finite, check_scale_factor, open_checkpoint

    if not (path / "manifest.json").is_file():
        raise UserError(f"export: {path} is not a checkpoint folder (no manifest.json); name one such as "
                        "results/ldm/checkpoints/step-00012200")
    try:
        ckpt = open_checkpoint(path, "ldm", rank=0)
    except (CheckpointCorrupt, ManifestError) as exc:
        raise UserError(f"export: {path} does not verify ({exc}); export another checkpoint") from None
    report = Report(path)
    if not (check_finite(report, ckpt.shared) and report.repairable == []
            and check_scale_factor(report, ckpt.shared, ckpt.manifest, True)):
        failed = report.failure
        why = failed.detail if failed is not None else f"non-finite running statistics {report.repairable}"
        raise UserError(f"export: {path}: {why}; repair it with `radiodiff-resume doctor {path} --fix` first")
    return ckpt


def trainer_section(ckpt: Checkpoint) -> dict[str, tp.Any]:
    """The loop settings of the run that wrote the checkpoint (its own ``config.yaml``, read as data)."""
    import yaml

    try:
        trainer = yaml.safe_load(ckpt.config).get("trainer")
        needed = {k: int(trainer[k]) for k in ("ema_update_after_step", "ema_update_every",
                                               "save_and_sample_every")}
    except (yaml.YAMLError, AttributeError, KeyError, TypeError, ValueError):
        raise UserError(f"export: {ckpt.path}/config.yaml has no trainer.ema_update_after_step, "
                        "ema_update_every and save_and_sample_every") from None
    return {**trainer, **needed}


def read_passengers(ckpt: Checkpoint) -> tuple[dict[str, tp.Any], Tensors, Path]:
    """The import's passengers and layout, read once and checked against the sha256 it recorded."""
    from radiodiff_resume.checkpoint.files import CheckpointCorrupt, read_files, read_safetensors
    from radiodiff_resume.checkpoint.manifest import FileRecord
    from radiodiff_resume.compat import radiodiff_ldm as rl
    from radiodiff_resume.io import read_regular

    folders = [ckpt.path.resolve().parent.parent] if ckpt.path.resolve().parent.name == "checkpoints" else []
    record = next((r for f in folders for r in rl.passengers_paths(f)[1:] if r.is_file()), None)
    if record is None:
        raise UserError(
            f"export: {ckpt.path} is not of a run imported from a RadioDiff model-N.pt (no "
            f"{rl.FOLDER}/{rl.RECORD} in its results folder): RadioDiff's Trainer.load needs "
            "every tensor of its file, and the first stage's LPIPS/discriminator losses are trained weights "
            "only a RadioDiff file holds; import the run with `radiodiff-resume import model-N.pt --cfg CFG` "
            "and export its checkpoints")
    try:
        kept = json.loads(read_regular(record))
        sha, size = str(kept["sha256"]), int(kept["bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"export: {record} cannot be read ({exc}); it is what the import wrote") from None
    for line in ckpt.manifest.provenance:
        named = PROVENANCE.match(line)
        if named and named.group(2) != sha:
            raise UserError(f"export: {ckpt.path}'s provenance records passengers sha256 {named.group(2)}, "
                            f"{record} records {sha}: they are not this run's")
    try:
        name = rl.PASSENGERS
        blob = read_files(record.parent, {name: FileRecord(sha, size)}, [name])[name]
        tensors = read_safetensors(blob)
    except (CheckpointCorrupt, ValueError) as exc:
        raise UserError(f"export: {record.parent / rl.PASSENGERS}: {exc}; the passengers cannot be rebuilt "
                        "here: import the RadioDiff file again") from None
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8].tobytes(), "little")].tobytes())
    layout = json.loads(header["__metadata__"]["layout"])
    if layout.get("format") != rl.LAYOUT_FORMAT or layout.get("version") != 1:
        raise UserError(f"export: {record.parent / rl.PASSENGERS} holds another layout format")
    return layout, tensors, record.parent / rl.PASSENGERS


def target(out: Path, step: int, loop: dict[str, tp.Any], layout: dict[str, tp.Any], force: bool) -> Path:
    """OUT, or RadioDiff's name for the file inside the folder OUT; never the file the run came from."""
    if out.is_dir():
        out = out / f"model-{step // loop['save_and_sample_every']}.pt"
    if out.resolve() == Path(layout["source"]):
        raise UserError(f"export: {out} is the RadioDiff file the run was imported from; it is never "
                        "replaced: name another OUT")
    if out.exists() and not force:
        raise UserError(f"export: {out} exists; pass --force to replace it, or name another OUT")
    if not out.parent.is_dir():
        raise UserError(f"export: {out.parent} is not a folder")
    return out


# ----- the file ------------------------------------------------------------------------------------------


def build(ckpt: Checkpoint, layout: dict[str, tp.Any], passengers: Tensors,
          loop: dict[str, tp.Any]) -> tuple[dict[str, tp.Any], list[str]]:
    """RadioDiff's dict from the checkpoint, the passengers and the step, in the layout's order."""
    step, shared = ckpt.manifest.step, ckpt.shared
    model, lines = upstream_model(shared["model"], layout, passengers)
    ema, ema_lines = upstream_ema(shared, model, layout, passengers, step, loop)
    opt, group = upstream_optimizer(shared["optimizer"], layout)
    sched = {**layout["lr_scheduler"], "base_lrs": [group["initial_lr"]], "last_epoch": step,
             "_step_count": step + 1, "_last_lr": [group["lr"]]}
    entries = {"step": step, "model": model, "opt": opt, "lr_scheduler": sched, "ema": ema,
               "scaler": shared.get("grad_scaler")}
    with_state = len(opt["state"])
    lines += [*ema_lines,
              f"opt: AdamW state of {with_state} of {len(opt['param_groups'][0]['params'])} parameters, in "
              "RadioDiff's parameter order (the ones frozen here hold none, as in RadioDiff); lr "
              f"{group['lr']:.6g}, initial_lr {group['initial_lr']:.6g}, weight_decay "
              f"{group['weight_decay']}",
              f"lr_scheduler: last_epoch {step}, _last_lr {group['lr']:.6g} (LambdaLR's fields as imported)",
              "scaler: " + ("the fp16 GradScaler" if entries["scaler"] is not None
                            else "None (no fp16 GradScaler)")]
    return {k: entries[k] for k in layout["top"]}, lines


def as_recorded(tensor: torch.Tensor, key: str, shape: list[int], dtype: str) -> torch.Tensor:
    """``tensor`` in the recorded shape (the import only turned 1×1 convolutions into linear layers)."""
    if str(tensor.dtype).removeprefix("torch.") != dtype or tensor.numel() != _numel(shape):
        raise UserError(f"export: {key} is {tuple(tensor.shape)} {tensor.dtype} here, RadioDiff's file had "
                        f"{tuple(shape)} {dtype}: the checkpoint is of another model")
    return tensor.reshape(shape)


def _numel(shape: list[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def upstream_model(ours: Tensors, layout: dict[str, tp.Any],
                   passengers: Tensors) -> tuple[Tensors, list[str]]:
    model: Tensors = OrderedDict()  # what a state_dict() is, and what RadioDiff's file holds
    where: Counter[str] = Counter()
    for key, shape, dtype, mine in layout["model"]:
        if mine is not None and mine not in ours:
            raise UserError(f"export: the checkpoint has no {mine} (RadioDiff's {key}): it is of another "
                            "model")
        model[key] = as_recorded(ours[mine] if mine else passengers[f"model/{key}"], key, shape, dtype)
        where[mine.split(".")[0] if mine else "passengers"] += 1
    parts = ", ".join(f"{n} {k}" for k, n in sorted(where.items()))
    return model, [f"model: {len(model)} tensors ({parts}), under RadioDiff's names and shapes in its order"]


def upstream_ema(shared: dict[str, tp.Any], model: Tensors, layout: dict[str, tp.Any], passengers: Tensors,
                 step: int, loop: dict[str, tp.Any]) -> tuple[Tensors, list[str]]:
    """``online_model.*`` is ``model`` itself (stored once, as RadioDiff's file); ``ema_model.*`` our EMA
    where it has the parameter, else the passenger: unchanged at the imported step, and after training here
    only where it still equals the online tensor (RadioDiff's EMA of a tensor that never changes is that one)
    — otherwise (a running statistic, which our EMA does not average) the online value."""
    import torch

    from radiodiff_resume.compat.radiodiff_ldm import AVERAGE, ONLINE, ema_initted

    names = {key: mine for key, *_, mine in layout["model"]}
    ema_state = shared.get("ema")
    shadow = dict(zip(layout["opt"]["ours"], ema_state["shadow_params"], strict=True)) if ema_state else {}
    initted = ema_initted(step, loop["ema_update_after_step"], loop["ema_update_every"])
    imported = step == layout["import_step"]
    counts: Counter[str] = Counter()
    ema: Tensors = OrderedDict()
    for key, shape, dtype, where in layout["ema"]:
        base = key.removeprefix(ONLINE).removeprefix(AVERAGE)
        if key == "initted":
            value = torch.tensor([1.0 if initted else 0.0])
        elif key == "step":
            value = torch.tensor([step])
        elif key.startswith(ONLINE):
            ema[key] = model[base]
            continue
        elif where == "ema" and shadow:
            value, how = shadow[names[base]], "our EMA"
        elif where == "passenger":
            value = passengers[f"ema/{key}"]
            kept = imported or not value.is_floating_point() or torch.equal(value, model[base])
            value, how = ((value, "passengers") if kept else
                          (model[base].clone(), "online (not averaged here)"))
        else:
            value, how = model[base].clone(), "a copy of the online model"
        ema[key] = as_recorded(value.to(getattr(torch, dtype)) if key in ("initted", "step") else value,
                               key, shape, dtype)
        if key not in ("initted", "step"):
            counts[how] += 1
    parts = ", ".join(f"{n} from {k}" for k, n in sorted(counts.items()))
    return ema, [f"ema: initted {float(ema['initted'][0])} and step {step} from the step "
                 f"(ema_update_after_step={loop['ema_update_after_step']}, ema_update_every="
                 f"{loop['ema_update_every']}); {ONLINE}* = model (the same tensors); {AVERAGE}*: {parts}"]


def upstream_optimizer(ours: dict[str, tp.Any], layout: dict[str, tp.Any]) -> tuple[dict[str, tp.Any],
                                                                                      dict[str, tp.Any]]:
    """Our AdamW state under RadioDiff's parameter indices (its optimizer also lists the parameters this
    network freezes, without state); the param group as imported, with this run's values."""
    from radiodiff_resume.compat.radiodiff_ldm import ADAM_ENTRIES, TUPLES

    names = {key: mine for key, *_, mine in layout["model"]}
    mine = {name: i for i, name in enumerate(layout["opt"]["ours"])}
    group = ours["param_groups"][0]
    if len(ours["param_groups"]) != 1 or len(group["params"]) != len(mine):
        raise UserError(f"export: the checkpoint's optimizer has {len(group['params'])} parameters, the "
                        f"import mapped {len(mine)}: it is of another model")
    state = {}
    for i, key in enumerate(layout["opt"]["params"]):
        j = mine.get(names[key])
        if j is not None and j in ours["state"]:
            state[i] = {entry: ours["state"][j][entry] for entry in ADAM_ENTRIES}
    recorded = {k: tuple(v) if k in TUPLES else v for k, v in layout["opt"]["param_group"].items()}
    for key in ("lr", "initial_lr", "betas", "eps", "weight_decay"):
        if key in group:
            recorded[key] = tuple(group[key]) if key in TUPLES else group[key]
    recorded["params"] = list(range(len(layout["opt"]["params"])))
    return {"state": state, "param_groups": [recorded]}, recorded


def write(data: dict[str, tp.Any], out: Path) -> None:
    """``torch.save`` beside OUT, fsync, rename into place: never a half-written model-N.pt."""
    import torch

    from radiodiff_resume.io import commit_file

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(data, tmp)
        commit_file(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"export: {out} cannot be written ({exc.strerror or exc})") from None


def read_back(out: Path, layout: dict[str, tp.Any]) -> int:
    """The file as RadioDiff reads it (weights only here), against the layout; its size."""
    from radiodiff_resume.compat.torch_files import load_pickled

    data = load_pickled(out, mmap=True)
    wrong = [] if list(data) == layout["top"] else ["top-level keys"]
    for entry, rows in (("model", layout["model"]), ("ema", layout["ema"])):
        got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in data[entry].items()]
        wrong += [] if got == [row[:3] for row in rows] else [entry]
    if wrong:
        raise RuntimeError(f"{out} reads back with other {' and '.join(wrong)} than the layout it was built "
                           "from")
    return out.stat().st_size
