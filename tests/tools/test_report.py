"""``radiodiff-resume report``: on a real run that went through what a report must show — a first
stage, skipped steps escalating to rollbacks, a preemption (a real SIGUSR1), a damaged newest
checkpoint quarantined on the rerun and a resume from the older one — and on hand-written logs
where the exact arithmetic of time lost is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import typing as tp
from pathlib import Path

import matplotlib.image
import pytest

from radiodiff_resume.cli import EXIT_USER_ERROR, main
from radiodiff_resume.config import build_config
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.run import train
from radiodiff_resume.slurm.signals import STOP
from radiodiff_resume.tools.report import report
from radiodiff_resume.trainer import LatentDiffusionTrainer
from tests.checkpoint.helpers import torch_threads, truncate
from tests.conftest import REPO, tiny_raw

STOP_AT = 8
"""The LDM step the preemption signal arrives at (checkpoints every 3 steps: the rerun, finding the
newest one damaged, resumes from step 6)."""
JOB = ("model.first_stage.train_if_missing=true", "model.first_stage.trainer.save_and_sample_every=2",
       "trainer.train_num_steps=12", "trainer.log_freq=1", "trainer.save_and_sample_every=4",
       "checkpoint.every=3", "guard.rollback.max_consecutive_skips=2", "trainer.num_sample_images=1")


def events(folder: Path, kind: str) -> list[dict[str, tp.Any]]:
    lines = (folder / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Path:
    """A finished run's results folder: stage 1 trained first; in the LDM two Inf losses in a row
    (training forwards 6 and 7 of each process) skip two steps and roll back; SIGUSR1 at step 8
    stops the first process; the rerun quarantines the truncated step-8 checkpoint and resumes
    from step 6."""
    results = tmp_path_factory.mktemp("report") / "run"
    raw = tiny_raw(results, synth_cache)
    raw["model"]["unet"]["target"] = "tests.guard.faults.FaultyUNet"
    raw["model"]["unet"]["params"]["inf_loss_at"] = [6, 7]
    cfg = build_config(raw, JOB)
    after_step = LatentDiffusionTrainer.after_step

    def preempted(self: LatentDiffusionTrainer, *args: tp.Any) -> None:
        after_step(self, *args)
        if self.state.step == STOP_AT:
            os.kill(os.getpid(), signal.SIGUSR1)

    STOP.install()
    try:
        with torch_threads(1), pytest.MonkeyPatch.context() as m:
            m.setattr(LatentDiffusionTrainer, "after_step", preempted)
            with pytest.raises(StopRequested):
                train(cfg)
        truncate(results / "checkpoints" / f"step-{STOP_AT:08d}" / "model.safetensors")
        with torch_threads(1):
            train(cfg)
    finally:
        STOP.uninstall()
        STOP.clear()
    return results


def copy_logs(run: Path, to: Path) -> Path:
    """The files the report reads (not the checkpoints), in a folder of their own."""
    for name in ("metrics.jsonl", "events.jsonl", "config.yaml", "first_stage/metrics.jsonl",
                 "first_stage/events.jsonl"):
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / name, to / name)
    return to


def test_a_real_run_with_preemption_quarantine_and_rollbacks_is_counted_and_drawn(
        real_run: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    summary = report(real_run, png)

    ldm, first = summary["stages"]["ldm"], summary["stages"]["first_stage"]
    assert list(summary["stages"]) == ["first_stage", "ldm"]
    assert (first["step"], first["train_num_steps"], first["steps_redone"]) == (4, 4, 0)
    assert first["counts"]["saves"] == len(events(real_run / "first_stage", "checkpoint_saved")) == 2
    assert (ldm["step"], ldm["train_num_steps"]) == (12, 12)
    c = ldm["counts"]
    assert c["resumes"] == 1 and c["restarts"] == 1, "the rollbacks' reloads are no restarts"
    assert c["quarantines"] == 1 and c["stops"] == 1 and ldm["stop_reasons"] == {"SIGUSR1": 1}
    assert c["saves"] == len(events(real_run, "checkpoint_saved"))
    assert c["rollbacks"] == len(events(real_run, "rolled_back")) >= 1
    assert c["skipped_steps"] == len(events(real_run, "step_skipped")) >= 2
    assert c["halts"] == 0 and c["set_aside"] == 0
    [restart] = ldm["restarts"]
    assert (restart["from_step"], restart["to_step"], restart["steps_redone"]) == (STOP_AT, 6, 2)
    assert restart["cause"] == "stopped: SIGUSR1" and restart["down_s"] > 0 and restart["redone_s"] > 0
    [quarantined] = ldm["set_aside"]
    assert quarantined["checkpoint"] == f"step-{STOP_AT:08d}" and "structure FAILED" in quarantined["why"]
    rolled = sum(r["steps_redone"] for r in ldm["rollbacks"])
    assert rolled >= 1 and ldm["steps_redone"] == 2 + rolled
    assert ldm["steps_run"] == 12 + ldm["steps_redone"]
    lost = ldm["time_lost_s"]
    assert lost["total"] == pytest.approx(lost["down"] + lost["redone"]) and lost["total"] > 0
    val = ldm["last_validation"]
    assert val["step"] == 12 and val["valid"] and set(val["metrics"]) == {"rmse", "nmse", "psnr", "ssim"}
    assert summary["unreadable_lines"] == {} and summary["png"] == str(png)

    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert width >= 1000 and height >= 800, image.shape
    assert image.std() > 0.05, "not a blank picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"], "no temporary file left behind"


def test_text_summary_names_what_happened(real_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(real_run), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "first_stage: step 4 of 4 (done)" in out
    assert "ldm: step 12 of 12 (done)" in out
    assert f"restart after step {STOP_AT} (stopped: SIGUSR1), resumed at step 6" in out
    assert f"checkpoint quarantined: step-{STOP_AT:08d}: structure FAILED" in out
    assert "rollback at step" in out and "last validation (step 12, 4/4 samples)" in out
    assert out.rstrip().endswith(f"report drawn to {tmp_path / 'r.png'}")


def test_json_output_parses_and_the_default_png_lies_in_the_run(
        real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_logs(real_run, tmp_path / "run")
    assert main(["report", str(run), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["png"] == str(run / "report.png") and (run / "report.png").is_file()
    assert document["stages"]["ldm"]["counts"]["quarantines"] == 1
    assert document["stages"] == report(real_run, tmp_path / "again.png")["stages"]


def test_a_truncated_last_line_is_skipped_and_counted(real_run: Path, tmp_path: Path) -> None:
    """A process killed mid-write leaves half a line: the report reads the rest and says so."""
    run = copy_logs(real_run, tmp_path / "run")
    text = (run / "events.jsonl").read_text()
    last = text.splitlines()[-1]
    assert json.loads(last)["event"] == "checkpoint_saved"
    (run / "events.jsonl").write_text(text[: len(text) - len(last) // 2 - 1])
    with (run / "first_stage" / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "first_stage", "step": 5, "ti')

    summary = report(run, tmp_path / "r.png")

    assert summary["unreadable_lines"] == {"events.jsonl": 1, "first_stage/metrics.jsonl": 1}
    whole = report(real_run, tmp_path / "whole.png")["stages"]
    assert summary["stages"]["ldm"]["counts"]["saves"] == whole["ldm"]["counts"]["saves"] - 1
    assert summary["stages"]["first_stage"]["last_train"] == whole["first_stage"]["last_train"]
    assert matplotlib.image.imread(tmp_path / "r.png").shape[0] > 0


def test_a_killed_run_loses_its_downtime_and_the_steps_since_its_last_checkpoint(tmp_path: Path) -> None:
    """Hand-written logs with exact times: killed (no stop event) at step 5, resumed from step 4 at
    t=200; then a rollback from step 7 to step 6."""
    metrics = [{"stage": "ldm", "step": s, "time": 100.0 + s, "loss": 1.0 / s, "lr": 1e-3, "grad_norm": 2.0}
               for s in range(1, 6)]
    metrics += [{"stage": "ldm", "step": s, "time": 200.0 + s, "loss": 0.5, "lr": 1e-3} for s in (5, 6, 7)]
    metrics += [{"stage": "ldm", "step": 7, "time": 210.0, "loss": None, "lr": 1e-3, "invalid": ["loss"]}]
    evts = [
        {"time": 99.0, "event": "fresh_start", "stage": "ldm", "reason": "no checkpoint"},
        {"time": 104.5, "event": "checkpoint_saved", "stage": "ldm", "step": 4, "path": "c/step-00000004"},
        {"time": 200.0, "event": "resumed", "stage": "ldm", "step": 4, "path": "c/step-00000004"},
        {"time": 206.5, "event": "checkpoint_saved", "stage": "ldm", "step": 6, "path": "c/step-00000006"},
        {"time": 208.0, "event": "step_skipped", "stage": "ldm", "step": 8, "reason": "loss"},
        {"time": 209.0, "event": "resumed", "stage": "ldm", "step": 6, "path": "c/step-00000006"},
        {"time": 209.0, "event": "rolled_back", "stage": "ldm", "step": 7, "to_step": 6, "reason": "x"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evts))

    ldm = report(tmp_path)["stages"]["ldm"]

    [restart] = ldm["restarts"]
    assert restart == {"time": 200.0, "to_step": 4, "from_step": 5, "fresh": False,
                       "cause": "no stop recorded: killed or crashed", "steps_redone": 1,
                       "down_s": 95.0, "redone_s": 0.5}
    [rollback] = ldm["rollbacks"]
    assert (rollback["steps_redone"], rollback["redone_s"]) == (1, 2.5)
    assert ldm["time_lost_s"] == {"down": 95.0, "redone": 3.0, "total": 98.0}
    assert (ldm["step"], ldm["steps_redone"], ldm["counts"]["resumes"]) == (7, 2, 1)
    assert ldm["last_train"]["loss"] is None, "a non-finite loss stays null, never a number"
    assert (tmp_path / "report.png").is_file()


@pytest.mark.parametrize("case", ["missing", "empty", "out in a file"])
def test_user_errors_are_one_line_and_exit_2(case: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.jsonl").write_text('{"time": 1.0, "event": "fresh_start", "stage": "ldm"}\n')
    (tmp_path / "file").write_text("")
    argv = {"missing": [str(tmp_path / "nope")], "empty": [str(tmp_path / "empty")],
            "out in a file": [str(tmp_path / "run"), "--out", str(tmp_path / "file" / "r.png")]}[case]
    assert main(["report", *argv]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("error: ") and "Traceback" not in captured.err
    assert {"missing": "no such folder", "empty": "neither metrics.jsonl nor events.jsonl",
            "out in a file": "cannot write"}[case] in line


def test_importing_the_command_loads_neither_torch_nor_matplotlib() -> None:
    code = ("import sys, radiodiff_resume.tools.report; "
            "print(sorted({'torch', 'matplotlib'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip() == "[]"
