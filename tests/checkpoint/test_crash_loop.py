"""The crash-loop brake on real checkpoints: under SLURM (``SLURM_JOB_ID`` set, as in every job
step), a checkpoint from which ``checkpoint.crash_loop_restarts`` runs in a row resumed and then
died before their next save is set aside, unchanged, and the next older one is used; with none
left the job stops with a message instead of starting from scratch. A commit or a clean stop
clears the counts; a guard rollback is not a restart; outside SLURM nothing is counted.

A "run that died" is a trainer that resumed and was dropped without saving or stopping — what
a SIGKILLed process leaves on disk. The same loop with real deaths on the real SLURM cluster is
in ``tests/slurm/test_requeue.py``.
"""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest

from radiodiff_resume.checkpoint.restarts import LEDGER
from radiodiff_resume.config import Config
from radiodiff_resume.errors import StopRequested, UserError
from tests.checkpoint.helpers import STEP2, STEP4, build, committed, events, hashes


@pytest.fixture
def slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")


def die_after_resume(cfg: Config) -> Path | None:
    """A run that resumes, then dies (nothing saved, no clean end)."""
    return build(cfg).checkpointer.resume()


def test_a_checkpoint_runs_keep_dying_from_is_set_aside_then_the_older_one_used(
    slurm_job: None, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    cfg = run_cfg("checkpoint.crash_loop_restarts=2")
    before = hashes(run / "checkpoints" / STEP4)
    assert die_after_resume(cfg) == run / "checkpoints" / STEP4
    assert json.loads((run / LEDGER).read_text()) == {STEP4: 1}
    assert die_after_resume(cfg) == run / "checkpoints" / STEP4
    assert json.loads((run / LEDGER).read_text()) == {STEP4: 2}

    assert die_after_resume(cfg) == run / "checkpoints" / STEP2, "step 4 set aside, step 2 used"
    [moved] = list((run / "checkpoints").glob("crash-loop-*"))
    assert hashes(moved / STEP4) == before, "set aside unchanged, not deleted"
    reason = (moved / "SET_ASIDE.txt").read_text()
    assert "2 runs in a row resumed from step-00000004 and died" in reason and "checkpoint.resume=" in reason
    [event] = events(run, "checkpoint_set_aside")
    assert event["path"].endswith(STEP4) and "crash loop" in event["reason"]
    assert committed(run) == [STEP2]

    assert die_after_resume(cfg) == run / "checkpoints" / STEP2
    with pytest.raises(UserError) as err:  # step 2 dies twice too: none left
        die_after_resume(cfg)
    message = str(err.value)
    assert "every checkpoint" in message and "set aside" in message
    assert "refusing to start from scratch" in message and "checkpoint.resume=never" in message
    assert committed(run) == [] and len(list((run / "checkpoints").glob("crash-loop-*"))) == 2


def test_a_commit_or_a_clean_stop_clears_the_counts(
    slurm_job: None, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    cfg = run_cfg("checkpoint.crash_loop_restarts=2", "trainer.train_num_steps=6")
    die_after_resume(cfg)
    trainer = build(cfg)
    trainer.checkpointer.resume()
    assert json.loads((run / LEDGER).read_text()) == {STEP4: 2}
    trainer.state.step = 5
    trainer.checkpointer.save()
    assert not (run / LEDGER).exists(), "progress: nothing is suspect any more"

    die_after_resume(cfg)
    trainer = build(cfg)
    trainer.request_stop("test")
    with pytest.raises(StopRequested):
        trainer.fit()  # resumes (count 2), stops at once: step 5 is already committed
    assert not (run / LEDGER).exists(), "a clean stop is not a death"
    assert not list((run / "checkpoints").glob("crash-loop-*"))


def test_a_guard_rollback_is_not_a_restart(
    slurm_job: None, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    cfg = run_cfg("checkpoint.crash_loop_restarts=1")
    trainer = build(cfg)
    trainer.checkpointer.resume()
    for _ in range(3):
        trainer.checkpointer.resume(mode="auto", rollback=True)
    assert json.loads((run / LEDGER).read_text()) == {STEP4: 1}
    assert committed(run) == [STEP2, STEP4]


def test_outside_slurm_nothing_is_counted_or_moved(
    monkeypatch: pytest.MonkeyPatch, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = run_cfg("checkpoint.crash_loop_restarts=1")
    for _ in range(3):
        assert die_after_resume(cfg) == run / "checkpoints" / STEP4
    assert not (run / LEDGER).exists()
    assert committed(run) == [STEP2, STEP4]
