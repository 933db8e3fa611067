"""The conditional LDM built from diffusers parts: shapes, BatchNorm, scale_factor buffer."""

from __future__ import annotations

import typing as tp

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel
from torch import nn

from radiodiff_resume.build import build_first_stage, build_ldm, latent_geometry
from radiodiff_resume.config import build_config
from radiodiff_resume.errors import ConfigError
from radiodiff_resume.models.ldm import ConditionalLDM, ConditionEncoder
from tests.conftest import tiny_raw


@pytest.fixture
def ldm(make_cfg) -> ConditionalLDM:
    cfg = make_cfg()
    torch.manual_seed(0)
    return build_ldm(cfg, build_first_stage(cfg))


def test_built_from_diffusers_parts_with_batchnorm_condition_encoder(ldm: ConditionalLDM) -> None:
    assert isinstance(ldm.first_stage, AutoencoderKL)
    assert isinstance(ldm.unet, UNet2DModel)
    assert any(isinstance(m, nn.BatchNorm2d) for m in ldm.cond_encoder.modules())
    assert ldm.latent_shape == (3, 8, 8)
    assert ldm.unet.config.in_channels == 3 + 2


def test_only_denoiser_and_condition_encoder_train(ldm: ConditionalLDM) -> None:
    assert not any(p.requires_grad for p in ldm.first_stage.parameters())
    trainable = {id(p) for p in ldm.trainable_modules().parameters()}
    assert trainable == {id(p) for p in ldm.parameters() if p.requires_grad}
    ldm.train()
    assert not ldm.first_stage.training and ldm.cond_encoder.training


def test_forward_is_the_loss_and_sample_has_image_shape(ldm: ConditionalLDM) -> None:
    image, cond = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss = ldm(image, cond, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert ldm.unet.conv_out.weight.grad is not None
    assert ldm.first_stage.encoder.conv_in.weight.grad is None
    ldm.eval()
    out = ldm.sample(cond, generator=torch.Generator().manual_seed(0), steps=2)
    assert out.shape == (2, 1, 32, 32)
    assert out.min() >= -1 and out.max() <= 1


def test_forward_randomness_comes_only_from_the_generator(ldm: ConditionalLDM) -> None:
    image, cond = torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    ldm.eval()
    a = ldm(image, cond, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    b = ldm(image, cond, generator=torch.Generator().manual_seed(5))
    c = ldm(image, cond, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scale_factor_is_a_persistent_buffer_that_round_trips(make_cfg, ldm: ConditionalLDM) -> None:
    assert "scale_factor" in ldm.state_dict()
    ldm.set_scale_factor(0.18215)
    state = ldm.state_dict()
    cfg = make_cfg()
    other = build_ldm(cfg, build_first_stage(cfg))
    assert float(other.scale_factor) == 1.0
    other.load_state_dict(state)
    assert float(other.scale_factor) == pytest.approx(0.18215)
    del state["scale_factor"]
    with pytest.raises(RuntimeError, match="scale_factor"):
        other.load_state_dict(state)


def test_scale_factor_scales_latents(ldm: ConditionalLDM) -> None:
    image = torch.rand(1, 1, 32, 32)
    ldm.set_scale_factor(1.0)
    z1 = ldm.encode(image, torch.Generator().manual_seed(0))
    ldm.set_scale_factor(0.5)
    z2 = ldm.encode(image, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z2, z1 * 0.5)


def test_condition_encoder_reaches_the_latent_grid() -> None:
    enc = ConditionEncoder(in_channels=3, out_channels=4, hidden_channels=[8], downsample=8)
    assert enc(torch.zeros(2, 3, 64, 64)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="power of two"):
        ConditionEncoder(downsample=3)


def test_latent_geometry_is_measured(make_cfg) -> None:
    cfg = make_cfg()
    assert latent_geometry(build_first_stage(cfg), 32) == (3, 8, 8)


def test_bad_plugin_params_name_the_key(make_cfg) -> None:
    cfg = make_cfg("model.unet.params.no_such_argument=1")
    with pytest.raises(ConfigError, match=r"model\.unet: diffusers\.UNet2DModel\(\*\*params\) failed"):
        build_ldm(cfg, build_first_stage(cfg))
    cfg = make_cfg("model.unet.params.in_channels=7")
    with pytest.raises(ConfigError, match=r"model\.unet\.params: in_channels is derived"):
        build_ldm(cfg, build_first_stage(cfg))


class TinyDenoiser(nn.Module):
    """A user's own denoiser, plugged in with target/params."""

    def __init__(self, in_channels: int, out_channels: int, sample_size: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_user_denoiser_plugs_in_with_target_params(tmp_path, synth_cache) -> None:
    raw = tiny_raw(tmp_path, synth_cache)
    raw["model"]["unet"] = {"target": f"{__name__}.TinyDenoiser", "params": {"width": 5}}
    cfg = build_config(raw)
    model = build_ldm(cfg, build_first_stage(cfg))
    assert isinstance(model.unet, TinyDenoiser)
    loss = model(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_the_frozen_first_stage_runs_in_fp32_under_autocast(ldm: ConditionalLDM) -> None:
    """Autoencoders overflow in fp16, and scale_factor is measured in fp32: encode and decode leave
    autocast off whatever the trainer's mixed precision (shown with bf16, which a CPU can run)."""
    ldm.eval()
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    plain = (ldm.encode_mode(image), ldm.latent_moments(image, torch.Generator().manual_seed(1)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ldm.encode_mode(image)
        moments = ldm.latent_moments(image, torch.Generator().manual_seed(1))
        sampled = ldm.encode(image, torch.Generator().manual_seed(2))
        out = ldm.decode(z)
    assert z.dtype == sampled.dtype == out.dtype == torch.float32
    assert torch.equal(z, plain[0]) and torch.equal(moments, plain[1]), "bit for bit the fp32 result"
    assert torch.equal(out, ldm.decode(plain[0]))


def test_ddim_keeps_its_latent_trajectory_in_fp32_under_autocast(
    ldm: ConditionalLDM, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import DDIMScheduler

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    step = DDIMScheduler.step

    def spy(self: DDIMScheduler, model_output: torch.Tensor, timestep: tp.Any, sample: torch.Tensor,
            *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        seen.append((model_output.dtype, sample.dtype))
        return step(self, model_output, timestep, sample, *args, **kwargs)

    monkeypatch.setattr(DDIMScheduler, "step", spy)
    ldm.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ldm.sample(torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0), steps=3)
    assert seen == [(torch.float32, torch.float32)] * 3
    assert out.dtype == torch.float32


def test_probe_uses_no_loss_setting(make_cfg) -> None:
    """The probe is a function of the state alone: another loss type, prediction type or noise
    schedule in the config gives the same value on the same inputs."""
    values = []
    for overrides in ((), ("model.loss_type=l1", "model.prediction_type=v_prediction",
                           "model.beta_schedule=squaredcos_cap_v2")):
        cfg = make_cfg(*overrides)
        torch.manual_seed(0)
        model = build_ldm(cfg, build_first_stage(cfg)).eval()
        inputs = model.probe_inputs(torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3)),
                                    torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
                                    torch.Generator().manual_seed(5))
        values.append(model.probe(**inputs))
    assert values[0].dtype == torch.float64 and torch.isfinite(values[0])
    assert torch.equal(values[0], values[1])
