"""A real signal at any moment of a job — data preparation, first-stage training, between the
stages, during validation — stops it at the next step boundary with a committed checkpoint, and
running the job again finishes it with the same weights as an uninterrupted run, bit for bit.

In-process (one process): the signal is sent with ``os.kill`` to this very process from inside
the phase under test, so it lands there every time; the multi-process and SLURM runs are in
``test_stop_processes.py`` and ``test_requeue.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import typing as tp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import radiodiff_resume.run as run_mod
from radiodiff_resume.config import Config
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.run import train
from radiodiff_resume.slurm.signals import STOP
from radiodiff_resume.trainer import AutoencoderTrainer, LatentDiffusionTrainer

pytestmark = pytest.mark.slow

JOB = ("model.first_stage.train_if_missing=true", "model.first_stage.trainer.train_num_steps=4",
       "model.first_stage.trainer.save_and_sample_every=2", "trainer.train_num_steps=6",
       "trainer.save_and_sample_every=3", "checkpoint.keep_last=2")


pytestmark = pytest.mark.usefixtures("installed_stop_flag")


def signal_once(sig: int = signal.SIGUSR1) -> tp.Callable[[], None]:
    sent: list[bool] = []

    def send() -> None:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), sig)
    return send


def weights(cfg: Config) -> dict[str, dict[str, torch.Tensor]]:
    final = cfg.results_folder / "final"
    return {"first stage": load_file(str(cfg.model.first_stage.ckpt_path)),
            "model": load_file(str(final / "model.safetensors")),
            "ema": load_file(str(final / "model_ema.safetensors"))}


def assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def events(folder: Path) -> list[dict[str, tp.Any]]:
    path = folder / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def straight(
    tmp_path_factory: pytest.TempPathFactory, synth_cache: Path
) -> dict[str, dict[str, torch.Tensor]]:
    from radiodiff_resume.config import build_config
    from tests.conftest import tiny_raw

    cfg = build_config(tiny_raw(tmp_path_factory.mktemp("straight") / "run", synth_cache), JOB)
    STOP.install()
    try:
        train(cfg)
    finally:
        STOP.uninstall()
    return weights(cfg)


def interrupt(monkeypatch: pytest.MonkeyPatch, phase: str, send: tp.Callable[[], None]) -> None:
    """Send the signal from inside ``phase`` of the next run."""
    if phase == "data preparation":
        load_data = run_mod.load_data

        def loading(*args: tp.Any) -> tp.Any:
            send()
            return load_data(*args)
        monkeypatch.setattr(run_mod, "load_data", loading)
    elif phase == "first stage":
        after = AutoencoderTrainer.after_step

        def after_step(self: AutoencoderTrainer, *args: tp.Any) -> bool:
            stop = after(self, *args)
            if self.state.step == 1:
                send()
            return stop
        monkeypatch.setattr(AutoencoderTrainer, "after_step", after_step)
    elif phase == "between the stages":
        end = AutoencoderTrainer.on_fit_end

        def on_fit_end(self: AutoencoderTrainer) -> None:
            end(self)
            send()
        monkeypatch.setattr(AutoencoderTrainer, "on_fit_end", on_fit_end)
    elif phase == "validation":
        write = LatentDiffusionTrainer.write_samples

        def write_samples(self: LatentDiffusionTrainer) -> None:
            if self.state.step == 3:
                send()
            write(self)
        monkeypatch.setattr(LatentDiffusionTrainer, "write_samples", write_samples)
    else:
        raise AssertionError(phase)


@pytest.mark.parametrize("phase, stage, step", [
    ("data preparation", "first_stage", 0),
    ("first stage", "first_stage", 2),  # sent after step 1's all-reduce: agreed on step 2's
    ("between the stages", "ldm", 0),
    ("validation", "ldm", 3),
])
def test_a_signal_in_any_phase_stops_at_a_boundary_and_the_rerun_matches(
    make_cfg: tp.Callable[..., Config], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    straight: dict[str, dict[str, torch.Tensor]], phase: str, stage: str, step: int,
) -> None:
    cfg = make_cfg(*JOB)
    with monkeypatch.context() as m:
        interrupt(m, phase, signal_once())
        with pytest.raises(StopRequested, match=rf"{stage} stopped at step {step} \(SIGUSR1\)"):
            train(cfg)
    assert STOP.reason is None, "the stop was acted on"
    folder = cfg.first_stage_folder() if stage == "first_stage" else cfg.results_folder
    stopped = [e for e in events(folder) if e["event"] == "stopped"]
    assert [(e["step"], e["reason"]) for e in stopped] == [(step, "SIGUSR1")]
    saved = [e["step"] for e in events(folder) if e["event"] == "checkpoint_saved"]
    assert (step in saved) == (step > 0), "a stop commits the step it stopped at (nothing if none ran)"

    with caplog.at_level(logging.INFO):
        train(cfg)
    if step > 0:
        resumed = [e["step"] for e in events(folder) if e["event"] == "resumed"]
        assert resumed == [step], "the rerun starts where the stop saved: no step lost or done twice"
    assert "a stop signal needs" in caplog.text, "the step and save times are reported"
    assert_same(straight, weights(cfg))
