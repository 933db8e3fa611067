"""``dry-run`` against real checkpoints of a real run: a good one passes with exit 0, each kind of
damage fails with exit 1 and names its check, and the results folder stays byte-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.cli import main
from radiodiff_resume.lock import RunLock
from tests.checkpoint.helpers import STEP4, flip_byte, rewrite_tensors
from tests.conftest import REPO
from tests.tools.conftest import tree
from tests.trainer.test_multiprocess import free_port


def dry_run(capsys: pytest.CaptureFixture[str], cfg: Path, *args: str) -> tuple[int, dict[str, tp.Any]]:
    code = main(["dry-run", "--cfg", str(cfg), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def status(doc: dict[str, tp.Any]) -> dict[str, list[str]]:
    """Check name → the statuses it got (a name may repeat, e.g. a level of two checkpoints)."""
    out: dict[str, list[str]] = {}
    for check in doc["checks"]:
        out.setdefault(check["name"], []).append(check["status"])
    return out


def results_of(cfg: Path) -> Path:
    return cfg.parent / "run"


def test_a_good_checkpoint_passes_and_nothing_is_written(
        tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    before = tree(results_of(cfg))
    code, doc = dry_run(capsys, cfg, "--steps", "3")
    assert code == 0 and doc["passed"], doc
    got = status(doc)
    for name in ("structure", "finite", "scale_factor", "keys", "probe", "resume", "optimizer", "lr/step",
                 "running stats", "rng/data", "config", "step 5", "step 6", "step 7", "weights"):
        assert got[name] == ["ok"], (name, doc)
    [changes] = [c["detail"] for c in doc["checks"] if c["name"] == "config changes"]
    assert changes.startswith("2 key(s) changed") and "trainer.results_folder" in changes, \
        "the copy of the run lives in another folder"
    assert tree(results_of(cfg)) == before


def test_the_table_names_every_check(tool_run: tp.Callable[..., Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["dry-run", "--cfg", str(tool_run()), "--steps", "0"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.splitlines()[0].split() == ["check", "status", "detail"]
    assert "vs recorded" in out.out and "step 5" not in out.out
    assert "dry-run passed; nothing was written" in out.err


def poison_weight(ckpt: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        name = next(k for k in sorted(t) if k.startswith("unet.") and k.endswith("weight"))
        t[name].view(-1)[0] = float("nan")
    rewrite_tensors(ckpt, "model", change)


def nudge_weight(ckpt: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        name = next(k for k in sorted(t) if k.startswith("unet.") and k.endswith("weight"))
        t[name].mul_(1.5)
    rewrite_tensors(ckpt, "model", change)


def stale_scale_factor(ckpt: Path) -> None:
    rewrite_tensors(ckpt, "model", lambda t: t["scale_factor"].fill_(2.5))


def inf_running_var(ckpt: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        name = next(k for k in sorted(t) if k.endswith("running_var"))
        t[name].fill_(float("inf"))
    rewrite_tensors(ckpt, "model", change)


def negative_adam_moment(ckpt: Path) -> None:
    rewrite_tensors(ckpt, "optimizer", lambda t: t["state/0/exp_avg_sq"].view(-1).__setitem__(0, -1.0))


def torn_manifest(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_text((ckpt / "manifest.json").read_text()[:100])


CORRUPTIONS: dict[str, tuple[tp.Callable[[Path], None], str]] = {
    "flipped byte": (lambda c: flip_byte(c / "model.safetensors"), "structure"),
    "torn manifest": (torn_manifest, "structure"),
    "NaN weight": (poison_weight, "finite"),
    "stale scale_factor": (stale_scale_factor, "scale_factor"),
    "changed weight": (nudge_weight, "probe"),
    "Inf BatchNorm variance": (inf_running_var, "running stats"),
    "negative Adam moment": (negative_adam_moment, "finite"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_kind_of_damage_fails_its_check_and_moves_nothing(
        kind: str, tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    corrupt, check = CORRUPTIONS[kind]
    cfg = tool_run()
    corrupt(results_of(cfg) / "checkpoints" / STEP4)
    before = tree(results_of(cfg))
    code, doc = dry_run(capsys, cfg)
    assert code == 1 and not doc["passed"]
    failed = [c for c in doc["checks"] if c["status"] == "FAIL"]
    assert failed[0]["name"] == check, doc
    assert tree(results_of(cfg)) == before, "a dry-run quarantines nothing"
    if check in ("structure", "finite", "scale_factor"):  # damaged: a real resume falls back to step 2
        [resume] = [c for c in doc["checks"] if c["name"] == "resume"]
        assert "step-00000002" in resume["detail"] and f"quarantine {STEP4}" in resume["detail"]


def test_a_model_the_checkpoint_does_not_fit_fails_keys(
        tool_run: tp.Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run("model.cond_encoder.params.out_channels=3")
    code, doc = dry_run(capsys, cfg)
    assert code == 1
    names = [c["name"] for c in doc["checks"] if c["status"] == "FAIL"]
    assert names[:2] == ["keys", "resume"], doc
    assert "model.cond_encoder.params.out_channels: 2 in the checkpoint, 3 now" in doc["checks"][-1]["detail"]


def test_a_changed_setting_is_a_warning(tool_run: tp.Callable[..., Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = dry_run(capsys, tool_run("trainer.min_lr=2e-4"), "--steps", "1")
    assert code == 0
    [changes] = [c["detail"] for c in doc["checks"] if c["name"] == "config changes"]
    assert changes.startswith("3 key(s) changed") and "trainer.min_lr: 0.0001 → 0.0002" in changes
    assert status(doc)["lr/step"] == ["warn"]


def test_a_named_checkpoint_and_nothing_to_resume(tool_run: tp.Callable[..., Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    step2 = results_of(cfg) / "checkpoints" / "step-00000002"
    code, doc = dry_run(capsys, cfg, "--checkpoint", str(step2), "--steps", "0")
    assert code == 0
    [resume] = [c for c in doc["checks"] if c["name"] == "resume"]
    assert resume["status"] == "warn" and "at step 2 of 4" in resume["detail"]
    assert f"set aside {STEP4}" in resume["detail"], "what the real resume would do, said, not done"
    assert (results_of(cfg) / "checkpoints" / STEP4).is_dir()

    code, doc = dry_run(capsys, tool_run(f"trainer.results_folder={cfg.parent / 'elsewhere'}"))
    assert code == 1 and "nothing to resume" in doc["checks"][-1]["detail"]


def test_user_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dry-run", "--cfg", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tool_run: tp.Callable[..., Path]) -> None:
    cfg = tool_run()
    before = tree(results_of(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "radiodiff_resume.cli", "dry-run", "--cfg",
           str(cfg), "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    [data] = [c for c in doc["checks"] if c["name"] == "rng/data"]
    assert data["status"] == "warn" and "saved by 1 process(es)" in data["detail"] and "resumed by 2" in data[
        "detail"]
    assert tree(results_of(cfg)) == before


def test_a_run_holding_the_folder_is_named(tool_run: tp.Callable[..., Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tool_run()
    lock = RunLock(results_of(cfg))
    assert lock.live_holder() is None
    lock.acquire()
    try:
        code, doc = dry_run(capsys, cfg, "--steps", "0")
    finally:
        lock.release()
    assert code == 0
    [held] = [c for c in doc["checks"] if c["name"] == "lock"]
    assert held["status"] == "warn" and f"pid {os.getpid()}" in held["detail"]
    assert lock.live_holder() is None


@pytest.mark.parametrize("where", ["nowhere", "the checkpoints folder", "the results folder"])
def test_a_checkpoint_path_that_is_none_is_a_usage_error(where: str, tool_run: tp.Callable[..., Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """exit 2 and one line saying what the path is, never a failed check that calls it damaged (exit 1)."""
    cfg = tool_run()
    path = {"nowhere": cfg.parent / "nonexistent", "the checkpoints folder": results_of(cfg) / "checkpoints",
            "the results folder": results_of(cfg)}[where]
    assert main(["dry-run", "--cfg", str(cfg), "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "damaged" not in err, err
    if where == "nowhere":
        assert f"--checkpoint {path}: no such checkpoint folder" in err
    else:
        newest = results_of(cfg) / "checkpoints" / STEP4
        assert f"holds checkpoints but is not one: name one of them ({newest} is the newest)" in err

    code = main(["dry-run", "--cfg", str(tool_run(f"checkpoint.resume={cfg.parent / 'nonexistent'}"))])
    err = capsys.readouterr().err
    assert code == 2 and f"checkpoint.resume={cfg.parent / 'nonexistent'}: no such checkpoint folder" in err


@pytest.mark.slow  # two dry-runs in fresh processes that generate the dataset
def test_a_fresh_home_gets_only_the_data_it_is_told_about(tool_run: tp.Callable[..., Path],
                                                          tmp_path: Path) -> None:
    """With an empty HOME and TMPDIR, the only thing on disk afterwards is the synthetic dataset the
    output names (``train`` would generate it there too): no matplotlib cache in HOME, no inductor cache
    left in TMPDIR."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    cfg = tool_run("data.synthetic.cache_dir=~/.cache/radiodiff_resume")
    before = tree(results_of(cfg))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "radiodiff_resume.cli", "dry-run", "--cfg", str(cfg),
                           "--json", "--steps", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    data = home / ".cache" / "radiodiff_resume" / "radiomapseer-synth-s0-m6-t2-64"
    files = sorted(p for p in home.rglob("*") if p.is_file())
    assert files and all(data in p.parents for p in files), files
    created = f"{home / '.cache'} was created for it"
    assert doc["written"] == [f"{data} ({len(files)} files of synthetic data; {created})"]
    [detail] = [c["detail"] for c in doc["checks"] if c["name"] == "data"]
    assert f"generated into {data} ({len(files)} files" in detail
    assert list(tmp.iterdir()) == []
    assert tree(results_of(cfg)) == before

    proc = subprocess.run([sys.executable, "-m", "radiodiff_resume.cli", "dry-run", "--cfg", str(cfg),
                           "--steps", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr.endswith("dry-run passed; nothing was written\n"), proc.stderr
    assert sorted(p for p in home.rglob("*") if p.is_file()) == files
