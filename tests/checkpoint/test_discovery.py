"""Discovery on resume: the newest verified checkpoint wins, failing ones are quarantined."""

from __future__ import annotations

import json
import math
import os
import shutil
import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.checkpoint.store import REASON_SUFFIX
from radiodiff_resume.config import Config
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import (
    STEP2,
    STEP4,
    build,
    committed,
    events,
    hashes,
    read_component,
    read_shared,
    reseal,
    rewrite_tensors,
    tensor_equal_trees,
    truncate,
)
from tests.conftest import write_random_first_stage


def quarantined(results: Path) -> list[Path]:
    """Quarantined checkpoint folders (their reason files lie beside them)."""
    folder = results / "checkpoints" / "quarantine"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def reason(moved: Path) -> str:
    return moved.with_name(moved.name + REASON_SUFFIX).read_text()


def nudge(ckpt: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["unet.conv_in.weight"].view(-1)[0] += 1e-3

    rewrite_tensors(ckpt, "model", change)


def nan(ckpt: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["cond_encoder.net.0.weight"].view(-1)[0] = math.nan

    rewrite_tensors(ckpt, "model", change)


def assert_holds(trainer: tp.Any, ckpt: Path) -> None:
    """The trainer's shared and rank state are exactly those stored in ``ckpt``."""
    assert tensor_equal_trees(trainer.state_dict(), read_shared(ckpt))
    assert tensor_equal_trees(trainer.noise.get_state(), read_component(ckpt, "rank-00000")["noise_rng"])


@pytest.mark.parametrize(
    ("corrupt", "level", "why"),
    [
        (lambda c: truncate(c / "model.safetensors"), "structure", "model.safetensors has"),
        (nan, "finite", "model.cond_encoder.net.0.weight"),
    ],
    ids=["truncated", "nan"],
)
def test_damaged_newest_is_quarantined_and_the_older_is_resumed(
    corrupt: tp.Callable[[Path], None], level: str, why: str, run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    corrupt(ckdir / STEP4)
    bad_files = hashes(ckdir / STEP4)
    trainer = build(run_cfg())

    chosen = trainer.checkpointer.resume()

    assert chosen == ckdir / STEP2
    assert trainer.state.step == 2
    assert_holds(trainer, ckdir / STEP2)
    assert committed(run) == [STEP2]
    [moved] = quarantined(run)
    assert moved.name.startswith(f"{STEP4}-")
    text = reason(moved)
    assert f"{level:<13} FAILED" in text and why in text, text
    assert hashes(moved) == bad_files, "moved unchanged: nothing added to or removed from the folder"
    [event] = events(run, "checkpoint_quarantined")
    assert event["path"] == str(ckdir / STEP4)
    assert event["to"] == str(moved)
    assert event["reason"] + "\n" == text
    [resumed] = events(run, "resumed")
    assert (resumed["step"], resumed["path"]) == (2, str(ckdir / STEP2))
    assert events(run, "fresh_start") == []
    assert trainer.checkpointer.resumed_from == ckdir / STEP2
    assert ckdir / STEP2 in trainer.checkpointer.store.protected


def test_step_folder_without_manifest_is_quarantined(run: Path, run_cfg: tp.Callable[..., Config]) -> None:
    ckdir = run / "checkpoints"
    (ckdir / STEP4 / "manifest.json").unlink()  # as if the job died before the manifest was written
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == ckdir / STEP2
    assert trainer.state.step == 2
    [moved] = quarantined(run)
    assert moved.name.startswith(f"{STEP4}-")
    assert "manifest.json missing (the save never committed)" in reason(moved)
    assert len(events(run, "checkpoint_quarantined")) == 1


def test_a_probe_mismatch_stops_the_run_moves_nothing_and_the_override_resumes(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    """Files that hash correctly but do not compute what was saved are a difference (code, numerics),
    not proof of damage: no quarantine, no fallback to an older checkpoint, a message and an override."""
    ckdir = run / "checkpoints"
    nudge(ckdir / STEP4)
    before = hashes(ckdir)

    with pytest.raises(UserError) as info:
        build(run_cfg()).checkpointer.resume()

    message = str(info.value)
    assert f"{ckdir / STEP4} is intact but cannot be resumed as configured (nothing was moved)" in message
    assert "probe         FAILED" in message and "bit-exact (identical environment)" in message
    assert "checkpoint.accept_probe_mismatch=true" in message
    assert hashes(ckdir) == before and quarantined(run) == []
    [refused] = events(run, "resume_refused")
    assert refused["level"] == "probe"

    accepted = build(run_cfg("checkpoint.accept_probe_mismatch=true"))
    assert accepted.checkpointer.resume() == ckdir / STEP4
    assert accepted.state.step == 4
    assert "MISMATCH accepted" in tp.cast(tp.Any, accepted.checkpointer.verified).levels["probe"].detail
    assert hashes(ckdir) == before


def test_all_damaged_is_an_error_and_nothing_starts(run: Path, run_cfg: tp.Callable[..., Config]) -> None:
    ckdir = run / "checkpoints"
    nan(ckdir / STEP4)
    truncate(ckdir / STEP2 / "optimizer.safetensors")
    trainer = build(run_cfg("trainer.train_num_steps=6"))

    with pytest.raises(UserError) as info:
        trainer.fit()

    message = str(info.value)
    assert "none verifies" in message
    assert "checkpoint.resume=never" in message
    assert f"{STEP4}: finite" in message and f"{STEP2}: structure" in message
    assert str(ckdir / "quarantine") in message
    assert committed(run) == []
    assert [p.name.rsplit("-", 1)[0] for p in quarantined(run)] == [STEP2, STEP4]
    assert len(events(run, "checkpoint_quarantined")) == 2
    for name in ("fresh_start", "resumed", "checkpoint_saved"):
        assert events(run, name) == [], name
    assert not (run / "samples").exists() and not (run / "final").exists()
    assert not (run / "metrics.jsonl").exists() or "loss" not in (run / "metrics.jsonl").read_text()


def test_rerun_after_everything_was_quarantined_still_refuses_to_start_fresh(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    truncate(ckdir / STEP4 / "model.safetensors")
    truncate(ckdir / STEP2 / "model.safetensors")
    with pytest.raises(UserError, match="none verifies"):
        build(run_cfg()).checkpointer.resume()
    assert len(quarantined(run)) == 2

    again = build(run_cfg())
    with pytest.raises(UserError, match=r"only quarantined ones .* \*\.reason\.txt"):
        again.checkpointer.resume()
    assert events(run, "fresh_start") == []


def test_a_quarantined_checkpoint_once_repaired_resumes_by_name(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    """The documented recovery path: the folder in quarantine/ is byte for byte what was there, so
    after repairing the damaged file it verifies and resumes with checkpoint.resume=<that folder>."""
    ckdir = run / "checkpoints"
    good = (ckdir / STEP4 / "model.safetensors").read_bytes()
    truncate(ckdir / STEP4 / "model.safetensors")
    assert build(run_cfg()).checkpointer.resume() == ckdir / STEP2
    [moved] = quarantined(run)

    (moved / "model.safetensors").write_bytes(good)
    trainer = build(run_cfg("checkpoint.keep_last=2", f"checkpoint.resume={moved}"))

    assert trainer.checkpointer.resume() == moved
    assert trainer.state.step == 4
    assert committed(run) == [STEP2], "the older checkpoint of the same line stays"
    for step in (5, 6, 7):
        trainer.state.step = step
        trainer.checkpointer.save()
    assert committed(run) == [STEP2, "step-00000006", "step-00000007"], \
        "retention keeps 2 of the run's own line, which branched from the named one; step 2 is not its own"
    assert moved.is_dir() and (moved / "model.safetensors").read_bytes() == good


def test_no_checkpoints_is_a_fresh_start(make_cfg: tp.Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg("trainer.val_batches=0", results=tmp_path / "empty")
    write_random_first_stage(cfg)
    staging = cfg.results_folder / "checkpoints" / ".staging-step-00000002"
    staging.mkdir(parents=True)  # an uncommitted leftover is not a checkpoint (and is removed)
    trainer = build(cfg)

    assert trainer.checkpointer.resume() is None

    assert trainer.state.step == 0
    assert [e["reason"] for e in events(cfg.results_folder, "fresh_start")] == ["no checkpoint"]
    assert trainer.checkpointer.resumed_from is None
    assert not staging.exists()


def test_resume_never_sets_existing_checkpoints_aside(run: Path, run_cfg: tp.Callable[..., Config]) -> None:
    before = hashes(run / "checkpoints")
    trainer = build(run_cfg("checkpoint.resume=never"))

    assert trainer.checkpointer.resume() is None

    assert trainer.state.step == 0
    assert [e["reason"] for e in events(run, "fresh_start")] == ["checkpoint.resume=never"]
    assert committed(run) == []
    (aside,) = [Path(e["to"]) for e in events(run, "checkpoints_set_aside")]
    after = {f"{aside.name}/{k}": v for k, v in before.items()}
    note = f"{aside.name}/SET_ASIDE.txt"
    assert {k: v for k, v in hashes(run / "checkpoints").items() if k != note} == after, \
        "nothing lost: the old run's files are kept, unchanged"
    assert "checkpoint.resume=never" in (aside / "SET_ASIDE.txt").read_text()
    assert quarantined(run) == []


def test_resume_from_a_named_older_checkpoint_sets_the_newer_ones_aside(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    newer = hashes(ckdir / STEP4)
    trainer = build(run_cfg(f"checkpoint.resume={ckdir / STEP2}"))

    assert trainer.checkpointer.resume() == ckdir / STEP2

    assert trainer.state.step == 2
    assert_holds(trainer, ckdir / STEP2)
    assert committed(run) == [STEP2]
    [resumed] = events(run, "resumed")
    assert resumed["path"] == str(ckdir / STEP2)
    [aside] = events(run, "checkpoints_set_aside")
    assert aside["folders"] == STEP4
    assert hashes(Path(aside["to"]) / STEP4) == newer, "set aside unchanged, never deleted"


def test_a_restart_that_still_names_the_checkpoint_keeps_the_progress_made_since(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    """A requeued job carries its ``checkpoint.resume=<folder>`` override: its second run continues
    from what the first run committed after that checkpoint, instead of setting it aside again."""
    ckdir = run / "checkpoints"
    named = f"checkpoint.resume={ckdir / STEP2}"
    build(run_cfg(named, "trainer.train_num_steps=6")).fit()
    assert committed(run) == [STEP2, STEP4, "step-00000006"]
    branch = json.loads((ckdir / "step-00000006" / "manifest.json").read_text())["line"]
    assert json.loads((ckdir / STEP2 / "manifest.json").read_text())["line"] != branch, \
        "the run resumed from a named checkpoint writes a line of its own"
    progress = hashes(ckdir / "step-00000006")

    trainer = build(run_cfg(named, "trainer.train_num_steps=8"))
    assert trainer.checkpointer.resume() == ckdir / "step-00000006"
    assert trainer.state.step == 6
    assert committed(run) == [STEP2, STEP4, "step-00000006"]
    assert hashes(ckdir / "step-00000006") == progress
    assert len(events(run, "checkpoints_set_aside")) == 1, "only the first run set the old step 4 aside"
    trainer.fit()
    assert json.loads((ckdir / "step-00000008" / "manifest.json").read_text())["line"] == branch


def test_a_named_checkpoint_that_fails_is_an_error_and_is_not_quarantined(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    truncate(ckdir / STEP2 / "model.safetensors")
    before = hashes(ckdir)
    trainer = build(run_cfg(f"checkpoint.resume={ckdir / STEP2}"))

    with pytest.raises(UserError) as info:
        trainer.checkpointer.resume()

    message = str(info.value)
    assert f"checkpoint.resume={ckdir / STEP2} does not verify (it is damaged; a checkpoint you name is " \
        "never moved)" in message
    assert "structure     FAILED" in message and "model.safetensors has" in message
    assert hashes(ckdir) == before, "a named checkpoint is never moved or changed"
    assert quarantined(run) == [] and events(run, "checkpoint_quarantined") == []
    assert trainer.state.step == 0, "no fallback to another checkpoint"

    missing = build(run_cfg(f"checkpoint.resume={ckdir / 'step-00000099'}"))
    with pytest.raises(UserError, match="no such checkpoint folder"):
        missing.checkpointer.resume()


def test_leftover_staging_folder_is_not_a_checkpoint_and_is_removed(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    staging = ckdir / ".staging-step-00000006"  # a save of step 6 killed before its manifest
    shutil.copytree(ckdir / STEP4, staging)
    (staging / "manifest.json").unlink()
    truncate(staging / "model.safetensors")
    (staging / "partial.bin").write_bytes(b"half a write")
    trainer = build(run_cfg("trainer.train_num_steps=6"))

    assert trainer.checkpointer.resume() == ckdir / STEP4

    assert trainer.state.step == 4
    assert not staging.exists()
    [removed] = events(run, "staging_removed")
    assert removed["folders"] == [staging.name]
    assert quarantined(run) == [] and events(run, "checkpoint_quarantined") == []
    assert committed(run) == [STEP2, STEP4]


def test_kill_between_the_two_renames_of_a_resave_keeps_that_step(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    shutil.copytree(ckdir / STEP4, ckdir / f".staging-{STEP4}")  # the complete new save, manifest written
    (ckdir / STEP4).rename(ckdir / f".replaced-{STEP4}")  # first rename of _commit done, second not
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == ckdir / STEP4
    assert trainer.state.step == 4


def unreadable_safetensors(ckpt: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    reseal(ckpt, "model.safetensors")


def dangling_tensor_reference(ckpt: Path) -> None:
    structure = json.loads((ckpt / "model.json").read_text())
    structure["unet.extra"] = {"__tensor__": "unet.extra"}
    (ckpt / "model.json").write_text(json.dumps(structure, sort_keys=True))
    reseal(ckpt, "model.json")


@pytest.mark.parametrize("corrupt", [unreadable_safetensors, dangling_tensor_reference],
                         ids=["unreadable-safetensors", "dangling-tensor-reference"])
def test_consistent_but_unreadable_newest_is_quarantined(
    corrupt: tp.Callable[[Path], None], run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckdir = run / "checkpoints"
    corrupt(ckdir / STEP4)
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == ckdir / STEP2
    assert [p.name.rsplit("-", 1)[0] for p in quarantined(run)] == [STEP4]


def test_an_io_error_while_reading_is_damage_and_the_older_checkpoint_is_resumed(
    run: Path, run_cfg: tp.Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from a failing disk (it cannot be produced here, so reading that one file raises it)."""
    import errno

    from radiodiff_resume.checkpoint import files

    real_fdopen = files.os.fdopen

    class FailingRead:
        def __init__(self, f: tp.Any) -> None:
            self.f = f

        def __enter__(self) -> FailingRead:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def fileno(self) -> int:
            return tp.cast(int, self.f.fileno())

        def readinto(self, buffer: tp.Any) -> int:
            raise OSError(errno.EIO, "Input/output error")

    def fdopen(fd: int, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        f = real_fdopen(fd, *args, **kwargs)
        failing = os.readlink(f"/proc/self/fd/{fd}").endswith(f"{STEP4}/optimizer.safetensors")
        return FailingRead(f) if failing else f

    monkeypatch.setattr(files.os, "fdopen", fdopen)
    trainer = build(run_cfg())
    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP2
    [moved] = quarantined(run)
    assert "optimizer.safetensors unreadable (Input/output error)" in reason(moved)
