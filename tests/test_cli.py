"""The command line as a user meets it: one clear message and exit 2 for user errors,
no traceback; a real run through ``train_cond_ldm.py``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.cli import main
from tests.conftest import REPO, tiny_raw


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


def test_config_with_two_mistakes_names_both_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "two_mistakes.yaml"
    cfg.write_text("trainer:\n  lr: fast\n  train_num_step: 10\n")
    proc = run(str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "trainer.lr: got 'fast'" in proc.stderr
    assert "trainer.train_num_step: unknown key (did you mean 'trainer.train_num_steps'?)" in proc.stderr
    assert proc.stderr.count("error:") == 1


def test_missing_config_file(tmp_path: Path) -> None:
    proc = run("-m", "radiodiff_resume.cli", "train", "--cfg", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "nope.yaml not found" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_dataset_path_is_a_clear_error(tmp_path: Path) -> None:
    proc = run(str(REPO / "train_cond_ldm.py"), "--cfg", str(REPO / "configs" / "radio_train.yaml"),
               f"data.root={tmp_path / 'RadioMapSeer'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(tmp_path / "RadioMapSeer") in proc.stderr


@pytest.mark.slow
def test_train_cond_ldm_runs_end_to_end(tmp_path: Path, synth_cache: Path) -> None:
    raw = tiny_raw(tmp_path / "run", synth_cache)
    raw["model"]["first_stage"]["train_if_missing"] = True
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = run(str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg), "trainer.train_num_steps=4",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training the first stage now" in proc.stderr
    assert "validation evaluated" in proc.stderr
    out = tmp_path / "run"
    assert (out / "ae.safetensors").is_file()
    assert (out / "final" / "model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["train_num_steps"] == 4


def help_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_every_verb_says_what_its_exit_statuses_mean(capsys: pytest.CaptureFixture[str]) -> None:
    """Every verb the CLI lists, and train_cond_ldm.py: its --help ends the guessing about status 2/3/4."""
    verbs = re.search(r"\{([\w,-]+)\}", help_text(capsys)).group(1).split(",")  # type: ignore[union-attr]
    assert {"train", "submit", "import", "dry-run", "doctor", "report", "convert-config"} <= set(verbs)
    for verb in verbs:
        assert re.search(r"Exit 0: [^;]+; (1: [^;]+; )?2: ", help_text(capsys, verb)), verb
    assert "3: stopped on request" in help_text(capsys, "train")
    assert "4: halted to protect the run's state" in help_text(capsys, "train")
    proc = run(str(REPO / "train_cond_ldm.py"), "--help")
    assert proc.returncode == 0 and "3: stopped on request" in " ".join(proc.stdout.split())
