"""Environment and config differences on re-run: never a quarantine, never a lock-out without a way out.

Each case re-runs a copy of a good results folder with one difference. Either it resumes the newest
checkpoint (tolerance, new loop values), or it stops with a message naming the difference and an
override — and then that override (or setting the value back) resumes. A good checkpoint moved or
changed is a false alarm.
"""

from __future__ import annotations

import copy
import shutil
import typing as tp
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from radiodiff_resume.config import build_config
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import GOLDEN, STEP4, build, hashes, rewrite_tensors


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...] = ()
    prepare: tp.Callable[[Path], None] | None = None
    """Edits the copied checkpoints (a deliberate code change, in effect)."""
    threads: int | None = None
    """Another intra-op thread count: another environment, in-process."""
    expect_stop: str | None = None
    """A phrase the stop message must contain; None when the run must resume directly."""
    override: tuple[str, ...] = ()
    """What makes a stopped case resume."""


@dataclass
class DifferenceSummary:
    trials: int = 0
    handled: int = 0
    false_alarms: int = 0
    failures: list[str] = field(default_factory=list)


def _nudge(results: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["unet.conv_in.weight"].view(-1)[0] += 1e-3

    rewrite_tensors(results / "checkpoints" / STEP4, "model", change)


CASES = (
    Case("another thread count", threads=2),
    Case("data.split_seed changed", ("data.split_seed=1",)),
    Case("model.loss_type changed", ("model.loss_type=l1",)),
    Case("model.prediction_type changed", ("model.prediction_type=v_prediction",)),
    Case("trainer.use_ema off", ("trainer.use_ema=false",)),
    Case("loop settings changed", ("trainer.lr=5e-4", "trainer.weight_decay=0.01", "trainer.ema_decay=0.5",
                                   "trainer.train_num_steps=9")),
    Case("model shape changed", ("model.unet.params.block_out_channels=[16,32]",),
         expect_stop="model.unet.params.block_out_channels=[16,16]",
         override=("model.unet.params.block_out_channels=[16,16]",)),
    Case("model code changed (probe mismatch)", prepare=_nudge, expect_stop="accept_probe_mismatch=true",
         override=("checkpoint.accept_probe_mismatch=true",)),
    Case("probe mismatch on another machine", prepare=_nudge, threads=2,
         overrides=("checkpoint.probe_tolerance=1e-9",), expect_stop="the environment differs: threads",
         override=("checkpoint.probe_tolerance=1e-3",)),
)


@contextmanager
def _threads(n: int | None) -> tp.Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_differences(golden_results: Path, workdir: Path) -> DifferenceSummary:
    """Every case on its own copy of ``golden_results`` (a finished run with step 2 and 4)."""
    raw = yaml.safe_load((golden_results / "config.yaml").read_text())
    summary = DifferenceSummary()
    for i, case in enumerate(CASES):
        results = workdir / f"case-{i}"
        shutil.copytree(golden_results / "checkpoints", results / "checkpoints")
        shutil.copy2(golden_results / "ae.safetensors", results / "ae.safetensors")
        if case.prepare:
            case.prepare(results)
        base = copy.deepcopy(raw)
        base["trainer"]["results_folder"] = str(results)
        base["model"]["first_stage"]["ckpt_path"] = str(results / "ae.safetensors")
        before = hashes(results / "checkpoints")
        summary.trials += 1
        problem = _run_case(case, base, results)
        if hashes(results / "checkpoints") != before and not problem:
            problem = "a checkpoint was moved or changed"
        if problem:
            summary.failures.append(f"{case.name}: {problem}")
            summary.false_alarms += "moved" in problem or "quarantine" in problem
        else:
            summary.handled += 1
    return summary


def _run_case(case: Case, raw: dict[str, tp.Any], results: Path) -> str | None:
    """None when the case was handled as documented, else what went wrong."""
    with _threads(case.threads):
        trainer = build(build_config(raw, (*GOLDEN, *case.overrides)))
        try:
            chosen = trainer.checkpointer.resume()
        except UserError as exc:
            if case.expect_stop is None:
                return f"stopped although it should resume: {str(exc)[:300]}"
            if case.expect_stop not in str(exc) or "nothing was moved" not in str(exc):
                return f"stop message lacks {case.expect_stop!r}: {str(exc)[:300]}"
            trainer = build(build_config(raw, (*GOLDEN, *case.overrides, *case.override)))
            chosen = trainer.checkpointer.resume()
        else:
            if case.expect_stop is not None:
                return "resumed although it should stop"
    if chosen != results / "checkpoints" / STEP4:
        return f"resumed {chosen}, not the newest checkpoint"
    if (results / "checkpoints" / "quarantine").exists():
        return "a good checkpoint was quarantined"
    return None
