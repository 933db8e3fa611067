"""Config → objects: datasets, first stage, LDM.

Anything a user plugs in with ``target``/``params`` is built here, and a bad
``params`` becomes a :class:`ConfigError` naming the key instead of a traceback.
"""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from radiodiff_resume.config import RADIODIFF_OBJECTIVES, Config, PluginConfig, get_target
from radiodiff_resume.data.radiomapseer import RadioMapSeer
from radiodiff_resume.data.synthetic import ensure_synthetic
from radiodiff_resume.errors import ConfigError, UserError
from radiodiff_resume.models.const_sde import ConstantSDE
from radiodiff_resume.models.ldm import ConditionalLDM

logger = logging.getLogger(__name__)


def instantiate(key: str, target: str, params: tp.Mapping[str, tp.Any], **derived: tp.Any) -> tp.Any:
    """Call ``target(**params, **derived)``; ``derived`` are values the builder owns."""
    clash = sorted(set(params) & set(derived))
    if clash:
        raise ConfigError(
            f"{key}.params: {', '.join(clash)} {'is' if len(clash) == 1 else 'are'} derived from "
            "the data and the first stage; remove it from the config"
        )
    try:
        return get_target(target)(**params, **derived)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {target}(**params) failed: {exc}; check {key}.params") from None


def dataset_root(cfg: Config) -> Path:
    """The RadioMapSeer folder: the user's, or the synthetic one (generated on first use)."""
    if cfg.data.root is not None:
        return Path(cfg.data.root).expanduser()
    s = cfg.data.synthetic
    return ensure_synthetic(s.cache_dir, s.num_maps, s.tx_per_map, s.seed, s.size,
                            simulations=(cfg.data.simulation,), cars=cfg.data.cars)


def build_datasets(cfg: Config, root: Path | None) -> tuple[Dataset, Dataset]:
    """Train and validation datasets (plugged-in ones when ``data.train`` is set)."""
    d = cfg.data
    if d.train is not None and d.validation is not None:
        return (
            _plugged("data.train", d.train),
            _plugged("data.validation", d.validation),
        )
    assert root is not None, "dataset_root() must be resolved for the built-in dataset"
    common = dict(
        root=root, image_size=d.image_size, val_fraction=d.val_fraction,
        split_seed=d.split_seed, simulation=d.simulation, split_mode=d.split, cars=d.cars,
    )
    return (
        RadioMapSeer(split="train", max_samples=d.max_train_samples, **common),
        RadioMapSeer(split="val", max_samples=d.max_val_samples, **common),
    )


def _plugged(key: str, plugin: PluginConfig) -> Dataset:
    dataset = instantiate(key, plugin.target, plugin.params)
    if len(dataset) == 0:
        raise ConfigError(f"{key}: {plugin.target} is empty")
    item = dataset[0]
    if not isinstance(item, dict) or "image" not in item or "cond" not in item:
        raise ConfigError(
            f"{key}: {plugin.target}[0] must be a dict with 'image' [1,H,W] and 'cond' [C,H,W] "
            f"tensors in [-1, 1]; got {type(item).__name__}"
        )
    return tp.cast(Dataset, dataset)


def build_first_stage(cfg: Config) -> nn.Module:
    fs = cfg.model.first_stage
    return tp.cast(
        nn.Module,
        instantiate(
            "model.first_stage", fs.target, fs.params,
            in_channels=1, out_channels=1, sample_size=cfg.data.image_size,
        ),
    )


def write_untrained_first_stage(cfg: Config, seed: int = 0) -> Path:
    """Save a randomly initialised first stage at ``model.first_stage.ckpt_path``.

    For smoke tests and benchmarks of the LDM stage that must not spend time on stage 1;
    the global RNG is left as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        first_stage = build_first_stage(cfg)
    path = Path(tp.cast(str, cfg.model.first_stage.ckpt_path))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in first_stage.state_dict().items()}, str(path))
    return path


def latent_geometry(first_stage: nn.Module, image_size: int) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the latent, measured by encoding a blank image."""
    with torch.no_grad():
        was_training = first_stage.training
        z = first_stage.eval().encode(torch.zeros(1, 1, image_size, image_size)).latent_dist.mode()
        first_stage.train(was_training)
    return int(z.shape[1]), int(z.shape[2]), int(z.shape[3])


def load_first_stage_weights(first_stage: nn.Module, path: Path) -> None:
    """Strict load of the first-stage ``.safetensors``: every key must match."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"first-stage weights {path} cannot be read ({exc}); delete the file and set "
            "model.first_stage.train_if_missing=true to retrain it, or point "
            "model.first_stage.ckpt_path at a good file"
        ) from None
    own = first_stage.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)} (e.g. {'; '.join(shapes[:3])})")
        raise UserError(
            f"first-stage weights {path} do not fit model.first_stage ({'; '.join(parts)}); "
            "the file was trained with other model.first_stage.params: use matching params or "
            "retrain it"
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(
            f"first-stage weights {path} hold non-finite values in {len(bad)} tensor(s) (e.g. "
            f"{', '.join(bad[:3])}): a model trained from them would be NaN; retrain the first stage or "
            "point model.first_stage.ckpt_path at an earlier export"
        )
    cast = sorted({f"{state[k].dtype} → {own[k].dtype}" for k in state if state[k].dtype != own[k].dtype})
    if cast:
        logger.warning("first stage: %s holds other dtypes than the model (%s); values are converted on "
                       "load", path, ", ".join(cast))
    first_stage.load_state_dict(state)


def build_ldm(cfg: Config, first_stage: nn.Module) -> ConditionalLDM:
    m = cfg.model
    channels, height, width = latent_geometry(first_stage, cfg.data.image_size)
    downsample = cfg.data.image_size // height
    radiodiff = m.objective in RADIODIFF_OBJECTIVES
    if getattr(get_target(m.unet.target), "takes_condition", False):
        unet, cond_encoder = _conditioning_unet(cfg, (channels, height, width)), nn.Identity()
        what = f"the raw {cfg.data.image_size}x{cfg.data.image_size} condition into {m.unet.target}"
    else:
        cond_encoder = instantiate(
            "model.cond_encoder", m.cond_encoder.target, m.cond_encoder.params,
            in_channels=3, downsample=downsample,
        )
        cond_channels = _out_channels(cond_encoder, cfg.data.image_size)
        unet = instantiate(
            "model.unet", m.unet.target, m.unet.params,
            sample_size=height, in_channels=channels + cond_channels,
            out_channels=2 * channels if radiodiff else channels,  # radiodiff: drift C and noise
        )
        what = f"condition features {cond_channels} channels"
    scheduler = DDPMScheduler(
        num_train_timesteps=m.timesteps,
        beta_schedule=m.beta_schedule,
        prediction_type=m.prediction_type,
        clip_sample=False,
    )
    logger.info("latent %dx%dx%d (downsample %d), %s", channels, height, width, downsample, what)
    return ConditionalLDM(
        first_stage, unet, cond_encoder, scheduler, (channels, height, width),
        scale_factor=m.scale_factor, loss_type=m.loss_type,
        sampling_timesteps=m.sampling_timesteps,
        const_sde=ConstantSDE(eps=m.eps, loss_type=m.loss_type, weighting_loss=m.weighting_loss,
                              use_l1=m.use_l1, weighting="paper" if m.objective == "radiodiff_paper"
                              else "radiodiff") if radiodiff else None,
    )


def _conditioning_unet(cfg: Config, latent: tuple[int, int, int]) -> nn.Module:
    """A denoiser that encodes the raw condition itself (RadioDiff's network): its params are the
    user's as they are (upstream's names), checked against the latent it will see. Parameters its forward
    never reaches (upstream's unused Swin head, say) are frozen, so that DDP does not wait for their
    gradients; upstream's AdamW never changes them either (no gradient, no step)."""
    m = cfg.model
    if m.objective not in RADIODIFF_OBJECTIVES:
        raise ConfigError(f"model.unet.target: {m.unet.target} predicts RadioDiff's drift and noise; set "
                          "model.objective=radiodiff (or radiodiff_paper)")
    unet = instantiate("model.unet", m.unet.target, m.unet.params)
    channels, height, width = latent
    if getattr(unet, "channels", channels) != channels:
        raise ConfigError(f"model.unet.params.channels: got {unet.channels}, but the first stage's latent "
                          f"has {channels} channels; set model.unet.params.channels={channels}")
    try:
        unet.check_latent_size(height, width)
    except ValueError as exc:
        raise ConfigError(f"model.unet.params / data.image_size={cfg.data.image_size}: {exc}") from None
    for name in getattr(unet, "unused_parameters", list)():
        unet.get_parameter(name).requires_grad_(False)
    return tp.cast(nn.Module, unet)


def _out_channels(cond_encoder: nn.Module, image_size: int) -> int:
    with torch.no_grad():
        was_training = cond_encoder.training
        out = cond_encoder.eval()(torch.zeros(1, 3, image_size, image_size))
        cond_encoder.train(was_training)
    return int(out.shape[1])
