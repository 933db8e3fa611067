"""Config: every problem in one message, RadioDiff key names, overrides, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from radiodiff_resume.config import build_config, load_config, resolved_mixed_precision, to_yaml
from radiodiff_resume.errors import ConfigError
from tests.conftest import REPO


def problems_of(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [line[4:] for line in str(exc.value).splitlines() if line.startswith("  - ")]


def test_several_mistakes_are_reported_together(make_cfg) -> None:
    with pytest.raises(ConfigError) as exc:
        make_cfg(
            "trainer.lr=abc",
            "trainer.trian_num_steps=10",
            "data.batch_size=0",
            "model.unet.target=no_such_pkg.UNet",
            "trainer.mixed_precision=fp8",
        )
    problems = problems_of(exc)
    assert len(problems) == 5, problems
    text = str(exc.value)
    assert "trainer.lr: got 'abc'" in text
    assert "trainer.trian_num_steps: unknown key (did you mean 'trainer.train_num_steps'?)" in text
    assert "data.batch_size: got 0; allowed: >= 1" in text
    assert "model.unet.target: cannot import module 'no_such_pkg'" in text
    assert "trainer.mixed_precision: got 'fp8'; allowed: no, fp16, bf16" in text
    assert "5 problems" in text


def test_type_and_value_problems_in_one_message(make_cfg) -> None:
    """A wrong type elsewhere must not hide a value problem (and vice versa)."""
    with pytest.raises(ConfigError) as exc:
        make_cfg("trainer.seed=-1", "data.image_size=big")
    keys = sorted(p.split(":")[0] for p in problems_of(exc))
    assert keys == ["data.image_size", "trainer.seed"]


def test_yaml_file_with_two_mistakes_names_both(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("trainer:\n  lr: -1\ndata:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg, ["model.first_stage.ckpt_path=x.safetensors"])
    text = str(exc.value)
    assert str(cfg) in text
    assert "trainer.lr: got -1.0" in text
    assert "data.batch_sise: unknown key (did you mean 'data.batch_size'?)" in text


def test_amp_without_fp16_is_refused(make_cfg) -> None:
    with pytest.raises(ConfigError, match="without a loss scaler"):
        make_cfg("trainer.amp=true", "trainer.fp16=false")


def test_radiodiff_amp_fp16_means_fp16_with_scaler(make_cfg) -> None:
    cfg = make_cfg("trainer.amp=true", "trainer.fp16=true")
    assert resolved_mixed_precision(cfg.trainer) == "fp16"


def test_overrides_and_types(make_cfg) -> None:
    cfg = make_cfg("trainer.lr=3e-4", "data.batch_size=2", "model.scale_by_std=false")
    assert cfg.trainer.lr == pytest.approx(3e-4)
    assert cfg.data.batch_size == 2
    assert cfg.model.scale_by_std is False


def test_params_dict_is_replaced_not_merged_with_defaults(make_cfg) -> None:
    """A plugged-in target must not inherit the default target's keyword arguments."""
    cfg = make_cfg()
    assert set(cfg.model.unet.params) == {
        "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
        "norm_num_groups",
    }


def test_malformed_override(make_cfg) -> None:
    with pytest.raises(ConfigError, match="override 'trainer.lr': expected key=value"):
        make_cfg("trainer.lr")


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(bad)
    assert "\n" not in str(info.value) and "at line 2, column 1" in str(info.value), str(info.value)


def test_first_stage_ckpt_must_be_safetensors(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"ckpt_path: got 'model-30\.pt'"):
        make_cfg("model.first_stage.ckpt_path=model-30.pt")


def test_plugin_without_partner_is_refused(make_cfg) -> None:
    with pytest.raises(ConfigError, match="plug in both datasets or neither"):
        make_cfg("data.train.target=radiodiff_resume.data.radiomapseer.RadioMapSeer")


def test_resolved_config_round_trips(make_cfg) -> None:
    import yaml

    cfg = make_cfg("trainer.lr=2e-4")
    again = build_config(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("name", ["radio_tiny.yaml", "radio_train.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    overrides = ["data.root=/data/RadioMapSeer"] if name == "radio_train.yaml" else []
    cfg = load_config(REPO / "configs" / name, overrides)
    assert cfg.trainer.train_num_steps > 0


def test_radio_train_requires_the_dataset_path() -> None:
    with pytest.raises(ConfigError, match="data.root: required but not set"):
        load_config(REPO / "configs" / "radio_train.yaml")
