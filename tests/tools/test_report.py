"""``radiodiff-resume report``: on a real run that went through what a report must show — a first
stage, skipped steps escalating to rollbacks, a preemption (a real SIGUSR1), a damaged newest
checkpoint quarantined on the rerun and a resume from the older one —, on a real run that finished
and was extended later, with 80 skipped steps at one step, and on hand-written logs where the exact
arithmetic of time lost is checked. The picture is checked through its figure's artists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import typing as tp
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection

from radiodiff_resume.cli import EXIT_USER_ERROR, main
from radiodiff_resume.config import build_config
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.run import train
from radiodiff_resume.slurm.signals import STOP
from radiodiff_resume.tools.report import report
from radiodiff_resume.tools.report_data import load_run, summarize
from radiodiff_resume.tools.report_plot import build_figure
from radiodiff_resume.trainer import LatentDiffusionTrainer
from tests.checkpoint.helpers import torch_threads, truncate
from tests.conftest import REPO, tiny_raw

STOP_AT = 8
"""The LDM step the preemption signal arrives at (checkpoints every 3 steps: the rerun, finding the
newest one damaged, resumes from step 6)."""
JOB = ("model.first_stage.train_if_missing=true", "model.first_stage.trainer.save_and_sample_every=2",
       "trainer.train_num_steps=12", "trainer.log_freq=1", "trainer.save_and_sample_every=4",
       "checkpoint.every=3", "guard.rollback.max_consecutive_skips=2", "trainer.num_sample_images=1")
FINISHED_AT, EXTENDED_TO, SKIPS = 100, 220, 80
"""The extended run: trained to step 100 and finished; rerun later with 220 steps, where training
forwards 101..180 of the second process (step 201 attempted) give an Inf loss, all skipped (no
rollback: it would take 81 in a row)."""
EXTENDED = ("model.first_stage.train_if_missing=true", "trainer.log_freq=10",
            "trainer.save_and_sample_every=50", "checkpoint.every=50",
            f"guard.rollback.max_consecutive_skips={SKIPS + 1}")
SKIPPED_AT = 2 * FINISHED_AT + 1
"""The step the 80 skips attempt: the second process's first 100 forwards trained steps 101..200."""
IDLE_S = 1200.0
"""The idle gap written into a copy of the extended run: its second process starts 20 minutes later."""


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

    def preempted(self: LatentDiffusionTrainer, *args: tp.Any) -> bool:
        stop = after_step(self, *args)
        if self.state.step == STOP_AT - 1:  # agreed on step STOP_AT's all-reduce: the stop saves STOP_AT
            os.kill(os.getpid(), signal.SIGUSR1)
        return stop

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


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Path:
    """A run trained to its target of 100 steps, then extended to 220 by a second process (the
    same config but ``trainer.train_num_steps``), which skipped 80 steps in a row at step 201."""
    results = tmp_path_factory.mktemp("report") / "extended"
    raw = tiny_raw(results, synth_cache)
    raw["model"]["unet"]["target"] = "tests.guard.faults.FaultyUNet"
    raw["model"]["unet"]["params"]["inf_loss_at"] = list(range(FINISHED_AT + 1, FINISHED_AT + 1 + SKIPS))
    with torch_threads(1):
        for steps in (FINISHED_AT, EXTENDED_TO):
            train(build_config(raw, (*EXTENDED, f"trainer.train_num_steps={steps}")))
    return results


def ldm_figure(run_dir: Path) -> tuple[tp.Any, tp.Any]:
    """The report's figure of ``run_dir`` and its LDM block (the subfigure titled so)."""
    fig = build_figure(run := load_run(run_dir), summarize(run))
    [block] = [sf for sf in fig.subfigs if sf._suptitle.get_text() == "stage ldm"]
    return fig, block


def titled(block: tp.Any, prefix: str) -> list[tp.Any]:
    return [ax for ax in block.axes if ax.get_title().startswith(prefix)]


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
    assert json.loads(last)["event"] == "finished"
    (run / "events.jsonl").write_text(text[: len(text) - len(last) // 2 - 1])
    with (run / "first_stage" / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "first_stage", "step": 5, "ti')

    summary = report(run, tmp_path / "r.png")

    assert summary["unreadable_lines"] == {"events.jsonl": 1, "first_stage/metrics.jsonl": 1}
    whole = report(real_run, tmp_path / "whole.png")["stages"]
    assert "finished" not in summary["stages"]["ldm"]["events"] and whole["ldm"]["events"]["finished"] == 1
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
                       "down_s": 95.0, "idle_s": 0.0, "redone_s": 0.5}
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


def test_a_finished_run_extended_later_was_idle_not_killed(extended_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The trainer writes ``finished`` when a run reaches its target; the report counts the time until
    the run is extended as idle, not as down time of a killed process."""
    assert [(e["step"], e["train_num_steps"]) for e in events(extended_run, "finished")] == [
        (FINISHED_AT, FINISHED_AT), (EXTENDED_TO, EXTENDED_TO)]
    assert [e["step"] for e in events(extended_run / "first_stage", "finished")] == [4]

    ldm = report(extended_run, tmp_path / "r.png")["stages"]["ldm"]

    [restart] = ldm["restarts"]
    assert (restart["from_step"], restart["to_step"], restart["steps_redone"]) == (FINISHED_AT,) * 2 + (0,)
    assert restart["cause"] == f"had finished at step {FINISHED_AT} of {FINISHED_AT}"
    assert restart["down_s"] == 0 and restart["idle_s"] > 0
    assert ldm["time_lost_s"] == {"down": 0.0, "redone": 0.0, "total": 0.0}
    assert ldm["time_idle_s"] == restart["idle_s"]
    assert main(["report", str(extended_run), "--out", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    assert "killed or crashed" not in out and "time lost: none recorded" in out
    assert f"restart after step {FINISHED_AT} (had finished at step {FINISHED_AT} of {FINISHED_AT}), " \
           f"resumed at step {FINISHED_AT}: " in out


def test_an_older_run_without_finished_events_is_read_from_its_config_change(
        extended_run: Path, tmp_path: Path) -> None:
    """Runs written before the ``finished`` event: the resume's ``config_changed`` shows the step
    target the first process had reached."""
    run = copy_logs(extended_run, tmp_path / "run")
    for log in (run / "events.jsonl", run / "first_stage" / "events.jsonl"):
        log.write_text("".join(line for line in log.read_text().splitlines(keepends=True)
                               if json.loads(line)["event"] != "finished"))

    ldm = report(run, tmp_path / "r.png")["stages"]["ldm"]

    [restart] = ldm["restarts"]
    assert restart["cause"] == f"had finished: train_num_steps was {FINISHED_AT}, now {EXTENDED_TO}"
    assert restart["down_s"] == 0 and restart["idle_s"] > 0 and ldm["time_lost_s"]["total"] == 0


def test_a_long_idle_gap_is_cut_short_on_the_time_axis(extended_run: Path, tmp_path: Path) -> None:
    """The second process started 20 minutes after the first finished: the gap is drawn as a narrow
    cut of the progress axis with its length written on it, the two processes keep their room."""
    run = copy_logs(extended_run, tmp_path / "run")
    [first_end, _] = events(run, "finished")
    for log in (run / "events.jsonl", run / "metrics.jsonl"):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        for r in records:
            r["time"] += IDLE_S if r["time"] > first_end["time"] else 0.0
        log.write_text("".join(json.dumps(r) + "\n" for r in records))

    ldm = report(run, tmp_path / "r.png")["stages"]["ldm"]
    assert ldm["time_idle_s"] > IDLE_S and ldm["time_lost_s"]["total"] == 0
    fig, block = ldm_figure(run)
    [ax] = titled(block, "progress")
    FigureCanvasAgg(fig).draw()

    first, second = [line.get_xdata() for line in ax.lines if line.get_color() == "tab:gray"]
    pixels = [ax.transData.transform((x, 0))[0] / ax.bbox.width
              for x in (first[0], first[-1], second[0], second[-1])]
    assert pixels[2] - pixels[1] < 0.1, "the 20 minutes take a sliver of the axis"
    assert pixels[1] - pixels[0] > 0.2 and pixels[3] - pixels[2] > 0.3, "both processes keep their room"
    [cut] = [t.get_text() for t in ax.texts]
    assert re.fullmatch(r"axis cut: 20\.[01] min idle", cut), cut
    ticks = ax.xaxis.get_majorticklocs()
    assert any(t < first[-1] for t in ticks) and any(t > second[0] for t in ticks), "true times both sides"


def test_a_rebaselined_loss_window_is_drawn_where_it_happened(real_run: Path, tmp_path: Path) -> None:
    """The guard's ``loss_rebaselined`` event (the fields it emits) is a marker on every step axis of its
    stage, with its own legend entry: the skips before it and the losses after it read as one story."""
    run = copy_logs(real_run, tmp_path / "run")
    at = next(e for e in events(run, "checkpoint_saved") if e["step"] > 6)
    rebased = {"event": "loss_rebaselined", "time": at["time"] + 1e-3, "stage": "ldm", "step": 10, "rank": 0,
               "spikes": 10, "level": 0.5}
    with (run / "events.jsonl").open("a") as f:
        f.write(json.dumps(rebased) + "\n")

    fig, block = ldm_figure(run)
    marked = [ax for ax in block.axes if any(
        line.get_color() == "tab:olive" and list(line.get_xdata()) == [10, 10] for line in ax.lines)]
    assert len(marked) >= 3, "loss, gradient and skip panels at least"
    [legend] = fig.legends
    assert "loss spikes taken as the new level" in [t.get_text() for t in legend.get_texts()]
    _, plain = ldm_figure(real_run)
    assert not any(line.get_color() == "tab:olive" for ax in plain.axes for line in ax.lines)


def test_eighty_skips_at_one_step_are_drawn_however_long_the_run(extended_run: Path) -> None:
    """On a 220-step axis a step is narrower than a pixel: the skips are drawn as a stem and a marker
    sized in points, so 80 of them at one step stand out."""
    skipped = events(extended_run, "step_skipped")
    assert len(skipped) == SKIPS and {e["step"] for e in skipped} == {SKIPPED_AT}
    fig, block = ldm_figure(extended_run)
    [ax] = titled(block, "skipped")
    FigureCanvasAgg(fig).draw()

    one_step = ax.transData.transform((1, 0))[0] - ax.transData.transform((0, 0))[0]
    assert one_step < 2, "a step is about a pixel wide here"
    [marker] = [line for line in ax.lines if (SKIPPED_AT, SKIPS) in zip(line.get_xdata(), line.get_ydata(),
                                                                       strict=True)]
    assert marker.get_marker() == "o" and marker.get_markersize() >= 5
    [stem] = [c for c in ax.collections if isinstance(c, LineCollection)]
    [[(x0, y0), (x1, y1)]] = stem.get_segments()
    assert (x0, y0, x1, y1) == (SKIPPED_AT, 0, SKIPPED_AT, SKIPS) and stem.get_linewidths()[0] >= 2
    assert ax.get_ylim()[1] > SKIPS and ax.get_xlim()[0] < SKIPPED_AT < ax.get_xlim()[1]


@pytest.mark.parametrize("which", ["real_run", "extended_run"])
def test_each_validation_metric_has_a_readable_axis_of_its_own(which: str,
                                                               request: pytest.FixtureRequest) -> None:
    """rmse (~0.38) and ssim (~0.01) move by a few thousandths: on one shared axis they are flat lines
    under one tick; each on its own axis, its curve fills the axis and reads off several ticks."""
    fig, block = ldm_figure(request.getfixturevalue(which))
    FigureCanvasAgg(fig).draw()

    for metric in ("rmse", "nmse", "psnr", "ssim"):
        [ax] = [ax for ax in block.axes if ax.get_ylabel().split(" (")[0] == metric]
        [curve] = [line for line in ax.lines if line.get_marker() == "o"]
        lo, hi = ax.get_ylim()
        values = curve.get_ydata()
        assert (max(values) - min(values)) / (hi - lo) > 0.5, f"{metric}: the curve fills its axis"
        labels = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
        assert len(set(labels)) == len(labels) >= 3, (metric, labels)


def test_the_summary_text_fits_its_panel_clear_of_the_legend_and_plots(real_run: Path) -> None:
    """The summary lies inside the room the layout gave its panel: one that spills out of it runs
    under the figure's legend, which the layout placed where the panel ends."""
    fig = build_figure(run := load_run(real_run), summarize(run))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)

    for block in fig.subfigs:
        name = block._suptitle.get_text().removeprefix("stage ")
        [(home, text)] = [(ax, t) for ax in block.axes for t in ax.texts
                          if t.get_text().startswith(f"{name}: ")]
        box = text.get_window_extent(renderer)
        assert not box.overlaps(legend), f"{name}: the legend hides the summary's last lines"
        assert home.bbox.y0 <= box.y0 and box.y1 <= home.bbox.y1, f"{name}: the summary spills out"
        assert box.x1 <= fig.bbox.x1, name
        assert not [ax.get_title() for ax in block.axes if ax is not home and box.overlaps(ax.bbox)]
