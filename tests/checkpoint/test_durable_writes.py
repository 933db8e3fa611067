"""How a save reaches the disk: every file fsynced before the commit rename, the fsyncs issued at the
same time (one journal commit for all, not one each), writes that survive short ``writev`` calls."""

from __future__ import annotations

import os
import threading
import typing as tp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radiodiff_resume.checkpoint.files import write_components, write_safetensors
from radiodiff_resume.checkpoint.manifest import MANIFEST, hasher
from radiodiff_resume.config import Config
from tests.checkpoint.helpers import build, read_component, read_manifest


def test_every_file_is_on_disk_before_the_commit_rename_and_the_rename_before_save_returns(
    run: Path, run_cfg: tp.Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = build(run_cfg())
    trainer.checkpointer.resume()
    trainer.state.step = 5
    log: list[tuple[str, str]] = []  # ("fsync", path) once it returned, ("rename", target) once done
    lock = threading.Lock()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        with lock:
            log.append(("fsync", path))

    def replace(src: tp.Any, dst: tp.Any) -> None:
        real_replace(src, dst)
        with lock:
            log.append(("rename", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = trainer.checkpointer.save()
    monkeypatch.undo()

    commit = log.index(("rename", str(path)))
    synced_before = {p for kind, p in log[:commit] if kind == "fsync"}
    staging = path.parent / f".staging-{path.name}"
    listed = [*read_manifest(path)["files"], MANIFEST]
    assert len(listed) > 10
    assert [n for n in listed if str(staging / n) not in synced_before] == [], "fsynced before the rename"
    assert str(staging) in synced_before, "the staging folder's entries are on disk before the rename"
    assert ("fsync", str(path.parent)) in log[commit + 1:], "the rename is on disk before save() returns"


def test_the_files_of_a_save_are_fsynced_at_the_same_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every fsync waits here until all the files' fsyncs are under way: written one after the other (or
    a few at a time) the barrier breaks and the save fails, so passing means all were issued together."""
    trees = {f"part{i}": {"weight": torch.full((3,), float(i)), "count": i} for i in range(4)}
    files = {"config.yaml": b"seed: 1\n"}
    barrier = threading.Barrier(2 * len(trees) + len(files), timeout=20)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        barrier.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    records = write_components(tmp_path, trees, files)
    monkeypatch.undo()

    assert sorted(records) == sorted(p.name for p in tmp_path.iterdir())
    for i in range(4):
        assert torch.equal(read_component(tmp_path, f"part{i}")["weight"], torch.full((3,), float(i)))
    assert (tmp_path / "config.yaml").read_bytes() == b"seed: 1\n"


def test_a_safetensors_file_is_whole_when_the_kernel_writes_a_few_bytes_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``writev`` may write less than asked (a signal, a pipe-like file system); the rest must follow."""
    tensors = {"a": torch.arange(40, dtype=torch.float32), "b": torch.ones(3, dtype=torch.bfloat16),
               "c": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0)}
    calls = []

    def writev(fd: int, buffers: tp.Sequence[tp.Any]) -> int:
        calls.append(len(buffers))
        first = bytes(memoryview(buffers[0]))[:5]
        return os.write(fd, first)

    monkeypatch.setattr(os, "writev", writev)
    record = write_safetensors(tmp_path / "t.safetensors", tensors, {"component": "t"})
    monkeypatch.undo()

    assert len(calls) > len(tensors), "the kernel's short writes were exercised"
    data = (tmp_path / "t.safetensors").read_bytes()
    assert record.bytes == len(data)
    digest = hasher(record.algorithm)
    digest.update(data)
    assert digest.hexdigest() == record.digest, "the record is the hash of the bytes on disk"
    header = int.from_bytes(data[:8], "little")
    assert 8 + header + sum(t.numel() * t.element_size() for t in tensors.values()) == len(data)
    loaded = load_file(str(tmp_path / "t.safetensors"))
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key
