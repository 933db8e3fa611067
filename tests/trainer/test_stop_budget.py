"""A stop fits the time that is left (issue 18 item 1): the job's end time as Slurm gives it, the
clock's decision, a clock stop in a real run, and a stop that lands on a validation step deferring
that validation to the resume — with the metrics and weights of an uninterrupted run, bit for bit.

Real runs in this process (one rank), real signals (``os.kill``), the real environment variables
Slurm sets; the multi-process agreement is in ``tests/guard/test_syncs.py``, the cluster jobs in
``tests/slurm/test_clock_stop.py``.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import typing as tp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radiodiff_resume.config import Config
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.run import train
from radiodiff_resume.slurm.budget import (
    CLOCK,
    StopBudget,
    end_time_from_env,
    job_end_time,
    parse_end_time,
)

pytestmark = pytest.mark.usefixtures("installed_stop_flag")


# ----- the end time


def test_end_time_as_squeue_and_scontrol_print_it() -> None:
    assert parse_end_time("2026-12-06T09:52:01\n") == datetime.datetime(2026, 12, 6, 9, 52, 1).timestamp()
    for unknown in ("Unknown", "N/A", "NONE", "", "INVALID"):
        assert parse_end_time(unknown) is None, unknown


def test_end_time_from_slurm_job_end_time() -> None:
    assert end_time_from_env({"SLURM_JOB_END_TIME": "1796550000"}) == 1796550000.0
    for unset in ({}, {"SLURM_JOB_END_TIME": "0"}, {"SLURM_JOB_END_TIME": "soon"}):
        assert end_time_from_env(unset) is None, unset
    # where Slurm sets it, the controller is not asked
    assert job_end_time("1", {"SLURM_JOB_END_TIME": "1796550000"}) == 1796550000.0


# ----- the decision


def test_the_clock_stops_when_a_step_a_validation_and_a_save_no_longer_fit() -> None:
    budget = StopBudget("ldm", None, under_slurm=True, margin_s=10)
    assert not budget.out_of_time(validation_due=True), "no end time known: never"
    budget.step(5.0)
    budget.step(4.0)
    budget.saved(2.0)
    budget.validated(30.0)
    assert budget.need_s(False) == 10 + 5 + 2 and budget.need_s(True) == 10 + 5 + 2 + 30
    budget.time_left(1000)
    assert not budget.out_of_time() and not budget.out_of_time(validation_due=True)
    budget.time_left(40)  # 17 s fit, 47 s do not: stop before the validation, not before a plain step
    assert not budget.out_of_time() and budget.out_of_time(validation_due=True)
    budget.time_left(16)
    assert budget.out_of_time()
    budget.time_left(None)
    assert not budget.out_of_time(), "the end time became unknown"
    off = StopBudget("ldm", None, under_slurm=True, margin_s=None)
    off.time_left(0)
    assert not off.out_of_time(), "slurm.stop_margin_s null: no clock-based stop"


def test_the_margin_is_checked_when_the_config_is_built(synth_cache: Path, tmp_path: Path) -> None:
    from radiodiff_resume.config import build_config
    from radiodiff_resume.errors import ConfigError
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path / "run", synth_cache)
    assert build_config(raw, ["slurm.stop_margin_s=60"]).slurm.stop_margin_s == 60
    assert build_config(raw).slurm.stop_margin_s == 60, "on by default: a job without --signal stops in time"
    assert build_config(raw, ["slurm.stop_margin_s=null"]).slurm.stop_margin_s is None
    for bad in ("-1", "3600"):  # the default time limit is 60 min
        with pytest.raises(ConfigError, match=r"slurm\.stop_margin_s: got .*less than slurm\.time_min"):
            build_config(raw, [f"slurm.stop_margin_s={bad}"])


# ----- real runs

STEPS, VALIDATE = 12, 3


def val_rows(results: Path) -> dict[int, dict[str, tp.Any]]:
    rows = [json.loads(x) for x in (results / "metrics.jsonl").read_text().splitlines()]
    found: dict[int, dict[str, tp.Any]] = {}
    for row in rows:
        values = {k: v for k, v in row.items() if k.startswith("val/")}
        if values:
            assert row["step"] not in found, f"step {row['step']} validated twice"
            found[row["step"]] = values
    return found


def events(results: Path, kind: str) -> list[dict[str, tp.Any]]:
    lines = (results / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def final_weights(cfg: Config) -> dict[str, torch.Tensor]:
    return load_file(str(cfg.results_folder / "final" / "model.safetensors"))


def job(make_cfg: tp.Callable[..., Config], results: Path, *overrides: str) -> Config:
    from tests.conftest import write_random_first_stage

    cfg = make_cfg(f"trainer.train_num_steps={STEPS}", f"trainer.save_and_sample_every={VALIDATE}",
                   "trainer.val_batches=1", "trainer.num_sample_images=1", "checkpoint.every=100",
                   f"model.first_stage.ckpt_path={results.parent / 'ae.safetensors'}", *overrides,
                   results=results)
    if not Path(cfg.model.first_stage.ckpt_path).exists():
        write_random_first_stage(cfg)
    return cfg


@pytest.mark.slow
def test_a_stop_on_a_validation_step_defers_the_validation_to_the_resume(
        make_cfg: tp.Callable[..., Config], tmp_path: Path) -> None:
    straight = job(make_cfg, tmp_path / "straight")
    train(straight)
    # The same numbers, with a real SIGUSR1 inside every 3rd training step of each process: each run
    # stops on a validation step (3, 6, 9, 12) and the next resumes there.
    cfg = job(make_cfg, tmp_path / "stopped", "model.unet.target=tests.trainer.signalling.SignallingUNet",
              f"model.unet.params.every={VALIDATE}")
    stops = []
    for _ in range(STEPS // VALIDATE + 1):
        try:
            train(cfg)
        except StopRequested as exc:
            step = events(cfg.results_folder, "stopped")[-1]["step"]
            stops.append(step)
            assert exc.reason == "SIGUSR1"
            assert step not in val_rows(cfg.results_folder), "the stop came before the validation"
        else:
            break
    assert stops == [3, 6, 9, 12], stops
    assert [e["step"] for e in events(cfg.results_folder, "validation_deferred")] == stops
    assert [e["step"] for e in events(cfg.results_folder, "resumed")] == stops
    assert val_rows(cfg.results_folder) == val_rows(straight.results_folder), "the same metrics, each once"
    got, want = final_weights(cfg), final_weights(straight)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


@pytest.mark.slow
def test_the_job_clock_stops_a_run_no_signal_reached(
        make_cfg: tp.Callable[..., Config], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a SLURM job whose end time is nearer than ``slurm.stop_margin_s`` (``SLURM_JOB_END_TIME``,
    as Slurm sets it), the run stops by itself before its first step, with the clock's reason (which
    requeues the job); far from it, the run trains to the end."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 30))
    cfg = job(make_cfg, tmp_path / "run", "slurm.stop_margin_s=600")
    with pytest.raises(StopRequested, match=r"ldm stopped at step 0 \(clock\)") as stopped:
        train(cfg)
    assert stopped.value.reason == CLOCK
    assert [(e["step"], e["reason"]) for e in events(cfg.results_folder, "stopped")] == [(0, CLOCK)]
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 3600))
    train(cfg)
    assert events(cfg.results_folder, "finished")[-1]["step"] == STEPS


@pytest.mark.slow
def test_evaluate_stops_on_the_job_clock_and_resumes(golden: tp.Any, synth_cache: Path,
                                                     tmp_path: Path) -> None:
    """``evaluate`` in a SLURM job whose end is nearer than ``slurm.stop_margin_s``: it stops after its
    first round of maps with the clock's reason (exit 3), and the rerun, far from the end, samples the
    rest without sampling the first maps again."""
    import shutil
    import subprocess
    import sys

    from radiodiff_resume.config import build_config, to_yaml
    from tests.checkpoint.helpers import GOLDEN
    from tests.conftest import REPO, tiny_raw
    from tests.tools.test_evaluate import MAPS, SETTINGS, record_lines

    results = tmp_path / "run"
    results.mkdir()
    shutil.copytree(golden.results / "checkpoints", results / "checkpoints")
    shutil.copy2(golden.results / "ae.safetensors", results / "ae.safetensors")
    cfg = tmp_path / "run.yaml"
    raw = tiny_raw(results, synth_cache)
    cfg.write_text(to_yaml(build_config(raw, [*GOLDEN, "slurm.stop_margin_s=600"])))
    out = tmp_path / "out"

    def evaluate(seconds_left: int) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "4242",
               "SLURM_JOB_END_TIME": str(int(time.time()) + seconds_left)}
        command = [sys.executable, "-m", "radiodiff_resume.cli", "evaluate", "--cfg", str(cfg), *SETTINGS,
                   "--batch-size", "2", "--out", str(out)]
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    stopped = evaluate(30)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "evaluate stopped (clock on rank 0)" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    assert len(record_lines(out)) == 2, "one round of one batch, then the stop"
    finished = evaluate(3600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "2 done before" in finished.stdout + finished.stderr
    assert len(record_lines(out)) == MAPS
