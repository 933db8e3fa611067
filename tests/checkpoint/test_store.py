"""Commit, retention, refusal of poisoned state and stop requests, on real saves."""

from __future__ import annotations

import math
import os
import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.checkpoint.codec import CodecError
from radiodiff_resume.checkpoint.store import SaveFailed
from radiodiff_resume.config import Config
from radiodiff_resume.errors import ConfigError, HaltError, StopRequested, UserError
from tests.checkpoint.helpers import FAST, STEP2, STEP4, build, committed, events, hashes
from tests.conftest import write_random_first_stage


def steps(results: Path) -> list[int]:
    return [int(name[5:]) for name in committed(results)]


@pytest.mark.parametrize(
    ("keep_every", "expected"),
    [
        (None, [[1], [1, 2], [2, 3], [3, 4], [4, 5]]),
        (2, [[1], [1, 2], [2, 3], [2, 3, 4], [2, 4, 5]]),
    ],
    ids=["keep_last=2", "keep_last=2,keep_every=2"],
)
def test_retention_keeps_the_newest_and_the_multiples(
    keep_every: int | None, expected: list[list[int]], make_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    cfg = make_cfg(*FAST, "checkpoint.keep_last=2", f"checkpoint.keep_every={keep_every or 'null'}",
                   results=tmp_path / "r")
    write_random_first_stage(cfg)
    trainer = build(cfg)
    assert trainer.checkpointer.resume() is None
    seen = []
    for step in range(1, 6):
        trainer.state.step = step
        path = trainer.checkpointer.save()
        assert path.is_dir() and (path / "manifest.json").is_file()
        seen.append(steps(cfg.results_folder))
    assert seen == expected
    assert [e["step"] for e in events(cfg.results_folder, "checkpoint_saved")] == [1, 2, 3, 4, 5]


def test_retention_runs_only_after_a_commit(run: Path, run_cfg: tp.Callable[..., Config]) -> None:
    """A save failing mid-way deletes nothing and leaves no staging folder; the next successful one prunes."""
    ckdir = run / "checkpoints"
    first = build(run_cfg())  # keep_last=3
    assert first.checkpointer.resume() == ckdir / STEP4
    first.state.step = 5
    first.checkpointer.save()
    assert steps(run) == [2, 4, 5]

    trainer = build(run_cfg("checkpoint.keep_last=2"))  # restarted with a lower keep_last
    assert trainer.checkpointer.resume() == ckdir / "step-00000005"
    before = hashes(ckdir)
    trainer.state.step = 6
    group = trainer.optimizer.param_groups[0]
    group["note"] = object()  # state the codec refuses: the save fails after its staging folder was begun

    with pytest.raises(SaveFailed, match="rank 0: CodecError: .*'param_groups/0/note'") as info:
        trainer.checkpointer.save()

    assert isinstance(info.value.__cause__, CodecError)
    assert "earlier checkpoints are untouched (the newest committed checkpoint is " in str(info.value)
    assert steps(run) == [2, 4, 5], "nothing may be pruned before the new checkpoint is committed"
    assert hashes(ckdir) == before, "the failed save left nothing behind"
    staging = ckdir / ".staging-step-00000006"
    assert not staging.exists()
    assert [e["step"] for e in events(run, "checkpoint_saved")] == [5]

    del group["note"]
    trainer.checkpointer.save()

    assert steps(run) == [5, 6]
    assert not staging.exists()
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-00000005", "step-00000006"]
    report = build(run_cfg("checkpoint.keep_last=2")).checkpointer.verify_and_load(ckdir / "step-00000006")
    assert report.ok, report.describe()


@pytest.mark.parametrize(
    "relative",
    [
        False,
        True,
    ],
    ids=["absolute-path", "relative-path"],
)
def test_the_checkpoint_resumed_from_is_never_pruned(
    relative: bool, run: Path, run_cfg: tp.Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckdir = run / "checkpoints"
    named = ckdir / STEP2
    if relative:
        monkeypatch.chdir(run)
        named = Path(os.path.relpath(named, run))
    trainer = build(run_cfg("checkpoint.keep_last=2", f"checkpoint.resume={named}"))
    assert trainer.checkpointer.resume() == named
    assert trainer.state.step == 2
    assert named.resolve() in trainer.checkpointer.store.protected
    protected = hashes(ckdir / STEP2)

    for step in (5, 6):
        trainer.state.step = step
        trainer.checkpointer.save()

    assert steps(run) == [2, 5, 6]
    assert hashes(ckdir / STEP2) == protected


def test_resume_never_keeps_the_new_runs_checkpoints(run: Path, run_cfg: tp.Callable[..., Config]) -> None:
    trainer = build(run_cfg("checkpoint.resume=never", "checkpoint.keep_last=2", "trainer.train_num_steps=1"))
    trainer.fit()
    assert trainer.state.step == 1
    assert [e["step"] for e in events(run, "checkpoint_saved")] == [1]
    assert "step-00000001" in committed(run)


@pytest.mark.parametrize("override", ["checkpoint.keep_last=1", "checkpoint.keep_last=0",
                                      "checkpoint.keep_last=-2"])
def test_config_rejects_keeping_fewer_than_two(override: str, make_cfg: tp.Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last: got -?\d+; allowed: >= 2"):
        make_cfg(override)


@pytest.mark.parametrize("override", ["checkpoint.keep_every=0", "checkpoint.every=0"])
def test_config_rejects_zero_intervals(override: str, make_cfg: tp.Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + ": got 0"):
        make_cfg(override)


def test_poisoned_state_is_refused_and_earlier_checkpoints_stay_good(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == ckdir / STEP4
    before = hashes(ckdir)
    trainer.state.step = 5
    with torch.no_grad():
        trainer.ldm.unet.conv_in.weight.fill_(math.nan)

    with pytest.raises(HaltError) as info:
        trainer.checkpointer.save()

    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "refusing to save step 5" in message and "model.unet.conv_in.weight" in message
    assert "non-finite values in 1 tensor(s)" in message
    [refused] = events(run, "save_refused")
    assert (refused["step"], refused["nonfinite"]) == (5, ["model.unet.conv_in.weight"])
    assert events(run, "checkpoint_saved") == []
    assert hashes(ckdir) == before, "nothing written, nothing pruned"
    assert sorted(p.name for p in ckdir.iterdir()) == [STEP2, STEP4]
    for name in (STEP4, STEP2):
        report = trainer.checkpointer.verify_and_load(ckdir / name)
        assert report.ok, report.describe()


def test_stop_request_saves_the_current_step_and_raises(
    make_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    cfg = make_cfg("trainer.train_num_steps=6", *FAST, results=tmp_path / "s")
    write_random_first_stage(cfg)
    trainer = build(cfg)
    after_step = trainer.after_step

    def stop_after_first(outcome: tp.Any, bar: tp.Any) -> bool:
        stop = after_step(outcome, bar)
        if trainer.state.step == 1:  # after step 1's agreement: it rides on step 2's all-reduce
            trainer.request_stop("test")
        return stop

    trainer.after_step = stop_after_first  # type: ignore[method-assign]
    with pytest.raises(StopRequested, match=r"stopped at step 2 \(test\)"):
        trainer.fit()

    assert trainer.state.step == 2
    assert committed(cfg.results_folder) == ["step-00000002"]
    log = [e["event"] for e in trainer.events.read() if e["event"] in ("checkpoint_saved", "stopped")]
    assert log == ["checkpoint_saved", "stopped"], "the checkpoint is committed before the stop is reported"
    [stopped] = events(cfg.results_folder, "stopped")
    assert (stopped["step"], stopped["reason"]) == (2, "test")
    assert not (cfg.results_folder / "final").exists()

    again = build(cfg)
    assert again.checkpointer.resume() == cfg.results_folder / "checkpoints" / "step-00000002"
    assert again.state.step == 2
    assert again.checkpointer.verified is not None and again.checkpointer.verified.ok


def link_out(run: Path, name: str, outside: Path) -> Path:
    """Move checkpoint ``name`` to ``outside`` and leave a symbolic link to it in its place."""
    folder = run / "checkpoints" / name
    copy = outside / name
    outside.mkdir(exist_ok=True)
    os.replace(folder, copy)
    folder.symlink_to(copy, target_is_directory=True)
    return copy


def test_a_symlinked_checkpoint_is_skipped_never_retired_and_every_later_start_works(
    run: Path, run_cfg: tp.Callable[..., Config], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link = run / "checkpoints" / STEP2
    copy = link_out(run, STEP2, tmp_path / "elsewhere")
    before = hashes(copy)
    trainer = build(run_cfg("checkpoint.keep_last=2"))
    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP4
    for step in (5, 6):  # retention beyond keep_last=2 runs twice
        trainer.state.step = step
        trainer.checkpointer.save()
    committed_now = [p.name for p in trainer.checkpointer.store.committed()]
    assert committed_now == ["step-00000006", "step-00000005", STEP4]  # STEP4: resumed from, so protected
    assert link.is_symlink() and os.readlink(link) == str(copy)
    assert hashes(copy) == before

    later = build(run_cfg("checkpoint.keep_last=2"))  # the next start (a SLURM requeue)
    assert later.checkpointer.resume() == run / "checkpoints" / "step-00000006"
    assert link.is_symlink() and hashes(copy) == before
    assert f"{link} is a symbolic link to {copy}, not a checkpoint folder of this run, so it is skipped" \
        in caplog.text


def test_a_leftover_name_that_is_a_link_is_skipped_not_deleted(
    run: Path, run_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    """What retention left behind before links were skipped: a ``.retired-`` link rmtree refuses."""
    copy = link_out(run, STEP2, tmp_path / "elsewhere")
    retired = run / "checkpoints" / f".retired-{STEP2}"
    os.replace(run / "checkpoints" / STEP2, retired)
    before = hashes(copy)
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP4
    assert retired.is_symlink() and hashes(copy) == before


def test_a_save_whose_name_holds_a_link_moves_the_link_aside_unfollowed(
    run: Path, run_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    copy = link_out(run, STEP4, tmp_path / "elsewhere")
    before = hashes(copy)
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP2
    trainer.state.step = 4
    saved = trainer.checkpointer.save()
    assert saved.is_dir() and not saved.is_symlink() and (saved / "manifest.json").is_file()
    [aside] = (run / "checkpoints").glob(f"foreign-*/{STEP4}")
    assert aside.is_symlink() and os.readlink(aside) == str(copy)
    assert "not a checkpoint folder of this run" in (aside.parent / "SET_ASIDE.txt").read_text()
    assert hashes(copy) == before
