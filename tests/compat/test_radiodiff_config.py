"""RadioDiff configs load: recognised by shape, every key reported once, the keys whose meaning differs
translated so the run behaves as RadioDiff's, and the result builds and round-trips through
``convert-config``."""

from __future__ import annotations

import copy
import json
import logging
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from omegaconf import OmegaConf

from radiodiff_resume.build import build_first_stage, build_ldm, latent_geometry
from radiodiff_resume.cli import EXIT_USER_ERROR, main
from radiodiff_resume.compat import radiodiff_config as rc
from radiodiff_resume.config import Config, build_config, load_config, measures_scale_factor, to_dict
from radiodiff_resume.errors import ConfigError
from radiodiff_resume.run import train
from tests.conftest import REPO

FIXTURES = Path(__file__).parent / "fixtures"
LDM, FIRST_STAGE, DPMCAR = (FIXTURES / f"radiodiff_{n}.yaml" for n in ("ldm", "first_stage", "dpmcar"))
ROOT = "data.root=/data/RadioMapSeer"
SMALL = ["data.image_size=64", "model.first_stage.params.block_out_channels=[32,32,32]",
         "model.unet.params.dim=16", "model.unet.params.input_size=[32,32]",
         "model.unet.params.cond_weights=none"]
"""Overrides (of our keys) that shrink the translated model: 64-pixel maps, 16x16 latents (the U-Net's
bottleneck FFT sized for them), a narrow U-Net; the Swin-B condition encoder keeps its size."""


def raw_of(path: Path) -> dict[str, tp.Any]:
    return tp.cast(dict[str, tp.Any], OmegaConf.to_container(OmegaConf.load(path)))


def by_key(lines: list[rc.Line]) -> dict[str, rc.Line]:
    return {line.key: line for line in lines}


def nested(tree: dict[str, tp.Any], key: str) -> tp.Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("path", [LDM, FIRST_STAGE, DPMCAR], ids=lambda p: p.stem)
def test_recognised_and_every_key_reported_once(path: Path) -> None:
    raw = raw_of(path)
    assert rc.is_radiodiff(raw)
    _, lines = rc.translate(raw, Config)
    keys = [line.key for line in lines if line.status != rc.CODE_DEFAULT]
    assert keys == list(rc.leaves(raw)), "one line per RadioDiff key, in file order"
    assert {line.status for line in lines} <= set(rc.STATUSES)
    assert all(line.note or line.status == rc.MAPPED for line in lines), "every non-trivial line says why"


def test_our_configs_are_not_radiodiffs() -> None:
    ours = sorted((REPO / "configs").glob("*.yaml"))
    assert ours
    for path in ours:
        assert not rc.is_radiodiff(raw_of(path)), path
    assert not rc.is_radiodiff(to_dict(Config()))


def test_keys_with_radiodiffs_names_map_one_to_one() -> None:
    """The four keys whose meaning once differed now mean what they mean in RadioDiff: identity."""
    out, lines = rc.translate(raw_of(LDM), Config)
    line = by_key(lines)
    for key in ("data.batch_size", "trainer.min_lr", "model.scale_by_std", "model.default_scale",
                "model.scale_factor", "trainer.ema_update_after_step", "trainer.ema_update_every"):
        assert line[key].status == rc.MAPPED, (key, line[key])
    raw = raw_of(LDM)
    assert out["data"]["batch_size"] == raw["data"]["batch_size"] == 64
    assert out["data"]["split"] == "radiodiff"
    assert out["trainer"]["min_lr"] == raw["trainer"]["min_lr"] == 5e-6
    assert (out["trainer"]["lr_schedule"], out["trainer"]["lr_decay_power"]) == ("radiodiff", 0.96)
    assert (out["model"]["scale_by_std"], out["model"]["default_scale"], out["model"]["scale_factor"]) \
        == (True, True, 0.3)
    assert (out["trainer"]["ema_update_every"], out["trainer"]["ema_update_after_step"]) == (10, 10000)
    assert out["model"]["first_stage"]["loss"]["kl_weight"] == pytest.approx(1e-6 / 256**2)
    assert line["model.first_stage.lossconfig.kl_weight"].status == rc.DIFFERS
    assert line["model.first_stage.lossconfig.kl_weight"].level == logging.WARNING


@pytest.mark.parametrize(("scale", "ours"), [
    ({"scale_by_std": True, "default_scale": True, "scale_factor": 0.3}, (True, True, 0.3, rc.MAPPED)),
    ({"scale_by_std": True, "default_scale": False, "scale_factor": 1.0}, (True, False, 1.0, rc.MAPPED)),
    ({"scale_by_std": True, "default_scale": False, "scale_factor": 0.3}, (True, False, 1.0, rc.UNSUPPORTED)),
    ({"scale_by_std": False, "default_scale": True, "scale_factor": 0.3}, (False, None, None, rc.IGNORED)),
])
def test_latent_scale_matches_radiodiff(scale: dict[str, tp.Any], ours: tuple[tp.Any, ...]) -> None:
    """RadioDiff measures 1/std only with default_scale false, and scales nothing without scale_by_std;
    the translated config builds and measures exactly when RadioDiff would."""
    raw = raw_of(LDM)
    raw["model"].update(scale)
    out, lines = rc.translate(raw, Config)
    m = out["model"]
    status = by_key(lines)["model.scale_factor"].status
    assert (m["scale_by_std"], m.get("default_scale"), m.get("scale_factor"), status) == ours
    cfg = build_config(out, [ROOT])
    assert measures_scale_factor(cfg.model) == (scale["scale_by_std"] and not scale["default_scale"])
    expected = 0.3 if scale["scale_by_std"] and scale["default_scale"] else 1.0
    assert cfg.model.scale_factor == pytest.approx(expected)


def test_first_stage_config_sets_our_first_stage() -> None:
    out, lines = rc.translate(raw_of(FIRST_STAGE), Config)
    fs = out["model"]["first_stage"]
    assert fs["batch_size"] == 4 and by_key(lines)["data.batch_size"].status == rc.MAPPED
    assert fs["trainer"]["train_num_steps"] == 150000
    assert (fs["trainer"]["min_lr"], fs["trainer"]["lr_decay_power"]) == (5e-7, 0.95)
    assert fs["trainer"]["gradient_accumulate_every"] == 1, "train_vae.py: not accumulation"
    assert by_key(lines)["trainer.gradient_accumulate_every"].status == rc.UNSUPPORTED
    assert (fs["trainer"]["ema_decay"], fs["trainer"]["ema_update_after_step"]) == (0.995, 100)
    assert fs["ckpt_path"] == "/scratch/alice/radiodiff/vae_dpm/first_stage/autoencoder.safetensors"
    assert "unet" not in out["model"]


def test_cars_variant_maps_to_the_cars_data() -> None:
    out, lines = rc.translate(raw_of(DPMCAR), Config)
    line = by_key(lines)
    assert line["data.name"].status == rc.MAPPED
    assert (out["data"]["cars"], out["data"]["split"]) == (True, "radiodiff_600")
    assert line["finetune.ckpt_path"].status == rc.UNSUPPORTED
    assert line["model.unet.DPMCARK"].status == rc.MAPPED  # false: the fork's switch is off
    raw = raw_of(DPMCAR)
    raw["trainer"]["my_fork_flag"] = 3
    line = by_key(rc.translate(raw, Config)[1])
    assert line["trainer.my_fork_flag"].status == rc.UNSUPPORTED
    assert "unknown to this translation" in line["trainer.my_fork_flag"].note


@pytest.mark.parametrize("change, message", [
    (("data", "name", "IRT4"), r"data\.name: IRT4 is sparse IRT4 ray-tracing maps, which is not built here"),
    (("model.unet", "DPMCARK", True), r"model\.unet\.DPMCARK: true feeds the K2 input channels"),
    (("model.unet", "cond_net", "resnet"), r"model\.unet\.cond_net: 'resnet' is not built here"),
    (("model", "model_name", "ncsnpp9"), r"model\.model_name: 'ncsnpp9' is not built here"),
])
def test_what_is_not_built_here_is_refused_not_substituted(change: tuple[str, str, tp.Any],
                                                           message: str) -> None:
    raw = raw_of(DPMCAR)
    section, key, value = change
    nested(raw, section)[key] = value
    with pytest.raises(ConfigError, match=message):
        rc.translate(raw, Config)


def test_fp16_autocast_without_scaler_becomes_bf16() -> None:
    raw = raw_of(LDM)
    raw["trainer"].update(amp=True, fp16=False)
    out, lines = rc.translate(raw, Config)
    assert out["trainer"]["mixed_precision"] == "bf16" and not out["trainer"]["amp"]
    assert by_key(lines)["trainer.amp"].status == rc.UNSUPPORTED
    cfg = build_config(out, [ROOT])
    assert (cfg.trainer.mixed_precision, cfg.trainer.amp) == ("bf16", False)


def test_missing_essentials_fail_in_one_message() -> None:
    raw = raw_of(LDM)
    del raw["model"]["first_stage"]["ddconfig"]["ch"]
    raw["model"]["unet"]["dim"] = "wide"
    with pytest.raises(ConfigError, match=r"ddconfig\.ch is missing; model\.unet\.dim: got 'wide'"):
        rc.translate(raw, Config)


def test_load_config_translates_logs_and_applies_overrides_to_our_keys(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=rc.__name__):
        cfg = load_config(LDM, [ROOT, "trainer.lr=1e-4"])
    assert cfg.trainer.lr == 1e-4 and cfg.data.root == "/data/RadioMapSeer"
    assert cfg.model.objective == "radiodiff" and cfg.model.eps == 1e-4
    assert (cfg.model.scale_by_std, cfg.model.default_scale, cfg.model.scale_factor) == (True, True, 0.3)
    assert cfg.trainer.ema_update_after_step == 10000 and cfg.trainer.weight_decay == 1e-4
    assert cfg.model.first_stage.params["block_out_channels"] == [128, 256, 512]
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert "RadioDiff LDM config (train_cond_ldm.py)" in messages[0][1]
    warned = [m for level, m in messages if level == logging.WARNING]
    differs = "[mapped, MEANING DIFFERS] model.first_stage.lossconfig.kl_weight"
    assert any(m.startswith(differs) for m in warned)
    assert cfg.model.unet.target == rc.RADIODIFF_UNET and cfg.model.unet.params["cond_weights"] == "imagenet"
    assert cfg.model.unet.params["input_size"] == [80, 80] and cfg.model.unet.params["fix_bb"] is False
    assert not cfg.model.first_stage.train_if_missing, "RadioDiff's first stage is imported, never replaced"
    assert not any(m.startswith("[mapped] ") for m in warned)
    with pytest.raises(ConfigError, match="model.unet.dim: unknown key"):
        load_config(LDM, [ROOT, "model.unet.dim=64"])  # overrides name our keys, not RadioDiff's
    with pytest.raises(ConfigError, match="data.root: required but not set"):
        load_config(LDM)  # RadioDiff hard-codes its dataset folder: ours must be given


def test_translated_ldm_builds_radiodiffs_network() -> None:
    cfg = load_config(LDM, [ROOT, *SMALL])
    torch.manual_seed(0)
    ldm = build_ldm(cfg, build_first_stage(cfg))
    assert ldm.latent_shape == (3, 16, 16)
    assert ldm.const_sde is not None and ldm.const_sde.eps == 1e-4
    assert type(ldm.unet).__name__ == "RadioDiffUNet" and ldm.takes_condition


def test_translated_ldm_trains_with_radiodiffs_objective(tmp_path: Path, synth_cache: Path) -> None:
    """RadioDiff's LDM yaml, shrunk by overrides of our keys and pointed at the synthetic maps, trains
    its first stage (asked for: a RadioDiff yaml never trains a substitute by itself), then RadioDiff's
    network with the const-SDE objective, to the end."""
    cfg = load_config(LDM, [
        *SMALL, "model.first_stage.train_if_missing=true", "data.root=null", "data.split=maps",
        f"data.synthetic.cache_dir={synth_cache}", "data.synthetic.num_maps=6", "data.synthetic.tx_per_map=2",
        "data.synthetic.size=64", "data.batch_size=4", f"trainer.results_folder={tmp_path / 'run'}",
        "model.first_stage.trainer.train_num_steps=2", "model.first_stage.trainer.val_batches=0",
        "trainer.train_num_steps=2", "trainer.gradient_accumulate_every=1", "trainer.val_batches=0",
    ])
    assert (cfg.model.objective, cfg.trainer.lr_schedule) == ("radiodiff", "radiodiff")
    assert cfg.model.default_scale and cfg.model.scale_factor == 0.3
    train(cfg, Accelerator())
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "checkpoint_saved"][-1] == 2
    assert (tmp_path / "run" / "final" / "model_ema.safetensors").is_file()


@pytest.mark.parametrize(("ch_mult", "attn", "z"), [([1, 2, 2], [8], 4), ([1, 2], [], 2)])
def test_ddconfig_latent_is_radiodiffs(ch_mult: list[int], attn: list[int], z: int) -> None:
    """A tiny ddconfig: the AutoencoderKL it maps to gives RadioDiff's latent, z at resolution /
    2**(len(ch_mult) - 1) with embed_dim channels, and attention where attn_resolutions says."""
    raw = raw_of(FIRST_STAGE)
    raw["model"]["embed_dim"] = z
    raw["model"]["ddconfig"].update(ch=32, ch_mult=ch_mult, num_res_blocks=1, z_channels=z,
                                    resolution=[32, 32], attn_resolutions=attn)
    out, _ = rc.translate(raw, Config)
    cfg = build_config(out, [ROOT, "data.image_size=32"])
    torch.manual_seed(0)
    first_stage = build_first_stage(cfg)
    side = 32 // 2 ** (len(ch_mult) - 1)
    assert latent_geometry(first_stage, 32) == (z, side, side)
    down, up = first_stage.encoder.down_blocks, first_stage.decoder.up_blocks
    attended = [i for i, block in enumerate(down) if getattr(block, "attentions", None)]
    assert attended == [i for i in range(len(ch_mult)) if 32 // 2**i in attn]
    decoded = [len(up) - 1 - i for i, block in enumerate(up) if getattr(block, "attentions", None)]
    assert decoded == attended


def test_z_channels_other_than_embed_dim_are_reported() -> None:
    raw = raw_of(FIRST_STAGE)
    raw["model"]["ddconfig"]["z_channels"] = 4
    out, lines = rc.translate(raw, Config)
    assert out["model"]["first_stage"]["params"]["latent_channels"] == 3
    assert by_key(lines)["model.ddconfig.z_channels"].status == rc.UNSUPPORTED


@pytest.mark.parametrize("path", [LDM, FIRST_STAGE, DPMCAR], ids=lambda p: p.stem)
def test_convert_config_output_loads_with_cfg(path: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ours.yaml"
    assert main(["convert-config", str(path), "--out", str(out)]) == 0
    assert f"train with: radiodiff-resume train --cfg {out}" in capsys.readouterr().err
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Translated by `radiodiff-resume convert-config`")
    assert "# [mapped] data.batch_size:" in text
    assert not rc.is_radiodiff(yaml.safe_load(text))
    converted, direct = load_config(out, [ROOT]), load_config(path, [ROOT])
    assert to_dict(converted) == to_dict(direct)
    assert main(["convert-config", str(path)]) == 0
    assert capsys.readouterr().out == text


GARBAGE = {
    "broken.yaml": b"model: [ddconfig\n  ch: {128\n",
    "binary.yaml": bytes(range(256)),
    "list.yaml": b"- model\n- data\n",
    "other.yaml": b"name: resnet50\noptimizer: {lr: 0.1}\nepochs: 90\n",
}


@pytest.mark.parametrize("name", [*GARBAGE, "radio_tiny.yaml", "missing.yaml"])
def test_convert_config_refuses_other_files_in_one_line(name: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    if name in GARBAGE:
        path.write_bytes(GARBAGE[name])
    elif name == "radio_tiny.yaml":
        path = REPO / "configs" / name
    assert main(["convert-config", str(path)]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: convert-config: ") and captured.err.count("\n") == 1, captured.err
    if name == "radio_tiny.yaml":
        assert "already in this package's format" in captured.err


def test_lines_are_immutable_records() -> None:
    """The report is data (tests and tools read it), not only text."""
    line = by_key(rc.translate(copy.deepcopy(raw_of(LDM)), Config)[1])["model.first_stage.ddconfig.ch_mult"]
    assert line.targets == (("model.first_stage.params.block_out_channels", [128, 256, 512]),)
    assert line.text().startswith("[mapped] model.first_stage.ddconfig.ch_mult: [1, 2, 4] → "
                                  "model.first_stage.params.block_out_channels: [128, 256, 512]")


def test_shipped_radiodiff_config_is_radio_train_yamls_model() -> None:
    """configs/radiodiff.yaml, the config a GPU user starts from, builds exactly the model that
    RadioDiff's radio_train.yaml translates to: the same network and params, objective and scale."""
    ours = load_config(REPO / "configs" / "radiodiff.yaml", [ROOT])
    theirs = load_config(LDM, [ROOT])
    for part in ("unet", "objective", "eps", "loss_type", "weighting_loss", "use_l1", "scale_by_std",
                 "default_scale", "scale_factor"):
        assert getattr(ours.model, part) == getattr(theirs.model, part), part
    assert ours.model.first_stage.params == theirs.model.first_stage.params
    assert not ours.model.first_stage.train_if_missing
