"""``radiodiff-resume import model-N.pt --cfg CFG [--out FILE.safetensors]``: the first stage of a RadioDiff
checkpoint → our first stage's weights (``model.first_stage.ckpt_path``).

RadioDiff (UNIC-Lab/RadioDiff) saves plain ``torch.save`` dicts. ``train_vae.py`` saves its autoencoder
(``model``; ``ema`` with the EMA copy under ``ema_model.*``; ``opt_ae``, ``opt_disc``, their schedulers,
``step``); ``train_cond_ldm.py`` saves its LDM, whose state dict holds the frozen autoencoder under
``first_stage_model.*`` beside the conditional Swin U-Net under ``model.*``. The autoencoder is
latent-diffusion's ``AutoencoderKL`` layout plus its training losses (LPIPS, discriminator); diffusers' own
``convert_ldm_vae_checkpoint`` renames that layout to ``diffusers.AutoencoderKL``, which is our first stage.
The file is read with torch's weights-only unpickler
(:func:`~radiodiff_resume.compat.torch_files.load_pickled`, torch >= 2.10): one that would run code is
refused before any of it runs.
"""

from __future__ import annotations

import argparse
import shlex
import typing as tp
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from radiodiff_resume.compat.torch_files import Tensors, load_pickled, strip_wrappers
from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    from radiodiff_resume.config import Config

AUTOENCODER = frozenset({"encoder", "decoder", "quant_conv", "post_quant_conv"})
"""The modules of latent-diffusion's AutoencoderKL that are the autoencoder; RadioDiff's also holds its
training losses (``loss``, ``loss_pinn``, ``loss_pinn_dpm2irt4``) beside them."""
LDM_FIRST_STAGE = "first_stage_model."
LDM_DENOISER = "model."
EMA_MODEL = "ema_model."
LOSS_PARTS = {
    "discriminator": "PatchGAN discriminator",
    "perceptual_loss": "LPIPS: VGG16 features and their linear heads",
    "logvar": "learned log-variance of the reconstruction loss",
}
LDM_SETTINGS: dict[str, tuple[tp.Any, ...]] = {"norm_num_groups": (32,), "act_fn": ("silu", "swish")}
"""What latent-diffusion's Encoder/Decoder hard-code (GroupNorm with 32 groups, swish). No tensor shape shows
them, so a config with others would load these weights without complaint and compute something else."""
DDCONFIG = ("RadioDiff's ddconfig → ours: block_out_channels = ch × ch_mult, layers_per_block = "
            "num_res_blocks, latent_channels = z_channels = embed_dim, one DownEncoderBlock2D / "
            "UpDecoderBlock2D per ch_mult entry, norm_num_groups = 32")


@dataclass
class Found:
    """Where the autoencoder is in a RadioDiff checkpoint."""

    entry: str
    """``ema`` (RadioDiff's EMA, what it loads itself) or ``model`` (the online weights)."""
    prefix: str
    """The autoencoder's key prefix inside the entry."""
    tensors: Tensors
    """The whole entry, DDP / torch.compile wrappers removed."""
    notes: list[str] = field(default_factory=list)

    @property
    def ldm(self) -> bool:
        return self.prefix.endswith(LDM_FIRST_STAGE)

    @property
    def base(self) -> str:
        """The prefix of the trained model inside the entry (an EMA also holds its online copy)."""
        return EMA_MODEL if self.entry == "ema" else ""

    def name(self, key: str) -> str:
        return f"{self.entry}['{key}']"


@dataclass
class Parts:
    """The entry's tensors by what they are."""

    autoencoder: Tensors = field(default_factory=dict)
    """Latent-diffusion names, the prefix removed."""
    losses: list[str] = field(default_factory=list)
    denoiser: Tensors = field(default_factory=dict)
    other: Tensors = field(default_factory=dict)
    """The rest of the trained model: LDM buffers, unknown modules."""
    outside: list[str] = field(default_factory=list)
    """Entry keys outside the trained model (an EMA's ``online_model.*``, ``initted``, ``step``)."""


def is_state_dict(value: tp.Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def find_autoencoder(ckpt: tp.Any, src: Path) -> Found:
    """The EMA's autoencoder when the file has one (RadioDiff loads that itself), else the online one."""
    entries = {name: strip_wrappers(ckpt[name])[0] for name in ("ema", "model")
               if isinstance(ckpt, dict) and is_state_dict(ckpt.get(name))}
    for name, base in (("ema", EMA_MODEL), ("model", "")):
        tensors = entries.get(name, {})
        for prefix in (base, base + LDM_FIRST_STAGE):
            if f"{prefix}encoder.conv_in.weight" in tensors and f"{prefix}post_quant_conv.weight" in tensors:
                found = Found(name, prefix, tensors)
                if name == "model":
                    why = ("its ema entry holds no ema_model.* autoencoder" if "ema" in ckpt else
                           "the file has no ema entry" + (" (train_cond_ldm.py saves only model unless "
                                                          "trainer.enable_resume)" if found.ldm else ""))
                    found.notes.append(f"EMA: {why}; the online weights under model are imported (RadioDiff "
                                       "itself loads the EMA when a file has one)")
                return found
    raise UserError(
        f"import: {src} is not a RadioDiff checkpoint: expected a dict whose model (or ema, as ema_model.*) "
        "state dict holds its autoencoder (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*: "
        "train_vae.py's model-N.pt) or its LDM (first_stage_model.* beside model.*: train_cond_ldm.py's "
        f"model-N.pt); found {describe(ckpt)}")


def describe(ckpt: tp.Any) -> str:
    """A file's top level, and the top-level modules of its state dicts."""
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}"
    return ", ".join(f"{k} [{counted(v, 1)}]" if is_state_dict(v) else str(k) for k, v in ckpt.items()) or \
        "an empty dict"


def split(found: Found) -> Parts:
    parts = Parts()
    for key, tensor in found.tensors.items():
        if not key.startswith(found.base):
            parts.outside.append(key)
        elif key.startswith(found.prefix):
            rel = key[len(found.prefix):]
            head = rel.split(".")[0]
            if head in AUTOENCODER:
                parts.autoencoder[rel] = tensor
            elif head.startswith("loss"):
                parts.losses.append(rel)
            else:
                parts.other[key[len(found.base):]] = tensor
        elif found.ldm and key[len(found.base):].startswith(LDM_DENOISER):
            parts.denoiser[key[len(found.base):]] = tensor
        else:
            parts.other[key[len(found.base):]] = tensor
    return parts


def to_diffusers(autoencoder: Tensors, config: tp.Mapping[str, tp.Any]) -> tuple[Tensors, dict[str, str]]:
    """diffusers' own LDM → ``AutoencoderKL`` conversion, and which source key each result came from: the
    function does not say, so it also runs on index markers (for the report, and so that no tensor it
    leaves out goes unnoticed)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    names = list(autoencoder)
    converted = convert_ldm_vae_checkpoint(dict(autoencoder), config)
    marks = convert_ldm_vae_checkpoint({k: torch.tensor(i) for i, k in enumerate(names)}, config)
    return converted, {k: names[int(v)] for k, v in marks.items()}


def radiodiff_params(autoencoder: Tensors) -> dict[str, tp.Any]:
    """Our ``model.first_stage.params`` for this autoencoder, read off its tensors (RadioDiff does not save
    its ddconfig)."""
    levels = sorted({int(k.split(".")[2]) for k in autoencoder
                     if k.startswith("encoder.down.") and k.split(".")[2].isdigit()})
    firsts = [autoencoder.get(f"encoder.down.{i}.block.0.conv1.weight") for i in levels]
    params: dict[str, tp.Any] = {}
    if levels and all(w is not None for w in firsts):
        params["block_out_channels"] = [int(tp.cast(torch.Tensor, w).shape[0]) for w in firsts]
        params["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
        params["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    blocks = {k.split(".")[4] for k in autoencoder if k.startswith("encoder.down.0.block.")}
    if blocks:
        params["layers_per_block"] = len(blocks)
    params["latent_channels"] = int(autoencoder["post_quant_conv.weight"].shape[0])
    return {**params, **{k: accepted[0] for k, accepted in LDM_SETTINGS.items()}}


def differs(key: str, ours: tp.Any, theirs: tp.Any) -> bool:
    if key in LDM_SETTINGS:
        return ours not in LDM_SETTINGS[key]
    return (list(ours) if isinstance(ours, (list, tuple)) else ours) != theirs


def override(key: str, value: tp.Any) -> str:
    text = f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)
    return f"model.first_stage.params.{key}={text}"


def params_hint(autoencoder: Tensors, model: nn.Module) -> str:
    config = tp.cast(tp.Any, model).config
    wrong = {k: v for k, v in radiodiff_params(autoencoder).items() if differs(k, config.get(k), v)}
    if not wrong:
        return f"check model.first_stage.params ({DDCONFIG})"
    return f"set {' '.join(override(k, v) for k, v in wrong.items())} ({DDCONFIG})"


def check_fits(src: Path, found: Found, autoencoder: Tensors, converted: Tensors, origin: dict[str, str],
               model: nn.Module) -> None:
    """Every tensor of ours has one of the source, with the same shape and dtype, and nothing is left over;
    else name the first that differs and the params that would fit."""
    ours = model.state_dict()
    converted_from = set(origin.values())
    lost = [k for k in autoencoder if k not in converted_from]
    wrong = [k for k in ours if k in converted and (converted[k].shape, converted[k].dtype)
             != (ours[k].shape, ours[k].dtype)]
    missing = [k for k in ours if k not in converted]
    unexpected = [k for k in converted if k not in ours]
    problems = [
        *(f"{found.name(found.prefix + k)} is left out by the conversion" + (
            " (attention inside a resolution level, ddconfig.attn_resolutions, has no AutoencoderKL "
            "counterpart)" if ".attn." in k and ".mid." not in k else "") for k in lost),
        *(f"tensor {k} is {tuple(converted[k].shape)} {converted[k].dtype} in "
          f"{found.name(found.prefix + origin[k])}, {tuple(ours[k].shape)} {ours[k].dtype} in ours"
          for k in wrong),
        *(f"our {k} {tuple(ours[k].shape)} has no counterpart in {src.name}" for k in missing),
        *(f"{found.name(found.prefix + origin[k])} (our name {k}) has no counterpart in ours"
          for k in unexpected),
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"import: RadioDiff's autoencoder in {src} does not fit model.first_stage: "
                        f"{problems[0]}{more}; {params_hint(autoencoder, model)}")
    config = tp.cast(tp.Any, model).config
    hidden = [f"{k} is {config.get(k)!r}" for k in LDM_SETTINGS if differs(k, config.get(k), None)]
    if hidden:
        raise UserError(f"import: model.first_stage.params: {', '.join(hidden)}, but RadioDiff's "
                        "autoencoder computes with GroupNorm(32) and swish (latent-diffusion's "
                        "Encoder/Decoder); no tensor shape shows it, so its weights would load and compute "
                        "something else: "
                        f"{params_hint(autoencoder, model)}")
    bad = [k for k, v in converted.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"import: {src} holds non-finite values in {len(bad)} autoencoder tensor(s) "
                        f"({', '.join(found.name(found.prefix + origin[k]) for k in bad[:4])}); nothing was "
                        "written")


def group(key: str, depth: int) -> str:
    parts = key.split(".")
    return ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")


def counted(keys: tp.Iterable[str], depth: int) -> str:
    return ", ".join(f"{g} ({n})" if g.endswith("*") else g
                     for g, n in sorted(Counter(group(k, depth) for k in keys).items()))


def mapping_lines(converted: Tensors, origin: dict[str, str], autoencoder: Tensors) -> list[str]:
    """Source prefix → our prefix, one line per pair, like the accelerate import's report."""
    def head(key: str) -> str:
        return group(key, 2 if key.count(".") >= 2 else 1)

    pairs = Counter((head(origin[k]), head(k)) for k in converted)
    lines = [f"    {src:<28} {n:>5} → {dst}" for (src, dst), n in sorted(pairs.items())]
    reshaped = sum(converted[k].shape != autoencoder[origin[k]].shape for k in converted)
    if reshaped:
        lines.append(f"    {reshaped} attention weights: 1×1 convolutions → linear layers (same values)")
    return lines


def denoiser_lines(parts: Parts, cfg: Config) -> list[str]:
    """Why the LDM's denoiser stays behind, and what exactly that is."""
    from radiodiff_resume.config import get_target
    from radiodiff_resume.models.radiodiff_unet import RadioDiffUNet

    numel = sum(t.numel() for t in parts.denoiser.values())
    what = f"not imported: the denoiser, model.* ({len(parts.denoiser)} tensors, {numel:,} parameters): "
    if get_target(cfg.model.unet.target) is RadioDiffUNet:
        why = ("--out names a first-stage weights file, so only the first stage is imported; without it (or "
               "with --out DIR) `import` brings the whole run in, denoiser, optimizer and EMA included")
    else:
        why = ("RadioDiff's conditional Swin U-Net (mask_cond_unet.Unet: a Swin-B condition backbone feeding "
               "a U-Net through window-attention relation layers) is not part of this project's default "
               f"network, and this config's ({cfg.model.unet.target} with {cfg.model.cond_encoder.target}) "
               "is another architecture with no tensor-for-tensor counterpart; `train` trains our denoiser "
               "from scratch on the imported first stage (with model.unet.target="
               "radiodiff_resume.models.radiodiff_unet.RadioDiffUNet, RadioDiff's network, `import` brings "
               "the whole run in)")
    lines = [what + why]
    by_group: dict[str, list[torch.Tensor]] = {}
    for key, tensor in parts.denoiser.items():
        by_group.setdefault(group(key, 2), []).append(tensor)
    width = max([28, *map(len, by_group)])
    lines += [f"    {g:<{width}} {len(ts):>5} tensors {sum(t.numel() for t in ts):>12,} parameters"
              for g, ts in sorted(by_group.items())]
    return lines


def unused_line(ckpt: dict[str, tp.Any], found: Found, parts: Parts) -> str:
    run = [str(k) for k in ckpt if k not in (found.entry, "model")]
    online = found.entry == "ema" and "model" in ckpt
    used = [
        *(["model (the online weights; the EMA is imported)"] if online else []),
        *([f"{', '.join(run)} (RadioDiff's run state: a first stage is imported as frozen weights, not as a "
           "run to continue)"] if run else []),
        *([f"ema's {counted(parts.outside, 1)}"] if parts.outside else []),
        *([f"{found.entry}'s {counted(parts.other, 2)}"] if parts.other and not found.ldm else []),
    ]
    return f"not used: {'; '.join(used) or 'nothing'}"


def ldm_buffers_line(parts: Parts) -> list[str]:
    if not parts.other:
        return []
    scale = parts.other.get("scale_factor")
    value = f", scale_factor {float(scale):.6g}" if scale is not None and scale.numel() == 1 else ""
    return [f"not imported either: {counted(parts.other, 2)} (the rest of RadioDiff's LDM: diffusion "
            f"buffers{value}; ours come from this config's model.* settings, and model.scale_by_std measures "
            "scale_factor anew)"]


def out_path(args: argparse.Namespace) -> tuple[list[str], str | None]:
    """The overrides with ``--out`` folded in as ``model.first_stage.ckpt_path``."""
    overrides = list(args.overrides)
    if args.out is None:
        return overrides, None
    if not args.out.endswith(".safetensors"):
        raise UserError(f"import: --out {args.out}: for a RadioDiff checkpoint --out is the .safetensors "
                        "file to write the first stage to")
    if any(o.startswith("model.first_stage.ckpt_path=") for o in overrides):
        raise UserError("import: give the output file once: --out FILE or model.first_stage.ckpt_path=")
    out = str(Path(args.out).expanduser().resolve())
    return [*overrides, f"model.first_stage.ckpt_path={out}"], out


NO_DATA_ROOT = "data.root=(not read when importing first-stage weights)"


def import_radiodiff(src: Path, args: argparse.Namespace, ckpt: tp.Any = None) -> list[str]:
    """Read (unless the caller already has, ``ckpt``), convert, load strictly, write atomically, read back;
    the report's lines."""
    from diffusers import AutoencoderKL

    from radiodiff_resume.build import build_first_stage, load_first_stage_weights
    from radiodiff_resume.config import load_config
    from radiodiff_resume.io import save_tensors_atomic

    overrides, given = out_path(args)
    # Only the model section is used: a RadioDiff yaml, whose dataset folder is hard-coded in its code,
    # must not need data.root for this (a data.root the user gives still wins).
    cfg = load_config(args.cfg, [NO_DATA_ROOT, *overrides])
    out = Path(tp.cast(str, cfg.model.first_stage.ckpt_path))
    if out.is_dir() or (out.exists() and not args.force):
        raise UserError(f"import: {out} ({'--out' if given else 'model.first_stage.ckpt_path'}) already "
                        f"exists{' and is a folder' if out.is_dir() else '; pass --force to replace it'}, or "
                        "--out another .safetensors file")
    ckpt = load_pickled(src) if ckpt is None else ckpt
    found = find_autoencoder(ckpt, src)
    parts = split(found)
    model = build_first_stage(cfg)
    if not isinstance(model, AutoencoderKL):
        raise UserError(f"import: model.first_stage.target is {cfg.model.first_stage.target}; RadioDiff's "
                        "autoencoder converts to diffusers.AutoencoderKL only")
    converted, origin = to_diffusers(parts.autoencoder, model.config)
    check_fits(src, found, parts.autoencoder, converted, origin, model)
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    save_tensors_atomic(out, state, metadata={"imported_from": str(src.resolve()),
                                              "weights": found.name(found.prefix + "*")})
    load_first_stage_weights(build_first_stage(cfg), out)

    step = ckpt.get("step")
    what = "LDM checkpoint (train_cond_ldm.py)" if found.ldm else "first-stage checkpoint (train_vae.py)"
    lines = [f"import: RadioDiff {what} {src.resolve()}{f' at step {step}' if isinstance(step, int) else ''}",
             *found.notes,
             f"first stage: {found.name(found.prefix + '*')} ({len(parts.autoencoder)} tensors"
             f"{', RadioDiff EMA' if found.entry == 'ema' else ''}) → our {cfg.model.first_stage.target}, by "
             "diffusers' convert_ldm_vae_checkpoint (shapes and dtypes equal, bit for bit, strict load):",
             *mapping_lines(converted, origin, parts.autoencoder)]
    if parts.losses:
        lines.append(f"  dropped: {len(parts.losses)} tensors of the training loss beside the autoencoder "
                     "(not part of it; ours trains with its own):")
        losses = Counter(group(k, 2) for k in parts.losses)
        width = max([28, *map(len, losses)])
        described = {g: LOSS_PARTS.get(g.removesuffix(".*").partition(".")[2], "") for g in losses}
        lines += [f"    {g:<{width}} {n:>5}  {described[g]}".rstrip() for g, n in sorted(losses.items())]
    if parts.denoiser:
        lines += denoiser_lines(parts, cfg)
    if found.ldm:
        lines += ldm_buffers_line(parts)
    params = sum(t.numel() for t in state.values())
    train = ["radiodiff-resume", "train", "--cfg", args.cfg, *overrides]
    if given is None:
        train.append(f"model.first_stage.ckpt_path={out}")
    return [*lines, unused_line(ckpt, found, parts),
            f"written: {out} ({len(state)} tensors, {params:,} parameters; read back strictly by the loader "
            "`train` uses)",
            f"train with: {shlex.join(train)}"]
