"""``radiodiff-resume import model-N.pt``: RadioDiff checkpoints → our first stage's weights.

The checkpoints are built here in RadioDiff's layout without RadioDiff's code: a real diffusers
``AutoencoderKL`` of our config, renamed to latent-diffusion's module names (the inverse of diffusers'
conversion, written out below from RadioDiff's ``encoder_decoder.py`` structure), saved as its trainers do.
The import must give back the EMA weights bit for bit, say what it left out and why, and refuse in one line
files that would run code, weights that do not fit, and an existing output.
"""

from __future__ import annotations

import pickle
import re
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from radiodiff_resume.build import build_first_stage, load_first_stage_weights
from radiodiff_resume.cli import main
from radiodiff_resume.config import Config, build_config
from tests.conftest import tiny_raw
from tests.tools.conftest import RunsCode

Tensors = dict[str, torch.Tensor]

LEVELS = 3
RESHAPED = 8
"""Attention q, k, v and output weights of the encoder's and the decoder's mid block."""
LOSS = {
    "discriminator.main.0.weight": (16, 1, 4, 4), "discriminator.main.0.bias": (16,),
    "discriminator.main.2.weight": (32, 16, 4, 4), "discriminator.main.3.running_mean": (32,),
    "perceptual_loss.scaling_layer.shift": (1, 3, 1, 1), "perceptual_loss.net.slice1.0.weight": (8, 3, 3, 3),
    "perceptual_loss.lin0.model.1.weight": (1, 8, 1, 1), "logvar": (),
}
"""What RadioDiff's LPIPSWithDiscriminator holds, in small shapes."""
DENOISER = {
    "model.init_conv_mask.features.0.0.weight": (16, 3, 4, 4), "model.init_conv_mask.norm.weight": (16,),
    "model.init_conv.0.weight": (8, 19, 7, 7), "model.time_mlp.1.weight": (32, 8),
    "model.downs.0.0.block1.proj.weight": (8, 8, 3, 3), "model.relation_layers_down.0.input_conv1.0.weight":
    (8, 8, 1, 1), "model.final_conv.weight": (3, 8, 1, 1),
}
"""A few tensors of RadioDiff's conditional Swin U-Net, under the LDM's ``model.`` prefix."""


def ldm_layout(diffusers: Tensors) -> Tensors:
    """diffusers ``AutoencoderKL`` names → latent-diffusion's (RadioDiff's Encoder/Decoder/quant convs)."""
    def rename(key: str) -> str:
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{LEVELS - 1 - int(m[1])}.block.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{LEVELS - 1 - int(m[1])}.upsample.", key)
        key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
        for theirs, ours in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                             ("to_out.0", "proj_out")):
            key = key.replace(f".mid_block.attentions.0.{theirs}.", f".mid.attn_1.{ours}.")
        return key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")

    return {rename(k): v[:, :, None, None] if ".attn_1." in rename(k) and v.ndim == 2 else v
            for k, v in diffusers.items()}


def fake(shapes: dict[str, tuple[int, ...]], prefix: str, seed: int) -> Tensors:
    generator = torch.Generator().manual_seed(seed)
    return {prefix + k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}


@dataclass
class RadioDiff:
    cfg: Path
    config: Config
    vae: Path
    """train_vae.py's model-3.pt: model, ema (different values), opt_ae, opt_disc, schedulers, step."""
    ldm: Path
    """train_cond_ldm.py's model-2.pt as it saves by default: only model."""
    online: Tensors
    ema: Tensors


@pytest.fixture(scope="module")
def radiodiff(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> RadioDiff:
    root = tmp_path_factory.mktemp("radiodiff")
    raw = tiny_raw(root / "run", synth_cache)
    raw["model"]["first_stage"]["params"].update(block_out_channels=[32, 32, 64], norm_num_groups=32)
    (root / "tiny.yaml").write_text(yaml.safe_dump(raw))
    config = build_config(raw)
    torch.manual_seed(0)
    online_model = build_first_stage(config)
    torch.manual_seed(1)
    ema = {k: v.clone() for k, v in build_first_stage(config).state_dict().items()}
    opt_ae = torch.optim.AdamW(online_model.parameters(), lr=1e-4)
    sum(p.square().sum() for p in online_model.parameters()).backward()
    opt_ae.step()
    online = {k: v.clone() for k, v in online_model.state_dict().items()}
    disc = torch.nn.Conv2d(1, 16, 4)
    opt_disc = torch.optim.AdamW(disc.parameters(), lr=1e-4)
    model = {**ldm_layout(online), **fake(LOSS, "loss.", 2), **fake(LOSS, "loss_pinn.", 3)}
    torch.save({
        "step": 3, "model": model, "opt_ae": opt_ae.state_dict(),
        "lr_scheduler_ae": torch.optim.lr_scheduler.LambdaLR(opt_ae, lambda i: 1.0).state_dict(),
        "opt_disc": opt_disc.state_dict(), "scaler": None,
        "ema": {"initted": torch.tensor(True), "step": torch.tensor(3),
                **{f"online_model.{k}": v for k, v in model.items()},
                **{f"ema_model.{k}": v for k, v in {**ldm_layout(ema), **fake(LOSS, "loss.", 4)}.items()}},
    }, root / "model-3.pt")
    torch.save({"model": {
        **{f"first_stage_model.{k}": v for k, v in model.items()}, **fake(DENOISER, "", 5),
        "betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.rand(1000),
        "scale_factor": torch.tensor(0.3),
    }}, root / "ldm-model-2.pt")
    return RadioDiff(root / "tiny.yaml", config, root / "model-3.pt", root / "ldm-model-2.pt", online, ema)


def import_here(capsys: pytest.CaptureFixture[str], src: Path, cfg: Path,
                *args: str | Path) -> tuple[int, str, str]:
    code = main(["import", str(src), "--cfg", str(cfg), *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_first_stage_checkpoint_gives_the_ema_weights(radiodiff: RadioDiff,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    target = Path(tp.cast(str, radiodiff.config.model.first_stage.ckpt_path))
    code, out, err = import_here(capsys, radiodiff.vae, radiodiff.cfg)
    assert code == 0, err
    written = load_file(str(target))
    assert written.keys() == radiodiff.ema.keys()
    assert all(torch.equal(written[k], v) for k, v in radiodiff.ema.items())
    assert not torch.equal(written["encoder.conv_in.weight"], radiodiff.online["encoder.conv_in.weight"])
    load_first_stage_weights(build_first_stage(radiodiff.config), target)

    assert f"import: RadioDiff first-stage checkpoint (train_vae.py) {radiodiff.vae} at step 3" in out
    assert (f"first stage: ema['ema_model.*'] ({len(radiodiff.ema)} tensors, RadioDiff EMA) → our "
            "diffusers.AutoencoderKL") in out
    assert re.search(r"encoder\.down\.\* +\d+ → encoder\.down_blocks\.\*", out)
    assert re.search(r"decoder\.norm_out\.\* +2 → decoder\.conv_norm_out\.\*", out)
    assert f"{RESHAPED} attention weights: 1×1 convolutions → linear layers (same values)" in out
    assert "dropped: 8 tensors of the training loss" in out
    assert re.search(r"loss\.discriminator\.\* +4  PatchGAN discriminator", out)
    assert re.search(r"loss\.perceptual_loss\.\* +3  LPIPS", out)
    assert re.search(r"loss\.logvar +1  learned log-variance", out)
    assert "model (the online weights; the EMA is imported)" in out
    assert "step, opt_ae, lr_scheduler_ae, opt_disc, scaler (RadioDiff's run state" in out
    assert "ema's initted, online_model.* (" in out
    assert f"written: {target} ({len(radiodiff.ema)} tensors" in out
    assert out.splitlines()[-1] == (f"train with: radiodiff-resume train --cfg {radiodiff.cfg} "
                                    f"model.first_stage.ckpt_path={target}")


def test_ldm_checkpoint_gives_its_first_stage_and_explains_the_denoiser(
        radiodiff: RadioDiff, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "ae.safetensors"
    code, out, err = import_here(capsys, radiodiff.ldm, radiodiff.cfg, "--out", target)
    assert code == 0, err
    written = load_file(str(target))
    assert all(torch.equal(written[k], v) for k, v in radiodiff.online.items())

    assert "import: RadioDiff LDM checkpoint (train_cond_ldm.py)" in out
    assert ("EMA: the file has no ema entry (train_cond_ldm.py saves only model unless "
            "trainer.enable_resume); the online weights under model are imported") in out
    assert f"first stage: model['first_stage_model.*'] ({len(radiodiff.online)} tensors) →" in out
    assert "dropped: 16 tensors of the training loss" in out and "loss_pinn.discriminator.*" in out
    numel = sum(torch.Size(s).numel() for s in DENOISER.values())
    assert (f"not imported: the denoiser, model.* ({len(DENOISER)} tensors, {numel:,} parameters): "
            "RadioDiff's conditional Swin U-Net") in out
    assert "is not part of this project" in out and "no tensor-for-tensor counterpart" in out
    assert re.search(r"model\.init_conv_mask\.\* +2 tensors +784 parameters", out)
    assert "not imported either: alphas_cumprod, betas, scale_factor" in out
    assert "(the rest of RadioDiff's LDM: diffusion buffers, scale_factor 0.3; ours come from" in out
    assert out.splitlines()[-1] == (f"train with: radiodiff-resume train --cfg {radiodiff.cfg} "
                                    f"model.first_stage.ckpt_path={target}")


def test_a_pickle_that_runs_code_is_refused_unrun(radiodiff: RadioDiff, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    marker, src = tmp_path / "code-ran", tmp_path / "model-1.pt"
    torch.save({"model": RunsCode(marker)}, src)
    code, _, err = import_here(capsys, src, radiodiff.cfg, "--out", tmp_path / "ae.safetensors")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"refusing {src}: reading it needs full unpickling" in err
    assert not marker.exists() and not (tmp_path / "ae.safetensors").exists()


@pytest.mark.parametrize("content, expected", [
    (b"Run 30: model lost\n",
     "is not a readable torch file (damaged, truncated or not written by torch.save? IndexError"),
    (pickle.dumps({"model": {"encoder.conv_in.weight": [0.5]}}), "holds pickled data that would run no code"),
], ids=["text", "plain pickle"])
def test_a_file_that_is_no_torch_file_is_one_line(radiodiff: RadioDiff, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], content: bytes,
                                                  expected: str) -> None:
    """A text file and a plain pickle named model-N.pt: neither is said to carry code it does not carry."""
    src = tmp_path / "model-30.pt"
    src.write_bytes(content)
    code, _, err = import_here(capsys, src, radiodiff.cfg, "--out", tmp_path / "ae.safetensors")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{src} {expected}" in err and "runs whatever code" not in err, err


@pytest.mark.parametrize("setting, expected", [
    ("latent_channels=4", "tensor encoder.conv_out.weight is (6, 64, 3, 3) torch.float32 in "
                          "ema['ema_model.encoder.conv_out.weight'], (8, 64, 3, 3) torch.float32 in ours "
                          "(and 6 more); set model.first_stage.params.latent_channels=3 (RadioDiff's "),
    ("norm_num_groups=16", "norm_num_groups is 16, but RadioDiff's autoencoder computes with GroupNorm(32)"),
])
def test_weights_that_do_not_fit_are_refused(radiodiff: RadioDiff, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], setting: str,
                                             expected: str) -> None:
    code, _, err = import_here(capsys, radiodiff.vae, radiodiff.cfg, "--out", tmp_path / "ae.safetensors",
                               f"model.first_stage.params.{setting}")
    assert code == 2 and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "ae.safetensors").exists()


def test_an_existing_output_is_kept_unless_forced(radiodiff: RadioDiff, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "ae.safetensors"
    target.write_bytes(b"theirs")
    code, _, err = import_here(capsys, radiodiff.vae, radiodiff.cfg, "--out", target)
    assert code == 2 and err.count("\n") == 1 and "already exists; pass --force to replace it" in err, err
    assert target.read_bytes() == b"theirs"

    code, _, err = import_here(capsys, radiodiff.vae, radiodiff.cfg, "--out", target, "--force")
    assert code == 0, err
    assert all(torch.equal(load_file(str(target))[k], v) for k, v in radiodiff.ema.items())


def test_other_torch_files_and_outputs_are_refused(radiodiff: RadioDiff, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "weights.pth"
    torch.save({"state": {"w": torch.ones(1)}}, src)
    code, _, err = import_here(capsys, src, radiodiff.cfg, "--out", tmp_path / "ae.safetensors")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{src} is not a RadioDiff checkpoint: expected a dict whose model" in err and "found state" in err

    code, _, err = import_here(capsys, radiodiff.vae, radiodiff.cfg, "--out", tmp_path / "ae.pt")
    assert code == 2 and err.count("\n") == 1 and "--out is the .safetensors file" in err, err

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "optimizer.bin").write_bytes(b"")
    code, _, err = import_here(capsys, tmp_path / "state", radiodiff.cfg, "--force")
    assert code == 2 and err.count("\n") == 1 and "--force is for RadioDiff checkpoints" in err, err


def test_a_radiodiff_yaml_serves_as_the_config_without_a_data_root(
        radiodiff: RadioDiff, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RadioDiff's own first-stage yaml (its ddconfig describing the same autoencoder) is enough:
    import reads no data, so the dataset folder RadioDiff hard-codes need not be given."""
    fixture = Path(__file__).parents[1] / "compat" / "fixtures" / "radiodiff_first_stage.yaml"
    raw = yaml.safe_load(fixture.read_text())
    raw["model"]["ddconfig"].update(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1)
    theirs = tmp_path / "first_radio.yaml"
    theirs.write_text(yaml.safe_dump(raw))
    target = tmp_path / "ae.safetensors"
    code, out, err = import_here(capsys, radiodiff.vae, theirs, "--out", target)
    assert code == 0, err
    written = load_file(str(target))
    assert all(torch.equal(written[k], v) for k, v in radiodiff.ema.items())
    assert out.splitlines()[-1] == (f"train with: radiodiff-resume train --cfg {theirs} "
                                    f"model.first_stage.ckpt_path={target}")
