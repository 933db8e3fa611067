"""``radiodiff-resume evaluate`` on a real 4-step run of the tiny config with RadioDiff's objective: PNGs
under RadioDiff's names, metrics that match their formulas recomputed here from the written PNGs, a resume
after a real SIGKILL that ends with the uninterrupted run's table without sampling finished maps again, two
processes that give one process's table, user errors as one line with exit 2, and a RadioDiff sample yaml
whose sampler section sets evaluate's defaults."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from radiodiff_resume.build import build_datasets, dataset_root, write_untrained_first_stage
from radiodiff_resume.cli import main
from radiodiff_resume.config import build_config, load_config, to_yaml
from radiodiff_resume.errors import UserError
from radiodiff_resume.evaluation.metrics import map_metrics, summarize
from radiodiff_resume.evaluation.sample_yaml import check_window, read_sampler
from radiodiff_resume.io import json_objects
from radiodiff_resume.run import build_ldm_trainer
from radiodiff_resume.tools import evaluate
from radiodiff_resume.tools.evaluate import Options
from tests.checkpoint.helpers import GOLDEN, torch_threads
from tests.conftest import REPO, tiny_raw
from tests.trainer.test_multiprocess import accelerate_launch

SAMPLE_YAML = Path(__file__).parent / "fixtures" / "radiodiff_sample.yaml"
SETTINGS = ("--split", "train", "--sampling-timesteps", "60")
"""The 8 training maps, with enough sampler steps (about half a second a map here) to kill the run
between two maps."""
MAPS = 8


def evaluate_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "radiodiff_resume.cli", "evaluate", "--cfg", str(cfg), *args]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory: pytest.TempPathFactory, synth_cache: Path) -> Path:
    """The YAML config of a real 4-step run with ``model.objective: radiodiff`` (checkpoints: steps 2, 4)."""
    base = tmp_path_factory.mktemp("eval-run")
    cfg = build_config(tiny_raw(base / "run", synth_cache), [*GOLDEN, "model.objective=radiodiff"])
    write_untrained_first_stage(cfg)
    with torch_threads(1):
        build_ldm_trainer(cfg, Accelerator()).fit()
    path = base / "run.yaml"
    path.write_text(to_yaml(cfg))
    return path


@pytest.fixture(scope="module")
def reference(run_cfg: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted evaluation in one process: its folder and its stdout."""
    out = tmp_path_factory.mktemp("eval-reference") / "out"
    proc = evaluate_cli(run_cfg, *SETTINGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def pngs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def record_lines(out: Path) -> list[dict[str, tp.Any]]:
    lines: list[dict[str, tp.Any]] = []
    for file in sorted((out / "records").glob("*.jsonl")):
        lines += json_objects(file.read_bytes())
    return lines


def recorded(out: Path) -> int:
    return len(record_lines(out)) if (out / "records").is_dir() else 0


def ssim_reference(p: np.ndarray, t: np.ndarray, data_range: float) -> float:
    """SSIM of Wang et al. with an 11×11 Gaussian window (σ 1.5), averaged where the window fits inside."""
    x = np.arange(11) - 5.0
    g = np.exp(-((x / 1.5) ** 2) / 2)
    w = np.outer(g, g) / g.sum() ** 2

    def local(a: np.ndarray) -> np.ndarray:
        return (sliding_window_view(a, (11, 11)) * w).sum(axis=(-1, -2))

    mp, mt = local(p), local(t)
    vp, vt, cov = local(p * p) - mp**2, local(t * t) - mt**2, local(p * t) - mp * mt
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mp * mt + c1) * (2 * cov + c2)) / ((mp**2 + mt**2 + c1) * (vp + vt + c2))).mean())


# ----- the metric conventions ---------------------------------------------------------------------------


def test_each_convention_follows_its_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 32, 32, generator=gen, dtype=torch.float64) * 0.6 + 0.2  # range ≈ 0.6, not 1
    pred = (target + 0.05 * torch.randn(target.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    values = map_metrics(pred * 2 - 1, target * 2 - 1)
    for v, p, t in zip(values, pred[:, 0].numpy(), target[:, 0].numpy(), strict=True):
        mse = float(((p - t) ** 2).mean())
        span = float(t.max() - t.min())
        both = max(float(p.max() - p.min()), span)
        assert v["rmse"] == pytest.approx(math.sqrt(mse), rel=1e-9)
        assert v["nmse"] == pytest.approx(mse / float((t**2).mean()), rel=1e-9)
        assert v["psnr_range_radiodiff"] == pytest.approx(span, rel=1e-12)
        assert v["psnr_radiodiff"] == pytest.approx(10 * math.log10(span**2 / mse), abs=1e-9)
        assert v["ssim_range_radiodiff"] == pytest.approx(both, rel=1e-12)
        assert v["ssim_radiodiff"] == pytest.approx(ssim_reference(p, t, both), abs=1e-10)
        assert v["psnr_fixed"] == pytest.approx(10 * math.log10(1 / mse), abs=1e-4)
        assert v["psnr_radiodiff"] - v["psnr_fixed"] == pytest.approx(20 * math.log10(span), abs=1e-4), \
            "the conventions differ exactly by the data range"
        assert abs(ssim_reference(p, t, 1.0) - v["ssim_radiodiff"]) > 1e-5, "the range matters to SSIM too"


def test_a_value_that_is_not_finite_is_left_out_and_counted() -> None:
    flat = torch.full((1, 1, 16, 16), 0.2, dtype=torch.float64)
    [v] = map_metrics(flat + 0.1, flat)
    assert v["psnr_radiodiff"] is None, "a constant target has data range 0: PSNR -inf"
    assert v["rmse"] == pytest.approx(0.05)
    other = {"nmse": 1.0, "rmse": 2.0, "ssim_radiodiff": 0.5, "psnr_radiodiff": 10.0}
    table = summarize([v, other], "radiodiff")
    assert table["psnr"] == {"mean": 10.0, "std": 0.0, "count": 1}
    assert table["rmse"]["count"] == 2
    assert table["rmse"]["std"] == pytest.approx(abs(2.0 - 0.05) / 2), "population std over the maps"


# ----- a real evaluation ---------------------------------------------------------------------------------


def test_pngs_carry_radiodiffs_names_and_the_metrics_their_formulas(run_cfg: Path,
                                                                     reference: tuple[Path, str]) -> None:
    out, stdout = reference
    cfg = load_config(run_cfg)
    train_set, _ = build_datasets(cfg, dataset_root(cfg))
    samples = [train_set[i] for i in range(len(train_set))]
    assert len(samples) == MAPS
    assert sorted(pngs(out)) == sorted(s["img_name"] for s in samples)
    assert all(s["img_name"] == f"{s['name']}.png" for s in samples), "RadioDiff's {map}_{tx}.png"
    table = rows(out)
    assert [int(r["index"]) for r in table] == list(range(MAPS))
    quantum = 0.5 / 255  # a PNG pixel is within half a grey level of the sampled value
    for r, s in zip(table, samples, strict=True):
        assert r["img_name"] == s["img_name"]
        with Image.open(out / r["img_name"]) as image:
            assert (image.mode, image.size) == ("L", (32, 32))
            p = np.asarray(image, dtype=np.float64) / 255
        t = (s["image"][0].double().numpy() + 1) / 2
        rmse = float(r["rmse"])
        assert abs(rmse - math.sqrt(float(((p - t) ** 2).mean()))) <= quantum + 1e-12
        assert float(r["nmse"]) == pytest.approx(rmse**2 / float((t**2).mean()), rel=1e-9)
        span = float(t.max() - t.min())
        assert float(r["psnr_range_radiodiff"]) == pytest.approx(span, rel=1e-6)
        assert float(r["psnr_radiodiff"]) == pytest.approx(20 * math.log10(span / rmse), abs=1e-6)
        assert float(r["psnr_fixed"]) == pytest.approx(-20 * math.log10(rmse), abs=1e-4)
        both = float(r["ssim_range_radiodiff"])
        assert abs(both - max(float(p.max() - p.min()), span)) <= 2 * quantum
        assert float(r["ssim_radiodiff"]) == pytest.approx(ssim_reference(p, t, both), abs=0.02)
    doc = json.loads((out / "metrics.json").read_text())
    for metric, key in (("nmse", "nmse"), ("rmse", "rmse"), ("ssim", "ssim_radiodiff"),
                        ("psnr", "psnr_radiodiff")):
        values = np.array([float(r[key]) for r in table])
        summary = doc["summary"]["radiodiff"][metric]
        assert summary["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert summary["std"] == pytest.approx(values.std(), rel=1e-9)
        line = next(x for x in stdout.splitlines() if x.startswith(metric.upper()))
        assert line.split()[1:4] == [f"{values.mean():.6g}", f"{values.std():.6g}", f"{MAPS}/{MAPS}"]
    assert "data range from each map" in stdout and "PSNR max − min of the target" in stdout
    assert doc["summary"]["fixed"]["psnr"]["mean"] == pytest.approx(
        np.mean([float(r["psnr_fixed"]) for r in table]), rel=1e-12)
    assert doc["settings"]["weights"]["ema"] is True and doc["settings"]["weights"]["step"] == 4


def interrupt(cfg: Path, out: Path, sig: int, after: int, log: Path) -> int:
    """Start an evaluation into ``out``, send ``sig`` once ``after`` maps are recorded; its exit status."""
    command = [sys.executable, "-m", "radiodiff_resume.cli", "evaluate", "--cfg", str(cfg), *SETTINGS,
               "--out", str(out)]
    with log.open("w") as f:
        proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=f, stderr=f)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and recorded(out) < after:
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        return proc.wait(timeout=300)


@pytest.mark.slow
def test_a_stopped_then_killed_evaluation_resumes_to_the_same_table_without_redoing_maps(
        run_cfg: Path, reference: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert interrupt(run_cfg, out, signal.SIGUSR1, 1, tmp_path / "stopped.log") == 3
    stopped = len(record_lines(out))
    assert "stopped: evaluate stopped (SIGUSR1 on rank 0)" in (tmp_path / "stopped.log").read_text()
    assert 0 < stopped < MAPS - 2, f"stopped at a map boundary: {stopped} of {MAPS} maps recorded"

    assert interrupt(run_cfg, out, signal.SIGKILL, stopped + 1, tmp_path / "killed.log") == -signal.SIGKILL
    before = {r["img_name"]: (out / r["img_name"]).stat().st_ino for r in record_lines(out)}
    assert stopped < len(before) < MAPS, f"killed mid-evaluation: {len(before)} of {MAPS} maps recorded"
    assert f"{stopped} done before" in (tmp_path / "killed.log").read_text()
    assert not (out / "metrics.csv").exists()
    todo = sorted(set(pngs(reference[0])) - set(before))
    (out / todo[0]).write_bytes(pngs(reference[0])[todo[0]][:40])  # a PNG cut short, as by a plain write
    (out / f".{todo[-1]}.tmp-99999").write_bytes(b"\x89PNG")  # an atomic write a kill left behind
    with (out / "records" / "rank-000.jsonl").open("a") as f:
        f.write('{"index": 7, "img_name": "')  # a record line cut by a kill

    proc = evaluate_cli(run_cfg, *SETTINGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{len(before)} done before, {MAPS - len(before)} to sample" in proc.stderr
    assert (out / "metrics.csv").read_bytes() == (reference[0] / "metrics.csv").read_bytes()
    assert pngs(out) == pngs(reference[0])
    assert {name: (out / name).stat().st_ino for name in before} == before, "finished maps are not redone"
    assert sorted(r["index"] for r in record_lines(out)) == list(range(MAPS)), "each map sampled once"
    assert not list(out.glob(".*.tmp-*"))


@pytest.mark.slow
def test_two_processes_give_one_processs_table(run_cfg: Path, reference: tuple[Path, str],
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = accelerate_launch("-m", "radiodiff_resume.cli", "evaluate", "--cfg", str(run_cfg), *SETTINGS,
                             "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 process(es)" in proc.stderr
    assert {r["img_name"] for r in record_lines(out) if r["index"] % 2} \
        == {r["img_name"] for r in json_objects((out / "records" / "rank-001.jsonl").read_bytes())}, \
        "rank 1 took every other map"
    assert (out / "metrics.csv").read_bytes() == (reference[0] / "metrics.csv").read_bytes()
    assert pngs(out) == pngs(reference[0])
    assert proc.stdout.splitlines()[2:] == reference[1].splitlines()[2:], "the same summary table"


# ----- user errors ---------------------------------------------------------------------------------------


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]


def test_user_errors_are_one_line_with_exit_2(run_cfg: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base = ["evaluate", "--cfg", str(run_cfg), "--limit", "1", "--sampling-timesteps", "1"]
    missing = tmp_path / "no-such-checkpoint"
    assert f"--checkpoint {missing}: not a checkpoint folder" in one_error(
        capsys, [*base, "--checkpoint", str(missing), "--out", str(tmp_path / "a")])
    assert "no checkpoint in" in one_error(
        capsys, [*base, f"trainer.results_folder={tmp_path / 'empty'}", "--out", str(tmp_path / "b")])
    assert f"--weights {tmp_path / 'model-7.pt'} cannot be read (No such file or directory)" in one_error(
        capsys, [*base, "--weights", str(tmp_path / "model-7.pt")])
    torch.save({"model": {"first_stage_model.encoder.conv_in.weight": torch.zeros(1),
                          "model.init_conv.weight": torch.zeros(1)}}, tmp_path / "model-9.pt")
    assert "model-9.pt holds RadioDiff's network, and this config builds model.unet.target=" in one_error(
        capsys, [*base, "--weights", str(tmp_path / "model-9.pt")])
    torch.save({"state": {}}, tmp_path / "model-10.pt")
    assert "model-10.pt is not a RadioDiff LDM file" in one_error(
        capsys, [*base, "--weights", str(tmp_path / "model-10.pt")])
    os.mkfifo(tmp_path / "model-8.pt")  # would block a reader forever
    assert "model-8.pt is a FIFO, not a regular file" in one_error(
        capsys, [*base, "--weights", str(tmp_path / "model-8.pt")])
    assert "--split test: data.split: maps has no test split" in one_error(capsys, [*base, "--split", "test"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    assert "holds files but no evaluate.json (notes.txt)" in one_error(
        capsys, [*base, "--out", str(tmp_path / "d")])

    out = tmp_path / "c"
    assert main([*base, "--out", str(out)]) == 0
    capsys.readouterr()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    error = one_error(capsys, ["evaluate", "--cfg", str(run_cfg), "--limit", "1", "--sampling-timesteps", "2",
                               "--online", "--out", str(out)])
    assert "holds an evaluation with other settings" in error
    assert "sampling.timesteps: 1 → 2" in error and "weights.ema: true → false" in error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files, "nothing was written"


# ----- a RadioDiff sample yaml ---------------------------------------------------------------------------


def test_the_sampler_section_maps_to_evaluates_options() -> None:
    section = read_sampler(SAMPLE_YAML)
    assert section.weights == "/data/chenglaoshi/DiffRadio/results/LDM_Car_aa/model-72.pt"
    assert (section.ema, section.batch_size, section.limit) == (False, 1, None)
    assert section.out == "/data/chenglaoshi/DiffRadio/results/test_car_nofft"
    check_window(section, 256, "radio_sample.yaml")  # RadioMapSeer's 256-pixel maps: one window each
    with pytest.raises(UserError, match="crop_size"):
        check_window(section, 320, "radio_sample.yaml")
    assert read_sampler(REPO / "configs" / "radio_tiny.yaml").weights is None, "our configs have none"


def sample_options(*flags: str) -> Options:
    """evaluate's options for RadioDiff's radio_sample.yaml and ``flags``, resolved as the command does."""
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--cfg", str(SAMPLE_YAML), "data.root=/data/RadioMapSeer", *flags])
    return Options.resolve(args, read_sampler(SAMPLE_YAML), load_config(SAMPLE_YAML, args.overrides))


def test_a_radiodiff_sample_yaml_sets_evaluates_defaults_and_flags_win(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=r"--weights .*/model-72\.pt cannot be read"):
        sample_options()  # sampler.ckpt_path is a RadioDiff LDM file, not on this machine
    assert "model-72.pt cannot be read" in one_error(
        capsys, ["evaluate", "--cfg", str(SAMPLE_YAML), "data.root=/data/RadioMapSeer"])
    o = sample_options("--checkpoint", "latest")
    assert (o.checkpoint, o.weights, o.ema, o.batch_size) == ("latest", None, False, 1)
    assert o.out == Path("/data/chenglaoshi/DiffRadio/results/test_car_nofft"), "sampler.save_folder"
    assert (o.steps, o.split) == (5, "test"), "model.sampling_timesteps; data.name radio: RadioDiff's split"
    o = sample_options("--checkpoint", "latest", "--ema", "--batch-size", "4", "--out", "/tmp/x",
                       "--sampling-timesteps", "2")
    assert (o.ema, o.batch_size, o.out, o.steps) == (True, 4, Path("/tmp/x"), 2), "a flag given wins"
