"""The crash-loop brake on real checkpoints: in a SLURM batch job, a checkpoint from which
``checkpoint.crash_loop_restarts`` runs in a row resumed and then died before making progress is
set aside, unchanged, and the next older one is used; with none left the job stops with a message
instead of starting from scratch. Progress (``checkpoint.crash_loop_progress_steps`` steps past the
checkpoint, a stop signal seen), a commit or a clean stop clears the counts; a guard rollback is not
a restart; outside a batch job (no SLURM, or an ``salloc`` allocation) nothing is counted.

A "run that died" is either a trainer that resumed and was dropped without saving or stopping —
what a process SIGKILLed while loading leaves on disk — or a real ``train_cond_ldm.py`` process
that SIGKILLs itself at a chosen point (:mod:`tests.checkpoint.dying_unet`). The same loop with
real deaths on the real SLURM cluster is in ``tests/slurm/test_requeue.py``.

Here ``SLURM_JOB_ID`` names a job the controller does not know (there is none, or it answers
"Invalid job id"): such a job is taken for a batch job, so the runs are counted; the controller's
own answer for a real batch job and a real ``salloc`` allocation is checked on the local cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import yaml

from radiodiff_resume.checkpoint.checkpointer import Checkpointer
from radiodiff_resume.checkpoint.restarts import LEDGER, RestartLedger, batch_job
from radiodiff_resume.config import Config
from radiodiff_resume.errors import StopRequested, UserError
from radiodiff_resume.io import NotRegularFile
from tests.checkpoint.helpers import GOLDEN, STEP2, STEP4, build, committed, events, hashes
from tests.conftest import REPO, tiny_raw

UNKNOWN_JOB = "4294967290"
"""A job id no controller hands out (above Slurm's largest ``MaxJobId``)."""


@pytest.fixture
def slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", UNKNOWN_JOB)


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


def test_a_dry_run_counts_nothing_and_clears_nothing(
    slurm_job: None, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    """The dry-run's read-only checkpointer leaves the ledger as it found it, even where a real run
    would count its resume or clear the counts at a clean end."""
    cfg = run_cfg("checkpoint.crash_loop_restarts=3")
    die_after_resume(cfg)
    trainer = build(cfg)
    dry = Checkpointer(trainer, cfg.checkpoint, trainer.events, trainer.ranks, read_only=True)
    assert dry.resume() == run / "checkpoints" / STEP4
    dry.ended_cleanly()
    assert json.loads((run / LEDGER).read_text()) == {STEP4: 1}
    assert dry.would == []


def test_outside_slurm_nothing_is_counted_or_moved(
    monkeypatch: pytest.MonkeyPatch, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = run_cfg("checkpoint.crash_loop_restarts=1")
    for _ in range(3):
        assert die_after_resume(cfg) == run / "checkpoints" / STEP4
    assert not (run / LEDGER).exists()
    assert committed(run) == [STEP2, STEP4]


# ----- real processes that die


DYING = ("model.unet.target=tests.checkpoint.dying_unet.DiesAtForwardUNet", "checkpoint.every=1000",
         "trainer.save_and_sample_every=1000", "trainer.train_num_steps=40")
"""The golden run's config, with a denoiser that kills its process, and no commit or validation
during the runs (a commit would clear the counts by itself)."""


def run_until_death(run: Path, synth_cache: Path, *overrides: str) -> str:
    """``train_cond_ldm.py`` on the golden run's copy, in a batch job as far as the brake can tell
    (``SLURM_JOB_ID`` of a job the controller does not know); it must die of SIGKILL. Its output."""
    cfg = run.parent / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw(run, synth_cache)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_ID=UNKNOWN_JOB, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "train_cond_ldm.py"), "--cfg", str(cfg), *GOLDEN,
                           *DYING, *overrides], env=env, cwd=run.parent, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", [
    pytest.param(("model.unet.params.die_at=3", "checkpoint.crash_loop_progress_steps=2"),
                 id="after-progress"),
    pytest.param(("model.unet.params.stop_at=1",), id="saving-after-a-stop-signal"),
])
def test_three_deaths_in_a_row_after_progress_or_a_stop_keep_the_newest_checkpoint(
    slurm_job: None, run: Path, run_cfg: tp.Callable[..., Config], synth_cache: Path, how: tuple[str, ...]
) -> None:
    """Preemptions that outran KillWait, node failures: each run resumes from step 4 and dies of
    SIGKILL either 3 steps in, after 2 steps of progress, or while saving the stop a signal asked
    for on its first step. None is the checkpoint's fault: the 4th run still resumes from step 4."""
    overrides = ("checkpoint.crash_loop_restarts=3", *how)
    for _ in range(3):
        run_until_death(run, synth_cache, *overrides)
        assert not (run / LEDGER).exists(), "cleared once the run made progress or saw the stop"
    assert [e["step"] for e in events(run, "resumed")] == [4, 4, 4]
    assert die_after_resume(run_cfg(*DYING, *overrides)) == run / "checkpoints" / STEP4
    assert committed(run) == [STEP2, STEP4] and not list((run / "checkpoints").glob("crash-loop-*"))


@pytest.mark.slow
def test_a_checkpoint_that_crashes_on_load_is_set_aside_after_the_stated_count(
    slurm_job: None, run: Path, run_cfg: tp.Callable[..., Config], synth_cache: Path
) -> None:
    """One run dies after making progress (not counted), then two die at their first step from
    step 4 (counted): with ``crash_loop_restarts=2`` the next run sets step 4 aside and uses step 2."""
    limit = "checkpoint.crash_loop_restarts=2"
    run_until_death(run, synth_cache, limit, "model.unet.params.die_at=3",
                    "checkpoint.crash_loop_progress_steps=2")
    assert not (run / LEDGER).exists()
    for runs in (1, 2):
        run_until_death(run, synth_cache, limit, "model.unet.params.die_at=1")
        assert json.loads((run / LEDGER).read_text()) == {STEP4: runs}
    assert [e["step"] for e in events(run, "resumed")] == [4, 4, 4]
    assert die_after_resume(run_cfg(*DYING, limit)) == run / "checkpoints" / STEP2
    [moved] = list((run / "checkpoints").glob("crash-loop-*"))
    assert "2 runs in a row resumed from step-00000004" in (moved / "SET_ASIDE.txt").read_text()


# ----- batch job or interactive allocation, as the local cluster's controller says


@pytest.fixture
def cluster_jobs() -> tp.Iterator[tuple[dict[str, str], str, str]]:
    """The local cluster's environment, a held batch job (it never runs) and an ``salloc``
    allocation without a shell (an interactive job); both cancelled after the test."""
    from tests.slurm.cluster import ensure_cluster

    env = ensure_cluster(1)
    jobs: list[str] = []
    try:
        batch = subprocess.run(["sbatch", "--parsable", "--hold", "-J", "crash-loop-batch", "--wrap", "true"],
                               env=env, capture_output=True, text=True, timeout=60, check=True)
        jobs.append(batch.stdout.strip().split(";")[0])
        alloc = subprocess.run(["salloc", "--no-shell", "-n", "1", "-t", "10", "-J", "crash-loop-salloc"],
                               env=env, capture_output=True, text=True, timeout=300, check=True)
        granted = re.search(r"Granted job allocation (\d+)", alloc.stderr)
        assert granted, alloc.stderr
        jobs.append(granted.group(1))
        yield env, jobs[0], jobs[1]
    finally:
        if jobs:
            subprocess.run(["scancel", *jobs], env=env, timeout=60, check=False)


@pytest.mark.slow
@pytest.mark.slurm
def test_inert_in_an_interactive_allocation_counted_in_a_batch_job(
    cluster_jobs: tuple[dict[str, str], str, str], monkeypatch: pytest.MonkeyPatch, run: Path,
    run_cfg: tp.Callable[..., Config]
) -> None:
    """``SLURM_JOB_ID`` is set in both; the controller's ``BatchFlag`` tells them apart. Reruns
    inside an ``salloc`` allocation are a person at work: nothing is counted or moved."""
    env, batch, interactive = cluster_jobs
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    cfg = run_cfg("checkpoint.crash_loop_restarts=1")
    monkeypatch.setenv("SLURM_JOB_ID", interactive)
    for _ in range(3):
        assert die_after_resume(cfg) == run / "checkpoints" / STEP4
    assert not (run / LEDGER).exists() and committed(run) == [STEP2, STEP4]

    monkeypatch.setenv("SLURM_JOB_ID", batch)
    assert die_after_resume(cfg) == run / "checkpoints" / STEP4
    assert json.loads((run / LEDGER).read_text()) == {STEP4: 1}
    assert die_after_resume(cfg) == run / "checkpoints" / STEP2, "counted in a batch job"


def test_a_job_the_controller_cannot_describe_counts_as_a_batch_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No ``scontrol`` on PATH (a container without Slurm's tools): not known to be interactive, so
    the brake stays on; outside SLURM it is off."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert batch_job({"SLURM_JOB_ID": "17"}) is None
    assert batch_job({}) is False


def test_the_ledger_is_never_written_through_a_link(tmp_path: Path) -> None:
    """A link planted where the count is written first (its temporary file) is refused with one
    line naming it; the file it points to is untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / f".{LEDGER}.tmp-{os.getpid()}").symlink_to(victim)
    with pytest.raises(NotRegularFile, match="is a symbolic link"):
        RestartLedger(tmp_path).started(STEP4)
    assert victim.read_text() == "keep me\n" and not (tmp_path / LEDGER).exists()
