"""The load's reading: the files of ``verify.MAPPED`` (the EMA's) mapped and hashed through the mapping, the
rest read once; what the trainer keeps never points into a file; a file truncated under a mapping kills
the reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
import torch

from radiodiff_resume.checkpoint.files import CheckpointCorrupt, read_files, read_manifest
from radiodiff_resume.checkpoint.verify import MAPPED, open_checkpoint
from radiodiff_resume.config import Config
from tests.checkpoint.helpers import STEP4, build

REPO = Path(__file__).resolve().parents[2]


def mapped_ranges(folder: Path) -> dict[str, list[tuple[int, int]]]:
    """File name → the address ranges of this process that map it, for the files of ``folder``."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).parent == folder.resolve():
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.setdefault(Path(fields[5]).name, []).append((start, end))
    return ranges


def inside(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= t.data_ptr() < end for start, end in ranges)


def tensors(tree: tp.Any) -> tp.Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from tensors(v)


def test_the_files_of_mapped_are_mapped_and_their_tensors_views_of_them_the_others_read(run: Path) -> None:
    folder = run / "checkpoints" / STEP4
    ckpt = open_checkpoint(folder, read_manifest(folder).stage)
    ranges = mapped_ranges(folder)

    assert "ema.safetensors" in MAPPED and "optimizer.safetensors" not in MAPPED
    assert sorted(ranges) == sorted(MAPPED)
    everywhere = [r for rs in ranges.values() for r in rs]
    components = {"model": list(ckpt.shared["model"].values()), "ema": ckpt.shared["ema"]["shadow_params"],
                  "optimizer": list(tensors(ckpt.shared["optimizer"]["state"]))}
    for name, found in components.items():
        found = [t for t in found if t.numel()]
        assert found
        if f"{name}.safetensors" in MAPPED:
            assert all(inside(t, ranges[f"{name}.safetensors"]) for t in found), name
        else:
            assert not any(inside(t, everywhere) for t in found), name


def test_no_tensor_the_trainer_keeps_after_a_load_points_into_a_checkpoint_file(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    folder = run / "checkpoints" / STEP4
    trainer = build(run_cfg())
    report = trainer.checkpointer.verify_and_load(folder)
    assert report.ok, report.describe()
    assert mapped_ranges(folder), "the load maps files (else this test checks nothing)"

    everywhere = [r for rs in mapped_ranges(folder).values() for r in rs]
    kept = {"model": list(trainer.unwrapped.state_dict().values()),
            "EMA": list(trainer.ema.shadow_params),
            "optimizer": list(tensors(trainer.optimizer.state_dict()["state"]))}
    assert all(kept.values())
    for what, live in kept.items():
        assert not any(inside(t, everywhere) for t in live), f"{what} tensors point into a checkpoint file"


@pytest.mark.parametrize("replace", ["fifo", "symlink"])
def test_a_mapped_file_replaced_by_a_fifo_or_a_symlink_is_refused_without_blocking(
    run: Path, replace: str
) -> None:
    folder = run / "checkpoints" / STEP4
    records = read_manifest(folder).files
    path = folder / "model.safetensors"
    copy = run / "copy.safetensors"
    path.rename(copy)
    if replace == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(copy)

    with pytest.raises(CheckpointCorrupt) as err:
        read_files(folder, records, [path.name], mapped={path.name})

    reason = "is not a regular file" if replace == "fifo" else "unreadable"
    assert str(err.value).startswith(f"model.safetensors {reason}")


TRUNCATE = """
import os, sys
from pathlib import Path
from radiodiff_resume.checkpoint.files import read_files, read_manifest
folder = Path(sys.argv[1])
blob = read_files(folder, read_manifest(folder).files, ["model.safetensors"], mapped={"model.safetensors"})
os.truncate(folder / "model.safetensors", 0)
print("loaded", int(blob["model.safetensors"].sum()), flush=True)
"""


def test_a_mapped_file_truncated_after_its_hash_kills_the_reader_instead_of_loading_other_bytes(
    run: Path,
) -> None:
    folder = run / "checkpoints" / STEP4
    done = subprocess.run([sys.executable, "-c", TRUNCATE, str(folder)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONFAULTHANDLER": ""})

    assert done.returncode == -signal.SIGBUS, done.stderr
    assert "loaded" not in done.stdout
