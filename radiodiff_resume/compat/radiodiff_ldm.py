"""A RadioDiff LDM run (``train_cond_ldm.py``'s ``model-N.pt``) → a verified checkpoint of this project.

RadioDiff's ``Trainer.save`` writes ``{step, model, opt, lr_scheduler, ema, scaler}`` (``{model}`` alone with
``trainer.enable_resume: False``, its configs' value). ``model`` is ``LatentDiffusion.state_dict()``: the
conditional Swin U-Net under ``model.*`` — :class:`~radiodiff_resume.models.radiodiff_unet.RadioDiffUNet`
under the same names, our ``unet.*`` —, the frozen autoencoder under ``first_stage_model.*`` (converted to
our diffusers first stage by :func:`~radiodiff_resume.compat.radiodiff_ckpt.to_diffusers`, bit for bit),
``scale_factor``, and what our model does not hold: the DDPM schedule buffers the const-SDE never uses and
the autoencoder's three LPIPS/discriminator training losses. ``opt`` is AdamW over every parameter with
``requires_grad`` in ``named_parameters`` order; ``ema`` is ema-pytorch's ``EMA`` of the whole model
(``online_model.*`` is ``model`` itself, ``ema_model.*`` its average, ``step`` its update calls = optimizer
steps, ``initted``).

Everything our checkpoint holds is placed by :class:`~radiodiff_resume.compat.ldm_import.LdmImport`, by name.
The rest — ``model``'s tensors above and ``ema_model.*`` outside our EMA (the first stage, buffers, frozen
parameters) — are *passengers*: saved unchanged in ``<results_folder>/radiodiff/passengers.safetensors``
with the file's layout (every key, shape, dtype, where it went; the optimizer's parameter order; the
``lr_scheduler`` fields), its sha256 in the imported checkpoint's provenance and in ``passengers.json``,
so that ``radiodiff-resume export`` writes the file back (:mod:`radiodiff_resume.tools.export`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import typing as tp
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from radiodiff_resume.compat.ldm_import import (
    LdmImport,
    Source,
    Weights,
    import_into_ldm,
    refuse_existing_run,
    resume_command,
)
from radiodiff_resume.compat.radiodiff_ckpt import (
    LDM_DENOISER,
    LDM_FIRST_STAGE,
    Found,
    check_fits,
    counted,
    is_state_dict,
    split,
    to_diffusers,
)
from radiodiff_resume.compat.torch_files import Tensors
from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    from radiodiff_resume.config import Config

RUN_KEYS = ("step", "model", "opt", "lr_scheduler", "ema", "scaler")
"""``Trainer.save``'s keys with ``enable_resume: True``, in its order."""
ONLINE, AVERAGE = "online_model.", "ema_model."
EMA_COUNTERS = ("initted", "step")
ADAM_ENTRIES = ("step", "exp_avg", "exp_avg_sq")
FOLDER, PASSENGERS, RECORD = "radiodiff", "passengers.safetensors", "passengers.json"
LAYOUT_FORMAT = "radiodiff_resume/radiodiff-ldm-layout"
MILESTONE = re.compile(r"^model-(\d+)\.pt$")
TUPLES = frozenset({"betas"})
"""AdamW param-group entries torch keeps as tuples (JSON makes them lists)."""


def is_ldm_run(ckpt: tp.Any) -> bool:
    """``train_cond_ldm.py``'s file: a ``model`` state dict holding the first stage and the denoiser."""
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    return is_state_dict(model) and any(k.startswith(LDM_FIRST_STAGE) for k in model) and \
        any(k.startswith(LDM_DENOISER) for k in model)


def builds_radiodiff_unet(cfg: Config) -> bool:
    from radiodiff_resume.config import get_target
    from radiodiff_resume.models.radiodiff_unet import RadioDiffUNet

    return get_target(cfg.model.unet.target) is RadioDiffUNet


def passengers_paths(results_folder: Path) -> tuple[Path, Path]:
    folder = results_folder / FOLDER
    return folder / PASSENGERS, folder / RECORD


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def ema_initted(step: int, update_after_step: int, update_every: int) -> bool:
    """ema-pytorch's ``initted`` after ``step`` update calls: set by the first call ``s`` (counting from 0)
    with ``s % update_every == 0`` and ``s > update_after_step``."""
    return step > (update_after_step // update_every + 1) * update_every


def layout_rows(tensors: Tensors, where: tp.Callable[[str], str | None]) -> list[list[tp.Any]]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch."), where(k)] for k, v in tensors.items()]


@dataclass
class RunFile:
    """A RadioDiff LDM ``model-N.pt`` read and checked, mapped onto our names."""

    src: Path
    ckpt: dict[str, tp.Any]
    ours: Tensors
    """Our model's whole state under our names (``unet.*``, ``first_stage.*``, ``scale_factor``)."""
    names: dict[str, str]
    """Upstream ``model`` key → our key."""
    first_stage: Tensors
    """Our first stage's state (diffusers names), as ``model.first_stage.ckpt_path`` holds it."""
    upstream_params: list[str]
    """Upstream's AdamW parameters in its order (``requires_grad`` in ``named_parameters`` order)."""
    frozen_here: list[str]
    """Those of them this network freezes (no forward reaches them)."""
    reshaped: int

    @property
    def full(self) -> bool:
        return "opt" in self.ckpt

    @property
    def model(self) -> Tensors:
        return tp.cast(Tensors, self.ckpt["model"])

    def trainable(self) -> list[str]:
        """Our trainable parameters (our names), in our optimizer's order."""
        frozen = set(self.frozen_here)
        return [self.names[k] for k in self.upstream_params if k not in frozen]


def read_run(src: Path, ckpt: dict[str, tp.Any], cfg: Config) -> RunFile:
    """Check the file's layout and map its ``model`` onto this config's network (nothing built but the first
    stage and a meta-device copy of the denoiser)."""
    from radiodiff_resume.build import build_first_stage, instantiate

    extra = sorted(set(ckpt) - set(RUN_KEYS))
    if extra or set(ckpt) not in (set(RUN_KEYS), {"model"}):
        raise UserError(f"import: {src} holds {', '.join(map(str, ckpt))}; RadioDiff's Trainer.save writes "
                        f"{', '.join(RUN_KEYS)} (enable_resume: True) or model alone")
    model = tp.cast(Tensors, ckpt["model"])
    found = Found("model", LDM_FIRST_STAGE, model)
    parts = split(found)
    first_stage = build_first_stage(cfg)
    converted, origin = to_diffusers(parts.autoencoder, tp.cast(tp.Any, first_stage).config)
    check_fits(src, found, parts.autoencoder, converted, origin, first_stage)
    first_stage.load_state_dict(converted, strict=True)
    names = {LDM_FIRST_STAGE + origin[k]: f"first_stage.{k}" for k in converted}
    names |= {k: "unet." + k[len(LDM_DENOISER):] for k in parts.denoiser}
    if "scale_factor" in model:
        names["scale_factor"] = "scale_factor"
    ours = {names[k]: model[k] for k in names if not k.startswith(LDM_FIRST_STAGE)}
    ours |= {f"first_stage.{k}": v for k, v in first_stage.state_dict().items()}
    m = cfg.model
    with torch.device("meta"):
        unet = tp.cast(nn.Module, instantiate("model.unet", m.unet.target, m.unet.params))
    unused = set(tp.cast(tp.Any, unet).unused_parameters())
    upstream = [LDM_DENOISER + n for n, p in unet.named_parameters() if p.requires_grad]
    frozen = [LDM_DENOISER + n for n, p in unet.named_parameters() if p.requires_grad and n in unused]
    reshaped = sum(converted[k].shape != parts.autoencoder[origin[k]].shape for k in converted)
    return RunFile(src, ckpt, ours, names, first_stage.state_dict(), upstream, frozen, reshaped)


def sampling_state(src: Path, ckpt: dict[str, tp.Any], cfg: Config, ema: bool | None) -> tuple[Tensors, bool]:
    """Our LDM's whole state from a RadioDiff LDM file as upstream's ``sample_cond_ldm.py`` loads it for
    sampling: the EMA's average (``ema_model.*``, ``sampler.use_ema``) or ``model``, with ``model``'s
    ``scale_factor`` either way; and whether it is the EMA. ``ema`` None: the EMA when the file has one."""
    if not is_ldm_run(ckpt):
        raise UserError(f"import: {src} is not a RadioDiff LDM file (train_cond_ldm.py's model-N.pt: 'model' "
                        f"holding {LDM_FIRST_STAGE}* and {LDM_DENOISER}*); a checkpoint of this project is "
                        "evaluated with --checkpoint DIR")
    if not builds_radiodiff_unet(cfg):
        from radiodiff_resume.compat.radiodiff_config import RADIODIFF_UNET

        raise UserError(f"import: {src.name} holds RadioDiff's network, and this config builds "
                        f"model.unet.target={cfg.model.unet.target}: pass RadioDiff's yaml (or one with "
                        f"model.unet.target: {RADIODIFF_UNET})")
    average = ckpt.get("ema")
    has_ema = isinstance(average, dict) and any(k.startswith(AVERAGE) for k in average)
    use_ema = has_ema if ema is None else ema
    if use_ema and not has_ema:
        raise UserError(f"import: {src.name} holds no EMA to sample with --ema (RadioDiff saves model alone "
                        "with trainer.enable_resume: False); pass --online")
    model = tp.cast(Tensors, ckpt["model"])
    if use_ema:
        online = model
        model = {k[len(AVERAGE):]: v for k, v in tp.cast(Tensors, average).items() if k.startswith(AVERAGE)}
        if "scale_factor" in online:
            model["scale_factor"] = online["scale_factor"]
    return read_run(src, {"model": model}, cfg).ours, use_ema


# ----- what the file says besides the weights -------------------------------------------------------------


def checked_step(run: RunFile) -> int:
    step = run.ckpt["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"import: {run.src}['step'] is {step!r}, not a step count")
    return step


def step_from_name(src: Path, cfg: Config) -> int:
    match = MILESTONE.match(src.name)
    if not match:
        raise UserError(f"import: --step-from-name: {src.name} is not named model-<milestone>.pt, as "
                        "RadioDiff names its saves; rename it or drop the flag (a fine-tune from step 0)")
    return int(match.group(1)) * cfg.trainer.save_and_sample_every


def optimizer_for_ours(run: RunFile) -> dict[str, tp.Any]:
    """The file's AdamW state without the parameters this network freezes (which must hold none), so that
    its indices follow our optimizer's parameters."""
    opt = run.ckpt["opt"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    state = opt.get("state") if isinstance(opt, dict) else None
    if not (isinstance(groups, list) and isinstance(state, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise UserError(f"import: {run.src}['opt'] is not a torch optimizer state_dict")
    flat = [i for g in groups for i in g["params"]]
    if len(flat) != len(run.upstream_params):
        raise UserError(f"import: {run.src}['opt'] lists {len(flat)} parameters; RadioDiff's AdamW over "
                        f"this config's network has {len(run.upstream_params)} (every requires_grad "
                        "parameter): the file was trained with another model.unet.params (fix_bb?)")
    name = dict(zip(flat, run.upstream_params, strict=True))
    frozen = set(run.frozen_here)
    trained = [name[i] for i in state if name.get(i) in frozen]
    if trained:
        raise UserError(f"import: {run.src}['opt'] holds Adam state for {', '.join(trained[:3])}, which "
                        "this network's forward never reaches (it freezes them): the file was trained with "
                        "another model.unet.params (DPMCARK?)")
    kept = [i for i in flat if name[i] not in frozen]
    index = {i: j for j, i in enumerate(kept)}
    return {"state": {index[i]: state[i] for i in kept if i in state},
            "param_groups": [dict(g, params=[index[i] for i in g["params"] if i in index]) for g in groups]}


def ema_for_ours(run: RunFile, step: int, cfg: Config) -> Weights:
    """``ema_model.*`` of the denoiser under our names, after checking the EMA's other entries."""
    ema = run.ckpt["ema"]
    model = run.model
    expected = [*EMA_COUNTERS, *(ONLINE + k for k in model), *(AVERAGE + k for k in model)]
    if not is_state_dict(ema) or set(ema) != set(expected):
        found = set(ema) if isinstance(ema, dict) else set()
        odd = sorted(set(expected) ^ found)
        raise UserError(f"import: {run.src}['ema'] is not ema-pytorch's EMA of the model (e.g. "
                        f"{', '.join(map(str, odd[:3]))} {'missing or unexpected' if found else 'missing'})")
    for key in model:
        online, own = ema[ONLINE + key], model[key]
        shared = online.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
        if not (shared or torch.equal(online, own)):
            raise UserError(f"import: {run.src}: ema['{ONLINE}{key}'] differs from model['{key}'] "
                            "(RadioDiff's EMA holds the live model; its load would put these values into it)")
    loop = cfg.trainer
    counters = (int(ema["step"].reshape(-1)[0]), bool(ema["initted"].reshape(-1)[0]))
    rule = (step, ema_initted(step, loop.ema_update_after_step, loop.ema_update_every))
    if counters != rule:
        raise UserError(f"import: {run.src}: ema step {counters[0]}, initted {counters[1]} do not fit step "
                        f"{step} with trainer.ema_update_after_step={loop.ema_update_after_step}, "
                        f"ema_update_every={loop.ema_update_every} (initted {rule[1]}): set the values the "
                        "run was trained with")
    prefix = AVERAGE + LDM_DENOISER
    return Weights(f"{run.src.name}['ema'] {prefix}*",
                   {"unet." + k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)})


# ----- what export needs and our checkpoint does not hold --------------------------------------------------


def layout_and_passengers(run: RunFile, step: int, param_group: dict[str, tp.Any],
                          lr_scheduler: dict[str, tp.Any]) -> tuple[dict[str, tp.Any], Tensors]:
    """The file's layout (keys, shapes, dtypes and where each went, in its order) and the tensors only it
    holds. A ``{'model'}`` file gets the layout ``Trainer.save`` would write for it with ``enable_resume``
    (``param_group`` and ``lr_scheduler`` its fields), its EMA a copy of the model as RadioDiff's starts."""
    model, ckpt = run.model, run.ckpt
    trainable = set(run.trainable())
    passengers = {f"model/{k}": v for k, v in model.items() if k not in run.names}

    def averaged(key: str) -> str:
        base = key[len(AVERAGE):]
        if run.names.get(base) in trainable:
            return "ema"
        return "passenger" if run.full else "online"

    if run.full:
        ema = tp.cast(Tensors, ckpt["ema"])
        rows = layout_rows(ema, lambda k: k if k in EMA_COUNTERS else "online" if k.startswith(ONLINE)
                           else averaged(k))
        passengers |= {f"ema/{k}": ema[k] for k, *_, where in rows if where == "passenger"}
        opt = ckpt["opt"]["param_groups"][0]
        param_group = {k: v for k, v in opt.items() if k != "params"}
        lr_scheduler = dict(ckpt["lr_scheduler"])
    else:
        counters = {"initted": torch.zeros(1), "step": torch.zeros(1, dtype=torch.int64)}
        rows = layout_rows(counters, lambda k: k)
        rows += layout_rows({ONLINE + k: v for k, v in model.items()}, lambda _: "online")
        rows += layout_rows({AVERAGE + k: v for k, v in model.items()}, averaged)
    layout = {
        "format": LAYOUT_FORMAT, "version": 1, "source": str(run.src.resolve()), "import_step": step,
        "top": list(ckpt) if run.full else list(RUN_KEYS),
        "model": layout_rows(model, run.names.get), "ema": rows,
        "opt": {"params": run.upstream_params, "ours": run.trainable(),
                "param_group": {k: list(v) if k in TUPLES else v for k, v in param_group.items()}},
        "lr_scheduler": lr_scheduler, "scaler": ckpt.get("scaler"),
    }
    return layout, passengers


def write_passengers(imp: LdmImport, run: RunFile, step: int, written: list[Path]) -> list[str]:
    """Passengers and layout beside the run (the import holds its lock), hash recorded twice; each file in
    ``written`` as soon as it may exist."""
    from torch.optim.lr_scheduler import LambdaLR

    from radiodiff_resume.io import save_tensors_atomic, write_text_atomic

    t = imp.trainer
    names = {id(p): n for n, p in imp.ldm.named_parameters()}
    if [names[id(p)] for p in t.params] != run.trainable():
        raise UserError("import: this config's trainable parameters are not RadioDiff's minus the frozen "
                        "ones; the file's optimizer cannot be mapped")
    group, template = {}, {}
    if not run.full:  # the file has neither: this run's AdamW group and torch's LambdaLR fields
        group = {k: v for k, v in t.optimizer.state_dict()["param_groups"][0].items() if k != "params"}
        scratch = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
        template = {**LambdaLR(scratch, lambda _: 1.0).state_dict(), "lr_lambdas": [None]}
    layout, passengers = layout_and_passengers(run, step, group, template)
    path, record = passengers_paths(t.results_folder.resolve())
    written += [path, record]
    save_tensors_atomic(path, passengers, metadata={"layout": json.dumps(layout)})
    digest = sha256_of(path)
    write_text_atomic(record, json.dumps({"format": LAYOUT_FORMAT, "passengers": PASSENGERS, "sha256": digest,
                                          "bytes": path.stat().st_size, "import_step": step,
                                          "source": layout["source"]}, indent=1) + "\n")
    imp.provenance.append(f"radiodiff passengers: {path} sha256 {digest} ({len(passengers)} tensors of the "
                          "RadioDiff file this checkpoint does not hold, for `radiodiff-resume export`)")
    entries = Counter(k.split("/")[0] for k in passengers)
    return [f"kept for `radiodiff-resume export` (our checkpoint does not hold them): {len(passengers)} "
            f"tensors in {path} (sha256 {digest[:16]}…, recorded in the checkpoint's provenance and "
            f"{record.name}):",
            *(f"    {entry}: {kinds([n.split('/', 1)[1] for n in passengers if n.startswith(entry + '/')])}"
              for entry in sorted(entries))]


def kinds(keys: list[str]) -> str:
    """What passengers are, by kind rather than by name (``keys`` of ``model``, or of ``ema``)."""
    averaged = bool(keys) and keys[0].startswith(AVERAGE)
    depth = 3 if averaged else 2
    schedule = [k for k in keys if "." not in k.removeprefix(AVERAGE)]
    losses = [k for k in keys if k.removeprefix(AVERAGE).startswith(LDM_FIRST_STAGE + "loss")]
    rest = [k for k in keys if k not in {*schedule, *losses}]
    scale = [k for k in schedule if k.endswith("scale_factor")]
    parts = [f"{len(schedule) - len(scale)} DDPM schedule buffers (the const-SDE uses none)"
             + (" and scale_factor" if scale else "")] if schedule else []
    if losses:
        parts.append(f"{counted(losses, depth)}: the first stage's LPIPS + discriminator training losses")
    if rest:
        parts.append(counted(rest, 2) + (": the EMA's first stage, and the denoiser's buffers and the "
                                         "parameters outside our EMA" if averaged else ""))
    return "; ".join(parts)


# ----- the command ------------------------------------------------------------------------------------------


def mapping_lines(run: RunFile) -> list[str]:
    model = run.model
    fs = [k for k in run.names if k.startswith(LDM_FIRST_STAGE)]
    unet = [k for k in run.names if k.startswith(LDM_DENOISER)]
    lines = [f"  model['{LDM_DENOISER}*'] ({len(unet)} tensors) → unet.* (RadioDiff's network, same names)",
             f"  model['{LDM_FIRST_STAGE}{{encoder,decoder,quant_conv,post_quant_conv}}.*'] ({len(fs)} "
             "tensors) → first_stage.*, by diffusers' convert_ldm_vae_checkpoint"
             + (f" ({run.reshaped} attention weights: 1×1 convolutions → linear layers, same values)"
                if run.reshaped else "")]
    if "scale_factor" in model:
        lines.append(f"  model['scale_factor'] {float(model['scale_factor']):.6g} → scale_factor")
    rest = [k for k in model if k not in run.names]
    if rest:
        lines.append(f"  not in our model: {kinds(rest)} (kept for export, below)")
    return lines


def write_first_stage(run: RunFile, cfg: Config) -> tuple[list[str], Path | None]:
    """``model.first_stage.ckpt_path`` from the file when it is not there yet; an existing one must hold the
    same weights. The path written, to remove if the import fails."""
    from safetensors.torch import load_file

    from radiodiff_resume.build import build_first_stage, load_first_stage_weights
    from radiodiff_resume.io import save_tensors_atomic

    out = Path(tp.cast(str, cfg.model.first_stage.ckpt_path))
    if out.is_file():
        have = load_file(str(out))
        differ = [k for k, v in run.first_stage.items() if k not in have or not torch.equal(have[k], v)]
        differ += sorted(set(have) - set(run.first_stage))
        if differ:
            raise UserError(f"import: model.first_stage.ckpt_path {out} exists and holds other weights than "
                            f"{run.src.name}'s first stage (e.g. {differ[0]}); it is not replaced: point "
                            "model.first_stage.ckpt_path at a new file")
        return [f"first stage: {out} already holds these weights, bit for bit"], None
    save_tensors_atomic(out, run.first_stage, metadata={"imported_from": str(run.src.resolve()),
                                                        "weights": "model['first_stage_model.*']"})
    load_first_stage_weights(build_first_stage(cfg), out)
    return [f"first stage: written to {out} ({len(run.first_stage)} tensors; read back strictly by the "
            "loader `train` uses)"], out


def source_of(run: RunFile, cfg: Config, step: int, described: list[str]) -> Source:
    what = f"RadioDiff LDM run (train_cond_ldm.py) {run.src.resolve()}"
    source = Source(run.src, what, [Weights(f"{run.src.name}['model'], renamed as above", run.ours)],
                    None, f"{run.src.name} has model only (saved with trainer.enable_resume: False)",
                    step=step, described=described)
    if run.full:
        source.optimizer, source.optimizer_name = optimizer_for_ours(run), f"{run.src.name}['opt']"
        source.scheduler, source.scheduler_name = run.ckpt["lr_scheduler"], "lr_scheduler"
        source.ema = ema_for_ours(run, step, cfg)
        source.ema_config = {"optimization_step": step}
        source.scaler = run.ckpt["scaler"]
        source.unused = [f"ema's {ONLINE}* ({len(run.model)}: the model itself)",
                         "ema's initted, step (recomputed from the step by export)"]
    return source


def import_run(src: Path, ckpt: dict[str, tp.Any], cfg: Config, args: argparse.Namespace) -> list[str]:
    """The first stage's weights (when missing), then one verified checkpoint through
    :func:`~radiodiff_resume.compat.ldm_import.import_into_ldm`, then the passengers; on failure nothing of
    what this wrote stays."""
    if args.force:
        raise UserError("import: --force is for RadioDiff first-stage imports; importing a run never writes "
                        "over one (pass --out with a new results folder)")
    if args.step_from_name and "opt" in ckpt:
        raise UserError(f"import: --step-from-name is for a model-only file; {src.name} records its step")
    refuse_existing_run(cfg)
    run = read_run(src, ckpt, cfg)
    if run.full:
        step, how = checked_step(run), "its step"
    elif args.step_from_name:
        every = cfg.trainer.save_and_sample_every
        step = step_from_name(src, cfg)
        how = f"milestone × trainer.save_and_sample_every={every} (--step-from-name)"
    else:
        step, how = 0, ("a fine-tune from step 0, as RadioDiff's finetune.ckpt_path starts one (the file "
                        "records no step; --step-from-name continues at its milestone instead)")
    described = [f"  file: {', '.join(ckpt)}; step {step}: {how}", *mapping_lines(run)]
    if run.frozen_here and run.full:
        described.append(f"  {len(run.frozen_here)} of the file's {len(run.upstream_params)} AdamW "
                         f"parameters ({counted(run.frozen_here, 3)}) are frozen here: no forward reaches "
                         "them, and the file holds no Adam state for them")
    fs_lines, first_stage = write_first_stage(run, cfg)
    described += fs_lines
    kept: list[str] = []
    written = [first_stage] if first_stage is not None else []
    try:
        lines = import_into_ldm(source_of(run, cfg, step, described), cfg,
                                lambda imp: kept.extend(write_passengers(imp, run, step, written)))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return [*lines[:-1], *kept, lines[-1], f"resume with: {resume_command(args, cfg)}"]
