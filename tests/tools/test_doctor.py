"""``doctor`` on real checkpoints broken on disk: what it finds, what ``--fix`` repairs (in a new,
verified folder beside the untouched original), and what it cannot repair."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import typing as tp
from pathlib import Path

import pytest
import torch
import yaml

from radiodiff_resume.checkpoint.verify import open_checkpoint
from radiodiff_resume.cli import main
from tests.checkpoint.helpers import (
    STEP4,
    flip_byte,
    read_manifest,
    reseal,
    rewrite_tensors,
    write_manifest,
)
from tests.tools.conftest import tree
from tests.tools.test_dry_run import inf_running_var, negative_adam_moment, poison_weight


def doctor(capsys: pytest.CaptureFixture[str], ckpt: Path, *args: str) -> tuple[int, dict[str, tp.Any]]:
    code = main(["doctor", str(ckpt), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def failed(doc: dict[str, tp.Any]) -> list[tuple[str, str]]:
    return [(c["name"], c["detail"]) for c in doc["checks"] if c["status"] == "FAIL"]


def step4(cfg: Path) -> Path:
    return cfg.parent / "run" / "checkpoints" / STEP4


def test_a_healthy_checkpoint(tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = doctor(capsys, step4(tool_run()))
    assert code == 0 and [c["name"] for c in doc["checks"]] == ["structure", "state"]


def test_inf_batchnorm_statistics_are_repaired_in_a_copy_that_dry_run_passes(
        tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    ckpt = step4(cfg)
    inf_running_var(ckpt)
    code, doc = doctor(capsys, ckpt)
    assert code == 1
    [(kind, detail)] = failed(doc)
    assert kind == "running statistic" and "running_var: 8 +Inf of 8 values" in detail
    assert "repairable" in detail

    original = tree(ckpt)
    code, doc = doctor(capsys, ckpt, "--fix")
    assert code == 0, doc
    assert tree(ckpt) == original, "the original is never modified"
    repaired = Path(doc["repaired"])
    assert repaired.parent == ckpt.parent and repaired.name.startswith(f"repaired-{STEP4}-")
    fixed = open_checkpoint(repaired, "ldm")
    assert all(torch.isfinite(v).all() for k, v in fixed.shared["model"].items() if k.endswith("running_var"))
    assert "recomputed over 4 training batch(es)" in fixed.manifest.provenance[-1]
    assert main(["doctor", str(repaired)]) == 0
    capsys.readouterr()

    assert main(["dry-run", "--cfg", str(cfg)]) == 1, "the broken original is still the newest"
    capsys.readouterr()
    assert main(["dry-run", "--cfg", str(cfg), "--checkpoint", str(repaired)]) == 0
    assert "running stats   ok" in capsys.readouterr().out


def test_adam_moments_and_ema_weights_are_repaired(tool_run: tp.Callable[..., Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    ckpt = step4(cfg)
    negative_adam_moment(ckpt)
    rewrite_tensors(ckpt, "optimizer", lambda t: t["state/3/exp_avg"].fill_(float("nan")))
    rewrite_tensors(ckpt, "ema", lambda t: t["shadow_params/5"].view(-1).__setitem__(0, float("-inf")))
    code, doc = doctor(capsys, ckpt)
    assert code == 1
    assert sorted(k for k, _ in failed(doc)) == ["EMA weight", "optimizer moment", "optimizer moment"]

    code, doc = doctor(capsys, ckpt, "--fix")
    assert code == 0, doc
    fixed = open_checkpoint(Path(doc["repaired"]), "ldm")
    state = fixed.shared["optimizer"]["state"]
    assert 0 not in state and 3 not in state and 1 in state, "only the broken parameters' Adam state is reset"
    shadow = fixed.shared["ema"]["shadow_params"]
    assert any(torch.equal(shadow[5], w) for w in fixed.shared["model"].values()), \
        "the broken EMA weight restarts from its online weight"
    before = open_checkpoint(ckpt, "ldm").shared["ema"]["shadow_params"]
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(shadow, before, strict=True)) if i != 5)
    assert main(["dry-run", "--cfg", str(cfg), "--checkpoint", doc["repaired"]]) == 0
    capsys.readouterr()


def test_broken_weights_cannot_be_repaired_and_the_earlier_checkpoint_is_named(
        tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = step4(tool_run())
    poison_weight(ckpt)
    before = tree(ckpt.parent)
    code, doc = doctor(capsys, ckpt, "--fix")
    assert code == 1 and doc["repaired"] is None
    [(kind, detail)] = failed(doc)
    assert kind == "weight" and "1 NaN of" in detail and "NOT repairable" in detail
    [earlier] = [c["detail"] for c in doc["checks"] if c["name"] == "earlier"]
    assert "step-00000002" in earlier
    assert tree(ckpt.parent) == before, "nothing written"


def test_damaged_files(tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = step4(tool_run())
    flip_byte(ckpt / "optimizer.safetensors")
    code, doc = doctor(capsys, ckpt)
    assert code == 1
    assert failed(doc)[0][0] == "structure" and "optimizer.safetensors" in failed(doc)[0][1]
    assert "step-00000002" in [c["detail"] for c in doc["checks"] if c["name"] == "earlier"][0]


@pytest.mark.parametrize("what", ["missing", "not a checkpoint"])
def test_user_errors(what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nothing"
    if what == "not a checkpoint":
        path.mkdir()
        (path / "notes.txt").write_text("hi")
    assert main(["doctor", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_scale_factor_and_guard_statistics_are_repaired(tool_run: tp.Callable[..., Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    ckpt = step4(cfg)
    recorded = read_manifest(ckpt)["scale_factor"]
    rewrite_tensors(ckpt, "model", lambda t: t["scale_factor"].fill_(2.5))
    rewrite_tensors(ckpt, "guard", lambda t: t["clip/mean"].fill_(float("nan")))
    code, doc = doctor(capsys, ckpt)
    assert code == 1
    assert sorted(k for k, _ in failed(doc)) == ["guard statistic", "scale_factor"]
    assert f"2.5 in the weights, {recorded!r} in the manifest" in dict(failed(doc))["scale_factor"]

    code, doc = doctor(capsys, ckpt, "--fix")
    assert code == 0, doc
    fixed = open_checkpoint(Path(doc["repaired"]), "ldm")
    assert float(fixed.shared["model"]["scale_factor"]) == recorded == fixed.manifest.scale_factor
    clip = fixed.shared["guard"]["clip"]
    assert torch.isfinite(clip["mean"]) and clip["count"] == 0, "guard statistics start afresh"
    assert main(["dry-run", "--cfg", str(cfg), "--checkpoint", doc["repaired"]]) == 0
    capsys.readouterr()


def test_a_scale_factor_nowhere_recorded_is_measured_again(tool_run: tp.Callable[..., Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = step4(tool_run())
    rewrite_tensors(ckpt, "model", lambda t: t["scale_factor"].fill_(float("nan")))
    write_manifest(ckpt, {**read_manifest(ckpt), "scale_factor": None})
    code, doc = doctor(capsys, ckpt, "--fix")
    assert code == 0, doc
    [(_, detail)] = [(c["name"], c["detail"]) for c in doc["checks"] if c["name"] == "scale_factor"]
    assert "re-measured: 1/std of a training batch's latents" in detail
    fixed = open_checkpoint(Path(doc["repaired"]), "ldm")
    assert math.isfinite(fixed.manifest.scale_factor or math.nan) and fixed.manifest.scale_factor > 0


# ----- nothing in a checkpoint names code to run ----------------------------------------------------


def reseal_config(ckpt: Path, change: tp.Callable[[dict[str, tp.Any]], None]) -> None:
    """Let ``change`` edit the checkpoint's ``config.yaml``, then reseal it (file record, ``config_hash``,
    checksum): a forgery every structure check accepts."""
    raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    change(raw)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(raw))
    reseal(ckpt, "config.yaml")
    data = (ckpt / "config.yaml").read_bytes()
    write_manifest(ckpt, {**read_manifest(ckpt), "config_hash": hashlib.sha256(data).hexdigest()[:16]})
    open_checkpoint(ckpt, "ldm")  # the forgery is sound


def system_datasets(marker: Path) -> tp.Callable[[dict[str, tp.Any]], None]:
    """``data.train`` / ``data.validation`` that would call ``os.system`` to create ``marker``."""
    def change(raw: dict[str, tp.Any]) -> None:
        for split in ("train", "validation"):
            raw["data"][split] = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    return change


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_fix_never_calls_a_target_from_the_checkpoints_config(
        tool_run: tp.Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    ckpt = step4(cfg)
    inf_running_var(ckpt)  # something --fix would repair
    marker = tmp_path / "os-system-ran"
    reseal_config(ckpt, system_datasets(marker))
    before = tree(ckpt.parent)

    for cfg_args in ([], ["--cfg", str(cfg)]):
        assert main(["doctor", str(ckpt), "--fix", *cfg_args]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{ckpt}/config.yaml sets data.train.target: 'os.system'" in line, line
        assert "nothing was imported or run" in line and "pass --cfg" in line, line
        whose = f"--cfg {cfg}" if cfg_args else "the built-in default (no --cfg given)"
        assert f"but {whose} has none there" in line, line
        assert not marker.exists(), "the checkpoint's config ran a command"
    assert tree(ckpt.parent) == before, "nothing written"


def test_fix_refuses_a_stored_target_before_importing_its_module(
        tool_run: tp.Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = step4(tool_run())
    inf_running_var(ckpt)
    marker = tmp_path / "module-imported"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "hostile_unet.py").write_text(f"open({str(marker)!r}, 'w').close()\nUNet = object\n")
    monkeypatch.syspath_prepend(str(plugins))
    reseal_config(ckpt, lambda raw: raw["model"]["unet"].update(target="hostile_unet.UNet"))

    assert main(["doctor", str(ckpt), "--fix"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "sets model.unet.target: 'hostile_unet.UNet', but the built-in default (no --cfg given) has " \
        "'diffusers.UNet2DModel' there" in line, line
    assert not marker.exists() and "hostile_unet" not in sys.modules, "importing the module runs its code"


def test_fix_builds_a_plugged_target_only_when_the_users_config_names_it(
        tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = step4(tool_run())
    inf_running_var(ckpt)
    plugin = "tests.guard.recovery_plugins.PoisonedUNet"  # the same tensors as diffusers' UNet2DModel
    reseal_config(ckpt, lambda raw: raw["model"]["unet"].update(target=plugin))

    assert main(["doctor", str(ckpt), "--fix"]) == 2, "not named by the user"
    assert f"model.unet.target: '{plugin}'" in one_error_line(capsys.readouterr().err)

    users = tool_run(f"model.unet.target={plugin}")
    code, doc = doctor(capsys, ckpt, "--fix", "--cfg", str(users))
    assert code == 0, doc
    assert open_checkpoint(Path(doc["repaired"]), "ldm").manifest.step == 4
