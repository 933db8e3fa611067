"""``doctor`` on real checkpoints broken on disk: what it finds, what ``--fix`` repairs (in a new,
verified folder beside the untouched original), and what it cannot repair."""

from __future__ import annotations

import json
import math
import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.checkpoint.verify import open_checkpoint
from radiodiff_resume.cli import main
from tests.checkpoint.helpers import STEP4, flip_byte, read_manifest, rewrite_tensors, write_manifest
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
