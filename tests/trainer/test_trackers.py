"""Experiment trackers across a restart and a rollback, with a real tracker writing real files:
tensorboard (the default where it is installed), read back with tensorboard's own
``EventAccumulator``.

One results folder, two real ``train_cond_ldm.py`` processes: the first SIGKILLs itself at step 7
(:mod:`tests.checkpoint.dying_unet`), after logging steps 2, 4 and 6 and committing step 4; the
second resumes from step 4, writes NaN into a weight at step 11 (:mod:`tests.guard.recovery_plugins`)
so the guard rolls back to step 8, and finishes at step 12. Steps 5 to 6 and 9 to 11 run twice.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.build import write_untrained_first_stage
from radiodiff_resume.config import build_config, default_trackers
from radiodiff_resume.errors import ConfigError
from radiodiff_resume.trainer.trackers import RUNS_FILE
from tests.conftest import REPO, tiny_raw

pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (pip install -e .[test])")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RUN = ("trainer.train_num_steps=12", "trainer.log_freq=2", "trainer.save_and_sample_every=100",
       "trainer.val_batches=0", "trainer.num_sample_images=1", "checkpoint.every=4",
       "guard.norm_stats.check_every=1")


def train(cfg: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg), *RUN,
                           *overrides], env=env, cwd=cfg.parent, capture_output=True, text=True, timeout=600)


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """Every point of ``tag`` in the event files of ``folder``, in the order they were written
    (nothing purged: a step written twice, or going back, shows)."""
    events = EventAccumulator(str(folder), purge_orphaned_data=False)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


@pytest.mark.slow
def test_one_tracker_run_across_a_kill_a_restart_and_a_rollback_steps_never_go_back(
    tmp_path: Path, synth_cache: Path
) -> None:
    results = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(results, synth_cache)))
    write_untrained_first_stage(build_config(tiny_raw(results, synth_cache)))
    assert build_config(tiny_raw(results, synth_cache)).trainer.log_with == ["tensorboard"], "the default"

    first = train(cfg, "model.unet.target=tests.checkpoint.dying_unet.DiesAtForwardUNet",
                  "model.unet.params.die_at=7")
    assert first.returncode == -9, first.stderr[-3000:]
    board = results / "radiodiff_resume"
    assert [s for s, _ in scalars(board, "ldm/loss")] == [2, 4, 6]
    kept = json.loads((results / RUNS_FILE).read_text())
    assert kept == {"tensorboard": "radiodiff_resume"}

    second = train(cfg, "model.unet.target=tests.guard.recovery_plugins.PoisonedUNet",
                   "model.unet.params.poison_at=[7]")
    assert second.returncode == 0, second.stderr[-3000:]
    log = [json.loads(line) for line in (results / "events.jsonl").read_text().splitlines()]
    assert [(e["step"], e["to_step"]) for e in log if e["event"] == "rolled_back"] == [(11, 8)]
    assert [r["step"] for r in map(json.loads, (results / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [2, 4, 6, 6, 8, 10, 10, 12], "metrics.jsonl keeps every record, replays too"

    loss = scalars(board, "ldm/loss")
    assert [s for s, _ in loss] == [2, 4, 6, 8, 10, 12], "each step once, never going back"
    assert [s for s, _ in scalars(board, "ldm/lr")] == [2, 4, 6, 8, 10, 12]
    assert scalars(board, "ldm/rolled_back_to_step") == [(11, 8.0)], "the rollback, as an event"
    assert json.loads((results / RUNS_FILE).read_text()) == kept, "the same run after the restart"
    assert sorted(p.name for p in board.iterdir() if p.is_file())[0].startswith("events.out.tfevents")


def test_log_with_defaults_to_tensorboard_where_installed_and_names_are_checked(
    tmp_path: Path, synth_cache: Path
) -> None:
    raw = tiny_raw(tmp_path / "run", synth_cache)
    assert default_trackers() == ["tensorboard"]
    assert build_config(raw, ["trainer.log_with=[]"]).trainer.log_with == []
    with pytest.raises(ConfigError, match=r"log_with: got 'tensorbored'; allowed: tensorboard, wandb"):
        build_config(raw, ["trainer.log_with=[tensorbored]"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"log_with: wandb is not installed here; pip install wandb"):
            build_config(raw, ["trainer.log_with=[wandb]"])
