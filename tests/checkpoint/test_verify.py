"""Verification levels on real checkpoints, each corrupted on disk in one specific way."""

from __future__ import annotations

import math
import re
import shutil
import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.checkpoint.verify import INTEGRITY, LEVELS, Report, nonfinite_names, scan
from radiodiff_resume.config import Config
from tests.checkpoint.conftest import Golden
from tests.checkpoint.helpers import (
    FAST,
    STEP2,
    STEP4,
    build,
    committed,
    flip_byte,
    hashes,
    read_manifest,
    read_shared,
    rewrite_tensors,
    tensor_equal_trees,
    truncate,
    write_manifest,
)

NAN_TENSOR = "unet.conv_out.weight"


def assert_fails_at(report: Report, level: str) -> None:
    """``level`` failed, every earlier level passed, every later one was not checked."""
    index = LEVELS.index(level)
    states = {name: lv.ok for name, lv in report.levels.items()}
    assert list(states) == list(LEVELS)
    expected = {n: True for n in LEVELS[:index]} | {level: False} | {n: None for n in LEVELS[index + 1:]}
    assert states == expected, report.describe()
    assert not report.ok
    assert report.failure is not None and report.failure.name == level
    assert "FAILED" in report.describe()


def test_good_checkpoint_verifies_at_every_level_and_restores_the_saved_state(
    run: Path, run_cfg: tp.Callable[..., Config], golden: Golden
) -> None:
    ckpt = run / "checkpoints" / STEP4
    before = hashes(ckpt)
    trainer = build(run_cfg())
    assert not tensor_equal_trees(trainer.state_dict(), golden.state), "a fresh trainer must differ"

    report = trainer.checkpointer.verify_and_load(ckpt)

    assert report.ok, report.describe()
    assert report.failure is None
    assert [lv.ok for lv in report.levels.values()] == [True] * 5
    assert "bit-exact" in report.levels["probe"].detail
    assert report.levels["structure"].detail.startswith("15 files")
    manifest = read_manifest(ckpt)
    assert report.levels["scale_factor"].detail == f"{manifest['scale_factor']:.6g}"
    assert trainer.state.step == 4
    assert tensor_equal_trees(trainer.state_dict(), golden.state)
    assert float(trainer.ldm.scale_factor) == manifest["scale_factor"]
    assert hashes(ckpt) == before, "verification must not modify the checkpoint"
    assert "not checked" not in report.describe() and "FAILED" not in report.describe()


def test_older_checkpoint_verifies_and_loads_its_own_step(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    trainer = build(run_cfg())
    report = trainer.checkpointer.verify_and_load(run / "checkpoints" / STEP2)
    assert report.ok, report.describe()
    assert trainer.state.step == 2
    assert tensor_equal_trees(trainer.state_dict(), read_shared(run / "checkpoints" / STEP2))


# ----- corruptions --------------------------------------------------------------------------------------


def nan_into_model(ckpt: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[NAN_TENSOR].view(-1)[3] = math.nan

    rewrite_tensors(ckpt, "model", poison)


def inf_into_optimizer(ckpt: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["state/5/exp_avg_sq"].view(-1)[0] = math.inf

    rewrite_tensors(ckpt, "optimizer", poison)


def negative_second_moment(ckpt: Path) -> None:
    """A finite state Adam cannot reach: the square root of a negative ``exp_avg_sq`` is NaN, so the first
    step from it would poison the weights."""
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["state/5/exp_avg_sq"].view(-1)[0] = -1e-6

    rewrite_tensors(ckpt, "optimizer", poison)


def nudge_weight(ckpt: Path) -> None:
    def nudge(t: dict[str, torch.Tensor]) -> None:
        t["unet.conv_in.weight"].view(-1)[0] += 1e-3

    rewrite_tensors(ckpt, "model", nudge)


def change_scale_factor(ckpt: Path) -> None:
    raw = read_manifest(ckpt)
    raw["scale_factor"] = raw["scale_factor"] * 1.01
    write_manifest(ckpt, raw)


CORRUPTIONS: dict[str, tuple[tp.Callable[[Path], None], str, str]] = {
    "truncated-model": (lambda c: truncate(c / "model.safetensors"), "structure",
                        r"model\.safetensors has \d+ bytes, manifest says \d+"),
    "flipped-optimizer-byte": (lambda c: flip_byte(c / "optimizer.safetensors"), "structure",
                               r"optimizer\.safetensors xxh3_128 mismatch"),
    "missing-rank-file": (lambda c: (c / "rank-00000.json").unlink(), "structure",
                          r"rank-00000\.json missing"),
    "stray-file": (lambda c: (c / "notes.txt").write_text("hi"), "structure",
                   r"stray entries not in the manifest: notes\.txt"),
    "stray-folder": (lambda c: (c / "extra").mkdir(), "structure",
                     r"stray entries not in the manifest: extra/"),
    "missing-manifest": (lambda c: (c / "manifest.json").unlink(), "structure", r"manifest\.json missing"),
    "garbage-manifest": (lambda c: (c / "manifest.json").write_bytes(b"\x00{not json\xff"), "structure",
                         r"manifest\.json: not valid JSON"),
    "truncated-manifest": (lambda c: truncate(c / "manifest.json"), "structure",
                           r"manifest\.json: not valid JSON"),
    "nan-in-model": (nan_into_model, "finite",
                     rf"non-finite values in 1 tensor\(s\) or number\(s\): model\.{NAN_TENSOR}$"),
    "inf-in-optimizer": (inf_into_optimizer, "finite",
                         r"1 tensor\(s\) or number\(s\): optimizer\.state\.5\.exp_avg_sq$"),
    "negative-second-moment": (negative_second_moment, "finite",
                               r"^negative second moments in 1 tensor\(s\): optimizer\.state\.5\.exp_avg_sq"
                               r" \(their square root is NaN"),
    "scale-factor-in-manifest": (change_scale_factor, "scale_factor", r"weights hold .*, manifest recorded"),
    "nudged-weight": (nudge_weight, "probe", r"do not compute what was saved"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupted_copy_fails_at_its_level(
    name: str, run: Path, run_cfg: tp.Callable[..., Config], golden: Golden
) -> None:
    corrupt, level, detail = CORRUPTIONS[name]
    good = run / "checkpoints" / STEP4
    bad = run / "checkpoints" / "copy-of-step-4"
    shutil.copytree(good, bad)
    corrupt(bad)
    trainer = build(run_cfg())

    report = trainer.checkpointer.verify_and_load(bad)

    assert_fails_at(report, level)
    assert report.damaged == (level in INTEGRITY), "only integrity levels prove damage"
    assert report.levels[level].detail, report.describe()
    assert re.search(detail, report.levels[level].detail), report.describe()
    if LEVELS.index(level) < LEVELS.index("probe"):
        assert trainer.state.step == 0, "a checkpoint failing before the probe must not be loaded"
    assert hashes(good) == hashes(golden.results / "checkpoints" / STEP4), "only the copy was corrupted"


def test_scale_factor_detail_names_both_values(run: Path, run_cfg: tp.Callable[..., Config]) -> None:
    ckpt = run / "checkpoints" / STEP4
    saved = read_manifest(ckpt)["scale_factor"]
    change_scale_factor(ckpt)
    report = build(run_cfg()).checkpointer.verify_and_load(ckpt)
    assert_fails_at(report, "scale_factor")
    assert report.levels["scale_factor"].detail == (
        f"weights hold {saved!r}, manifest recorded {saved * 1.01!r}"
    )


def test_nudged_weight_probe_detail_shows_both_losses(run: Path, run_cfg: tp.Callable[..., Config]) -> None:
    ckpt = run / "checkpoints" / STEP4
    recorded = read_manifest(ckpt)["probe"]["loss"]
    nudge_weight(ckpt)
    report = build(run_cfg()).checkpointer.verify_and_load(ckpt)
    assert_fails_at(report, "probe")
    detail = report.levels["probe"].detail
    assert f"vs recorded {recorded!r}, bit-exact (identical environment)" in detail
    assert not detail.startswith(f"{recorded!r} "), "the recomputed value differs from the recorded one"
    assert not report.damaged, "a probe mismatch is a difference, not proof of damage"


def test_checkpoint_of_another_architecture_fails_keys_with_a_readable_diff(
    run: Path, run_cfg: tp.Callable[..., Config], make_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    wide_results = tmp_path / "wide"
    wide_results.mkdir()
    shutil.copy2(run / "ae.safetensors", wide_results / "ae.safetensors")
    wide_cfg = make_cfg("trainer.train_num_steps=1", *FAST, "model.unet.params.block_out_channels=[16,32]",
                        results=wide_results)
    wide = build(wide_cfg)
    wide.fit()
    assert committed(wide_results) == ["step-00000001"]
    wide_ckpt = wide_results / "checkpoints" / "step-00000001"
    original = build(run_cfg())

    report = original.checkpointer.verify_and_load(wide_ckpt)

    assert_fails_at(report, "keys")
    detail = report.levels["keys"].detail
    assert "model: unexpected" in detail and "conv_shortcut" in detail, detail
    mismatch = r"model: \d+ mismatch\(es\): unet\.\S+ shape \(32,.*\) in checkpoint, \(16,.*\) in model"
    assert re.search(mismatch, detail), detail
    assert "(+65 more)" in detail, "long diffs are shortened"
    assert "ema: " in detail and "optimizer: " in detail, detail
    assert original.state.step == 0

    # The other direction: the wide trainer misses keys of the original checkpoint.
    back = wide.checkpointer.verify_and_load(run / "checkpoints" / STEP4)
    assert_fails_at(back, "keys")
    assert "model: missing" in back.levels["keys"].detail, back.levels["keys"].detail
    assert "shape" in back.levels["keys"].detail
    assert wide.state.step == 1



def test_a_negative_running_variance_is_repaired_not_damage(run: Path,
                                                            run_cfg: tp.Callable[..., Config]) -> None:
    """Like a non-finite one: derived from data, so it is recomputed after loading; comparing the probe on it
    would compute NaN and refuse a checkpoint whose learnt state is sound."""
    ckpt = run / "checkpoints" / STEP4
    stat = "cond_encoder.net.1.running_var"
    rewrite_tensors(ckpt, "model", lambda t: t[stat].view(-1).__setitem__(0, -0.5))
    report = build(run_cfg()).checkpointer.verify_and_load(ckpt)
    assert report.ok, report.describe()
    assert report.repairable == [f"model.{stat}"]
    assert report.levels["probe"].detail.startswith("not compared"), report.describe()


def test_the_one_pass_scan_finds_what_an_element_wise_check_finds() -> None:
    """The scan reads each tensor once (a sum, or a minimum and maximum for a second moment): a
    negative entry beside a NaN still counts, a finite half tensor whose sum overflows is finite,
    and empty tensors are neither."""
    tree = {
        "optimizer": {"state": {"0": {"exp_avg_sq": torch.tensor([0.5, math.nan, -1.0]),
                                      "exp_avg": torch.full((4,), 6e4, dtype=torch.float16)},
                                "1": {"exp_avg_sq": torch.tensor([1.0, -math.inf]),
                                      "max_exp_avg_sq": torch.empty(0)},
                                "2": {"exp_avg_sq": torch.tensor([0.0, math.inf], dtype=torch.bfloat16)}}},
        "model": {"bn.running_var": torch.tensor([1.0, -2.0]), "w": torch.tensor([math.nan]),
                  "lr": math.inf},
    }
    bad, negative = scan(tree)
    assert bad == ["optimizer.state.0.exp_avg_sq", "optimizer.state.1.exp_avg_sq",
                   "optimizer.state.2.exp_avg_sq", "model.w", "model.lr"]
    assert negative == ["optimizer.state.0.exp_avg_sq", "optimizer.state.1.exp_avg_sq",
                        "model.bn.running_var"]
    assert nonfinite_names(tree) == bad
