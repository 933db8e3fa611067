"""Retention never eats the live run: resuming an older checkpoint sets the newer ones aside, retention
only prunes the run's own line, and a checkpoint being retired never looks like a damaged one."""

from __future__ import annotations

import shutil
import typing as tp
from pathlib import Path

import pytest

from radiodiff_resume.checkpoint import store as store_module
from radiodiff_resume.config import Config
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import FAST, STEP2, STEP4, build, committed, events, hashes, read_manifest
from tests.conftest import write_random_first_stage


def save_at(trainer: tp.Any, *steps: int) -> None:
    for step in steps:
        trainer.state.step = step
        trainer.checkpointer.save()


def test_resuming_an_older_checkpoint_keeps_every_new_commit_and_sets_the_abandoned_line_aside(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    """The reported loss: resume=<step 2> while steps 4 and 6 exist; every new commit was deleted right
    after being committed (retention sorted by step), and a later auto-resume took the abandoned step 6."""
    ckdir = run / "checkpoints"
    first = build(run_cfg())
    assert first.checkpointer.resume() == ckdir / STEP4
    save_at(first, 6)
    abandoned = {name: hashes(ckdir / name) for name in (STEP4, "step-00000006")}

    branch = build(run_cfg("checkpoint.keep_last=2", f"checkpoint.resume={ckdir / STEP2}"))
    assert branch.checkpointer.resume() == ckdir / STEP2
    save_at(branch, 3, 5)

    assert committed(run) == [STEP2, "step-00000003", "step-00000005"]
    [aside] = events(run, "checkpoints_set_aside")
    for name, files in abandoned.items():
        assert hashes(Path(aside["to"]) / name) == files, "set aside unchanged, never deleted"
    assert [e["step"] for e in events(run, "checkpoint_saved")] == [6, 3, 5]

    after_crash = build(run_cfg("checkpoint.keep_last=2"))
    assert after_crash.checkpointer.resume() == ckdir / "step-00000005"
    lines = [read_manifest(ckdir / name)["line"] for name in committed(run)]
    assert lines[1] == lines[2] != lines[0], \
        "the branch resumed from a named checkpoint writes a line of its own; retention never touches step 2"


def test_retention_never_touches_a_checkpoint_of_another_line(
    run: Path, run_cfg: tp.Callable[..., Config], make_cfg: tp.Callable[..., Config], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other_cfg = make_cfg("trainer.train_num_steps=1", *FAST, results=other)
    write_random_first_stage(other_cfg)
    build(other_cfg).fit()
    foreign = run / "checkpoints" / "step-00000001"
    shutil.copytree(other / "checkpoints" / "step-00000001", foreign)
    foreign_files = hashes(foreign)

    trainer = build(run_cfg("checkpoint.keep_last=2"))
    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP4
    save_at(trainer, 5, 6, 7)

    assert committed(run) == ["step-00000001", STEP4, "step-00000006", "step-00000007"], \
        "kept: the other line's, the one resumed from, and the newest two"
    assert hashes(foreign) == foreign_files


def test_a_checkpoint_is_retired_out_of_the_namespace_before_it_is_deleted(
    run: Path, run_cfg: tp.Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill in the middle of deleting used to leave ``step-N`` without its manifest, which the next
    start quarantined as damaged. Here the delete fails half-way (as a kill would leave it)."""
    ckdir = run / "checkpoints"
    trainer = build(run_cfg("checkpoint.keep_last=2"))
    assert trainer.checkpointer.resume() == ckdir / STEP4
    real_rmtree = shutil.rmtree

    def interrupted(path: str | Path, *args: tp.Any, **kwargs: tp.Any) -> None:
        if Path(path).name.startswith(".retired-") and Path(path).is_dir():
            (Path(path) / "manifest.json").unlink()
            raise OSError("interrupted while deleting")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(store_module.shutil, "rmtree", interrupted)
    save_at(trainer, 5)
    monkeypatch.undo()

    assert committed(run) == [STEP4, "step-00000005"]
    assert (ckdir / f".retired-{STEP2}").is_dir() and not (ckdir / STEP2).exists()

    again = build(run_cfg("checkpoint.keep_last=2"))
    assert again.checkpointer.resume() == ckdir / "step-00000005"
    [removed] = events(run, "staging_removed")
    assert removed["folders"] == [f".retired-{STEP2}"]
    assert not (ckdir / f".retired-{STEP2}").exists()
    assert events(run, "checkpoint_quarantined") == []


def test_naming_the_checkpoints_folder_itself_says_so_and_names_the_newest(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    """``checkpoint.resume=<checkpoints/>`` is a slip, not damage: one line that names a checkpoint
    inside; nothing is moved."""
    ckdir = run / "checkpoints"
    before = committed(run)
    trainer = build(run_cfg(f"checkpoint.resume={ckdir}"))
    with pytest.raises(UserError, match=rf"is a folder of checkpoints, not one checkpoint: name one of them "
                                        rf"\(the newest there is {ckdir / STEP4}\)"):
        trainer.checkpointer.resume()
    assert committed(run) == before
