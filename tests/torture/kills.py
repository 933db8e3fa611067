"""SIGKILL torture: one run killed many times at random moments — during start-up and resume, during
steps, in the middle of a save, while the writer thread of a background save holds its staging folder
and training has gone on, right after a commit (retention) — and re-run until it finishes. Every
restart must resume from the newest committed checkpoint, verified, and the final weights must equal an
uninterrupted run's bit for bit. A kill never leaves a ``step-*`` folder without its manifest.

Used by ``tests/torture/test_kills.py`` (a few kills in CI) and ``python -m tests.torture`` (the full set).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from radiodiff_resume.config import build_config
from tests.conftest import tiny_raw, write_random_first_stage
from tests.trainer.test_resume_exact import assert_bit_identical, final_tensors, start
from tests.trainer.test_resume_exact import run_to_end as run_straight

EVERY = 5
MOMENTS = ("start-up", "steps", "save", "background", "retention")
BACKGROUND_WAIT_S = 0.05
"""How long the background moment waits for a step logged past the save before it kills anyway."""


@dataclass
class KillSummary:
    kills: int = 0
    by_moment: dict[str, int] = field(default_factory=lambda: {m: 0 for m in MOMENTS})
    restarts_resumed: int = 0
    lost_steps: int = 0
    """Steps computed by a killed process after its last commit (redone by the next one)."""
    steps: int = 0


def write_config(folder: Path, synth_cache: Path, steps: int, ae: Path) -> Path:
    raw = tiny_raw(folder, synth_cache)
    raw["model"]["first_stage"]["ckpt_path"] = str(ae)
    raw["trainer"].update(train_num_steps=steps, save_and_sample_every=steps, val_batches=0, log_freq=1)
    raw["checkpoint"] = {"every": EVERY, "keep_last": 2}
    path = folder.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


def newest_commit(checkpoints: Path) -> int:
    if not checkpoints.is_dir():
        return 0
    steps = [int(p.name[5:]) for p in checkpoints.iterdir()
             if p.name.startswith("step-") and (p / "manifest.json").is_file()]
    return max(steps, default=0)


def uncommitted(checkpoints: Path) -> list[str]:
    """``step-*`` folders without a manifest: what no kill may leave (only ``.staging-*`` may stay)."""
    if not checkpoints.is_dir():
        return []
    return sorted(p.name for p in checkpoints.iterdir()
                  if p.name.startswith("step-") and not (p / "manifest.json").is_file())


def staging_step(checkpoints: Path) -> int | None:
    """The step of a ``.staging-step-*`` folder, if one exists."""
    if not checkpoints.is_dir():
        return None
    found = [int(p.name.rsplit("-", 1)[1]) for p in checkpoints.iterdir()
             if p.name.startswith(".staging-step-")]
    return max(found, default=None)


def events(results: Path) -> list[dict[str, tp.Any]]:
    path = results / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def steps_logged(results: Path, skip: int) -> list[int]:
    """Steps in metrics.jsonl after its first ``skip`` lines."""
    path = results / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines()[skip:] if '"loss"' in x]


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_kill_trials(workdir: Path, synth_cache: Path, kills: int, seed: int = 0,
                    processes: int = 1) -> KillSummary:
    """Kill one run ``kills`` times, finish it, compare with a straight run; returns the tally."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = 100 + 60 * kills  # enough that the run outlives every kill (a few steps per life)
    ae = workdir / "ae.safetensors"
    straight_cfg = write_config(workdir / "straight", synth_cache, steps, ae)
    write_random_first_stage(build_config(yaml.safe_load(straight_cfg.read_text())))
    killed = workdir / "killed"
    killed_cfg = write_config(killed, synth_cache, steps, ae)
    checkpoints = killed / "checkpoints"
    run_straight(straight_cfg, processes, workdir)

    summary = KillSummary(steps=steps)
    while summary.kills < kills:
        moment = rng.choice(MOMENTS)
        before_events, before_metrics = len(events(killed)), line_count(killed / "metrics.jsonl")
        newest_before = newest_commit(checkpoints)
        proc = start(killed_cfg, processes, workdir)
        ready = _trigger(moment, rng, killed, checkpoints, before_events, newest_before)
        deadline = time.monotonic() + 600
        while proc.poll() is None and not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"{moment}: trigger never fired")
            time.sleep(0.003)
        if proc.poll() is not None:  # the run finished before the trigger: nothing left to kill
            assert proc.returncode == 0, (proc.stdout.read() if proc.stdout else "")[-3000:]
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not uncommitted(checkpoints), f"{moment}: a kill left {uncommitted(checkpoints)}"
        summary.kills += 1
        summary.by_moment[moment] += 1
        summary.restarts_resumed += _check_restart(killed, before_events, newest_before)
        reached = max(steps_logged(killed, before_metrics), default=newest_before)
        summary.lost_steps += max(0, reached - newest_commit(checkpoints))
    newest_before, before_events = newest_commit(checkpoints), len(events(killed))
    out = run_straight(killed_cfg, processes, workdir)
    assert "resumed from verified checkpoint" in out
    summary.restarts_resumed += _check_restart(killed, before_events, newest_before)
    assert_bit_identical(final_tensors(workdir / "straight"), final_tensors(killed))
    return summary


def _check_restart(results: Path, before_events: int, newest_before: int) -> int:
    """The events of one process: it resumed exactly the newest commit that existed when it started
    (or started fresh when there was none), and nothing failed verification. 1 if it resumed."""
    log = events(results)[before_events:]
    assert not [e for e in log if e["event"] in ("checkpoint_quarantined", "resume_refused")], \
        f"a kill left a checkpoint that fails verification: {log}"
    resumed = [e["step"] for e in log if e["event"] == "resumed"]
    fresh = [e for e in log if e["event"] == "fresh_start"]
    if newest_before == 0:
        assert not resumed, resumed
    else:
        assert not fresh and resumed in ([], [newest_before]), (newest_before, resumed)
    return len(resumed)


def _trigger(moment: str, rng: random.Random, results: Path, checkpoints: Path, before_events: int,
             newest_before: int) -> tp.Callable[[], bool]:
    """When to kill: the condition for ``moment`` (with a random delay where it has one)."""
    t0 = time.monotonic()
    if moment == "start-up":
        delay = rng.uniform(0.0, 9.0)  # import, build, verification, resume
        return lambda: time.monotonic() - t0 > delay
    if moment == "steps":
        delay = rng.uniform(0.0, 0.5)
        begun: list[float] = []

        def stepping() -> bool:
            if not begun and len(events(results)) > before_events:
                begun.append(time.monotonic())
            return bool(begun) and time.monotonic() - begun[0] > delay

        return stepping
    if moment == "save":
        return lambda: checkpoints.is_dir() and any(
            p.name.startswith(".staging-") for p in checkpoints.iterdir())
    if moment == "background":  # the writer thread holds the staging folder; training went on past it
        seen: list[float] = []
        lines = line_count(results / "metrics.jsonl")

        def writing_behind() -> bool:
            step = staging_step(checkpoints)
            if step is None:
                return False
            if not seen:
                seen.append(time.monotonic())
            ahead = any(s > step for s in steps_logged(results, lines))
            return ahead or time.monotonic() - seen[0] > BACKGROUND_WAIT_S

        return writing_behind
    delay = rng.uniform(0.0, 0.02)  # retention runs right after a commit
    committed: list[float] = []

    def after_commit() -> bool:
        if not committed and newest_commit(checkpoints) > newest_before:
            committed.append(time.monotonic())
        return bool(committed) and time.monotonic() - committed[0] > delay

    return after_commit
