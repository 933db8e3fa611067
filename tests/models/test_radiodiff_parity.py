"""Parity with upstream RadioDiff, on upstream's own outputs (``tests/models/oracle.py``): the first stage
(encode, decode), the training loss of each objective variant and the sampler, with ``fill.py``'s weights,
float32 on the CPU, within the tolerances the oracle recommends."""

from __future__ import annotations

import dataclasses
import typing as tp
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from radiodiff_resume.build import build_ldm
from radiodiff_resume.compat.radiodiff_ckpt import AUTOENCODER, to_diffusers
from radiodiff_resume.config import Config, build_config
from radiodiff_resume.models.ldm import ConditionalLDM
from radiodiff_resume.models.swin import StochasticDepth
from tests.conftest import tiny_raw
from tests.models import oracle

pytestmark = pytest.mark.slow  # the full-size networks (a 225M-parameter LDM): minutes on 2 CPU cores

FIRST_STAGE = "first_stage_model."
RADIODIFF_AUTOENCODER = {
    # configs/radio_train.yaml's first stage (RadioDiff's ddconfig: ch 128, ch_mult [1, 2, 4], 2 res
    # blocks, z 3, one input and one output channel), as our diffusers.AutoencoderKL params
    "block_out_channels": [128, 256, 512], "layers_per_block": 2, "latent_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "norm_num_groups": 32, "in_channels": 1, "out_channels": 1,
}


@pytest.fixture(scope="module", autouse=True)
def threads() -> tp.Iterator[None]:
    """The oracle was made with 2 threads; its tolerances cover 1 vs 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def radiodiff_first_stage() -> AutoencoderKL:
    """Our first stage with upstream's first-stage weights, converted as ``radiodiff-resume import`` does."""
    weights = {k[len(FIRST_STAGE):]: v for k, v in oracle.filled(FIRST_STAGE).items()
               if k[len(FIRST_STAGE):].split(".")[0] in AUTOENCODER}
    model = AutoencoderKL(**RADIODIFF_AUTOENCODER)
    converted, _ = to_diffusers(weights, model.config)
    model.load_state_dict(converted, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def first_stage() -> AutoencoderKL:
    return radiodiff_first_stage()


def test_first_stage_encodes_as_upstream(first_stage: AutoencoderKL) -> None:
    with torch.no_grad():
        posterior = first_stage.encode(oracle.inputs()["fs.image"]).latent_dist
    oracle.check("fs.encode.mean", posterior.mean)
    oracle.check("fs.encode.logvar", posterior.logvar)


def test_first_stage_decodes_as_upstream(first_stage: AutoencoderKL) -> None:
    with torch.no_grad():
        oracle.check("fs.decode", first_stage.decode(oracle.inputs()["fs.latent"]).sample)


RADIO_TRAIN_UNET: dict[str, tp.Any] = {
    # configs/radio_train.yaml's model.unet section (the same at HEAD and in the paper release)
    "dim": 128, "cond_net": "swin", "fix_bb": False, "channels": 3, "out_mul": 1, "dim_mults": [1, 2, 4, 4],
    "cond_in_dim": 3, "cond_dim": 128, "cond_dim_mults": [2, 4],
    "window_sizes1": [[8, 8], [4, 4], [2, 2], [1, 1]], "window_sizes2": [[8, 8], [4, 4], [2, 2], [1, 1]],
    "fourier_scale": 16, "cond_pe": False, "num_pos_feats": 128, "cond_feature_size": [80, 80],
    "input_size": [80, 80], "without_pretrain": True,
}
OBJECTIVE = {"head": "radiodiff", "v1": "radiodiff_paper"}
"""Upstream's current LatentDiffusion loss, and the paper release's (its weights whatever the flag)."""


def radiodiff_config(tmp: Path, cache: Path, variant: str) -> Config:
    """radio_train.yaml's model as our config, built by the same builder ``train`` uses."""
    raw = tiny_raw(tmp, cache)
    fs = {k: v for k, v in RADIODIFF_AUTOENCODER.items() if k not in ("in_channels", "out_channels")}
    raw["model"]["first_stage"]["params"] = fs
    raw["model"]["unet"] = {"target": "radiodiff_resume.models.radiodiff_unet.RadioDiffUNet",
                            "params": {**RADIO_TRAIN_UNET, "variant": variant}}
    raw["model"].update(objective=OBJECTIVE[variant], scale_by_std=True, default_scale=True,
                        scale_factor=0.3, sampling_timesteps=5)
    raw["data"]["image_size"] = 256
    return build_config(raw)


def radiodiff_ldm(tmp: Path, cache: Path, variant: str) -> ConditionalLDM:
    cfg = radiodiff_config(tmp, cache, variant)
    ldm = build_ldm(cfg, radiodiff_first_stage())
    unet = {k[len("model."):]: v for k, v in oracle.filled("model.", variant).items()}
    ldm.unet.load_state_dict(unet, strict=True)
    return ldm.eval()


@pytest.fixture(scope="module")
def ldms(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> dict[str, ConditionalLDM]:
    tmp = tmp_path_factory.mktemp("radiodiff")
    return {v: radiodiff_ldm(tmp / v, synth_cache, v) for v in ("head", "v1")}


def test_the_config_builds_upstreams_state(ldms: dict[str, ConditionalLDM]) -> None:
    """Our LDM holds upstream's U-Net under the same names and the scale factor RadioDiff's yaml fixes."""
    for variant, ldm in ldms.items():
        ours = {k[len("unet."):]: v for k, v in ldm.state_dict().items() if k.startswith("unet.")}
        theirs = oracle.model_entries("model.", variant)
        assert [(k, list(v.shape), str(v.dtype)) for k, v in ours.items()] == \
            [(e[0][len("model."):], e[1], e[2]) for e in theirs]
        assert float(ldm.scale_factor) == pytest.approx(0.3)
        assert ldm.takes_condition and not list(ldm.cond_encoder.parameters())
    unused = {n for n, p in ldms["head"].unet.named_parameters() if not p.requires_grad}
    assert unused == {"time_mlp.0.W", "init_conv_mask.norm.weight", "init_conv_mask.norm.bias",
                      "init_conv_mask.head.weight", "init_conv_mask.head.bias",
                      "init_conv_carK.weight", "init_conv_carK.bias"}, "frozen: what no forward reaches"


class Captured(tp.NamedTuple):
    loss: torch.Tensor
    x_noisy: torch.Tensor
    t: torch.Tensor
    drift: torch.Tensor
    noise_pred: torch.Tensor


def training_loss(ldm: ConditionalLDM, generator: torch.Generator) -> Captured:
    """``ldm``'s training loss on the oracle's batch, with what its U-Net saw and returned."""
    seen: list[tp.Any] = []
    hook = ldm.unet.register_forward_hook(lambda _m, args, out: seen.append((args, out)))
    try:
        with torch.no_grad():
            loss = ldm(oracle.inputs()["batch.image"], oracle.inputs()["batch.cond"], generator=generator)
    finally:
        hook.remove()
    ((x_noisy, t, _cond), (drift, noise_pred)), = seen
    return Captured(loss, x_noisy, t, drift, noise_pred)


def set_mode(ldm: ConditionalLDM, mode: str) -> None:
    """Upstream's three modes: eval; train with dropout and stochastic depth off (BatchNorm on batch
    statistics); the Trainer's train mode."""
    ldm.train(mode != "eval")
    if mode == "train_nodrop":
        for module in ldm.modules():
            if isinstance(module, (nn.Dropout, StochasticDepth)):
                module.eval()


@pytest.fixture
def restored(ldms: dict[str, ConditionalLDM]) -> tp.Iterator[dict[str, ConditionalLDM]]:
    """Train-mode forwards move BatchNorm statistics: every test gets the filled ones back."""
    saved = {v: {k: b.clone() for k, b in ldm.named_buffers()} for v, ldm in ldms.items()}
    yield ldms
    for variant, ldm in ldms.items():
        for k, b in ldm.named_buffers():
            b.copy_(saved[variant][k])
        ldm.eval()


def other_weighting(ldm: ConditionalLDM, captured: Captured, seed: int) -> torch.Tensor:
    """The loss of the same forward with ``weighting_loss`` off: the targets replayed from the seed in
    upstream's order of draws (posterior sample, times, noise)."""
    generator = torch.Generator().manual_seed(seed)
    x0 = ldm.encode(oracle.inputs()["batch.image"], generator)
    assert ldm.const_sde is not None
    t = ldm.const_sde.sample_time(x0.shape[0], generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator)
    torch.testing.assert_close(t, captured.t, rtol=0, atol=0)
    unweighted = dataclasses.replace(ldm.const_sde, weighting_loss=False)
    return unweighted.loss(captured.drift, captured.noise_pred, x0, noise, t)


@pytest.mark.parametrize("mode", ["eval", "train_nodrop"])
def test_head_training_loss_is_upstreams(restored: dict[str, ConditionalLDM], mode: str) -> None:
    """Seed 1234, upstream's draws in upstream's order: the U-Net's inputs and outputs and the loss with
    ``weighting_loss`` on (the yaml's value) and off."""
    ldm = restored["head"]
    set_mode(ldm, mode)
    captured = training_loss(ldm, torch.Generator().manual_seed(1234))
    oracle.check("loss.t", captured.t)
    oracle.check("loss.x_noisy", captured.x_noisy)
    oracle.check(f"head.loss.{mode}.C_pred", captured.drift)
    oracle.check(f"head.loss.{mode}.noise_pred", captured.noise_pred)
    oracle.check(f"head.loss.{mode}.wl1.loss", captured.loss)
    oracle.check(f"head.loss.{mode}.wl0.loss", other_weighting(ldm, captured, 1234))
    if mode == "train_nodrop":
        bn = ldm.unet.relation_layers_down[0].input_conv1[1]
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            oracle.check(f"head.loss.train_nodrop.bn_after.{name}", getattr(bn, name))


@pytest.mark.parametrize("mode", ["eval", "train_nodrop"])
def test_paper_training_loss_is_upstreams(restored: dict[str, ConditionalLDM], mode: str) -> None:
    ldm = restored["v1"]
    set_mode(ldm, mode)
    oracle.check(f"v1.loss.{mode}.loss", training_loss(ldm, torch.Generator().manual_seed(1234)).loss)


def test_training_loss_with_dropout_draws_upstreams_random_numbers(
        restored: dict[str, ConditionalLDM]) -> None:
    """The Trainer's mode: stochastic depth and dropout draw from the global generator after the loss's
    three draws, so a loss drawn from that same generator is upstream's."""
    for variant, name in (("head", "head.loss.train.wl1.loss"), ("v1", "v1.loss.train.loss")):
        ldm = restored[variant]
        set_mode(ldm, "train")
        torch.manual_seed(1234)
        oracle.check(name, training_loss(ldm, torch.default_generator).loss)


class Sampled(tp.NamedTuple):
    times: list[float]
    """The time of each U-Net call."""
    decode_input: torch.Tensor
    """The latent the first stage decodes (upstream's ``z / scale_factor``)."""
    image: torch.Tensor
    """The map in [0, 1], as upstream's ``sample`` returns it."""


def sampled(ldm: ConditionalLDM, steps: int) -> Sampled:
    """``ldm.sample`` on the oracle's condition, seed 0, with what its U-Net and first stage saw (hooks)."""
    times: list[float] = []
    decoded: list[torch.Tensor] = []
    hooks = [ldm.unet.register_forward_pre_hook(lambda _m, args: times.append(float(args[1][0]))),
             ldm.first_stage.post_quant_conv.register_forward_pre_hook(
                 lambda _m, args: decoded.append(args[0].clone()))]
    try:
        with torch.no_grad():
            image = ldm.sample(oracle.inputs()["batch.cond"][0:1], torch.Generator().manual_seed(0), steps)
    finally:
        for hook in hooks:
            hook.remove()
    (decode_input,) = decoded
    return Sampled(times, decode_input, ((image + 1) / 2).clamp(0, 1))


@pytest.mark.parametrize("steps", [1, 5])
def test_head_sampler_is_upstreams(ldms: dict[str, ConditionalLDM], steps: int) -> None:
    """RadioDiff's sampler through ``ConditionalLDM.sample``: the times the U-Net sees (upstream's float32
    values, exactly), the latent decoded and the map."""
    out = sampled(ldms["head"], steps)
    expected = oracle.outputs()[f"head.sample.n{steps}.unet_t"].flatten()
    torch.testing.assert_close(torch.tensor(out.times), expected, rtol=0, atol=0,
                               msg="upstream's float32 times, exactly")
    oracle.check(f"head.sample.n{steps}.decode_input", out.decode_input)
    if steps == 5:
        oracle.check("head.sample.n5.image", out.image)
    else:
        image = out.image
        oracle.check("head.sample.n1.image_mean_std_min_max",
                     torch.stack([image.mean(), image.std(), image.min(), image.max()]))
        oracle.check("head.sample.n1.image_crop16", image[:, :, 112:128, 120:136])


def test_paper_sampler_is_upstreams(ldms: dict[str, ConditionalLDM]) -> None:
    oracle.check("v1.sample.n5.decode_input", sampled(ldms["v1"], 5).decode_input)
