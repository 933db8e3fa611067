"""Atomic checkpoint commit and retention.

Protocol (every rank calls :meth:`CheckpointStore.save`):
rank 0 makes a fresh staging folder → barrier → each rank writes and fsyncs its own
shard → barrier → rank 0 writes the shared state, hashes every file, writes
``manifest.json`` last, fsyncs, renames the folder into place, fsyncs the parent →
retention (only now) → barrier. A crash at any point leaves either the complete new
checkpoint or none, and the previous ones untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import typing as tp
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from radiodiff_resume.checkpoint.codec import decode, encode
from radiodiff_resume.checkpoint.manifest import (
    MANIFEST,
    Manifest,
    hash_files,
    library_versions,
    parse_step,
    step_dirname,
)
from radiodiff_resume.io import fsync_dir

logger = logging.getLogger(__name__)

QUARANTINE = "quarantine"


def rank_component(rank: int) -> str:
    return f"rank-{rank:05d}"


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_component(folder: Path, name: str, tree: tp.Any) -> list[Path]:
    """Write and fsync ``name.json`` (structure) and, if it holds tensors, ``name.safetensors``."""
    structure, tensors = encode(tree)
    paths = [folder / f"{name}.json"]
    write_durable(paths[0], json.dumps(structure, sort_keys=True).encode())
    if tensors:
        paths.append(folder / f"{name}.safetensors")
        save_file(tensors, str(paths[1]), metadata={"component": name})
        with paths[1].open("rb") as f:
            os.fsync(f.fileno())
    return paths


def read_component(folder: Path, name: str) -> tp.Any:
    structure = json.loads((folder / f"{name}.json").read_text())
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return decode(structure, tensors)


class CheckpointStore:
    """The ``checkpoints/`` folder of one training stage."""

    def __init__(self, folder: Path, accelerator: Accelerator, keep_last: int = 3,
                 keep_every: int | None = None) -> None:
        self.folder = Path(folder)
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.protected: set[Path] = set()

    # ----- reading -----------------------------------------------------------------
    def committed(self) -> list[Path]:
        """Committed checkpoint folders (manifest present), newest first."""
        if not self.folder.is_dir():
            return []
        found = [
            (step, p) for p in self.folder.iterdir()
            if p.is_dir() and (step := parse_step(p.name)) is not None and (p / MANIFEST).exists()
        ]
        return [p for _, p in sorted(found, reverse=True)]

    def candidates(self) -> list[Path]:
        """Every ``step-*`` folder, newest first, manifest or not (a missing one is a finding)."""
        if not self.folder.is_dir():
            return []
        found = [(step, p) for p in self.folder.iterdir()
                 if p.is_dir() and (step := parse_step(p.name)) is not None]
        return [p for _, p in sorted(found, reverse=True)]

    def quarantined(self) -> list[Path]:
        folder = self.folder / QUARANTINE
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def remove_leftovers(self) -> list[str]:
        """Clean up after a crash mid-save: uncommitted staging folders go; a checkpoint that a
        re-save had moved aside (``.replaced-step-N``) goes back if ``step-N`` is missing."""
        if not self.folder.is_dir():
            return []
        handled = []
        for path in sorted(self.folder.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith(".replaced-"):
                original = self.folder / path.name.removeprefix(".replaced-")
                if original.exists():
                    shutil.rmtree(path)
                else:
                    os.replace(path, original)
                handled.append(path.name)
            elif path.name.startswith(".staging-"):
                shutil.rmtree(path)
                handled.append(path.name)
        return handled

    def set_aside(self) -> Path:
        """Move every ``step-*`` folder into ``previous-<time>/`` (a deliberate fresh start)."""
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = self.folder / f"previous-{stamp}"
        target.mkdir()
        for path in self.candidates():
            os.replace(path, target / path.name)
        fsync_dir(self.folder)
        return target

    # ----- writing -----------------------------------------------------------------
    def save(
        self,
        step: int,
        shared: tp.Mapping[str, tp.Any],
        own: tp.Any,
        manifest: Manifest,
    ) -> Path:
        """Commit a checkpoint of ``step``. ``shared`` comes from rank 0, ``own`` from every rank."""
        acc = self.accelerator
        final = self.folder / step_dirname(step)
        staging = self.folder / f".staging-{step_dirname(step)}"
        if acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        acc.wait_for_everyone()
        write_component(staging, rank_component(acc.process_index), own)
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name, tree in shared.items():
                write_component(staging, name, tree)
            manifest.files = hash_files(sorted(staging.iterdir()))
            manifest.world_size = acc.num_processes
            manifest.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            manifest.versions = library_versions()
            write_durable(staging / MANIFEST, manifest.to_json().encode())
            fsync_dir(staging)
            self._commit(staging, final)
            self.apply_retention()
        acc.wait_for_everyone()
        return final

    def _commit(self, staging: Path, final: Path) -> None:
        if final.exists():
            old = final.with_name(f".replaced-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_dir(self.folder)

    def apply_retention(self) -> list[Path]:
        """Delete committed checkpoints beyond ``keep_last`` (never below 2, never a protected one).

        Runs only after a commit, so there is never a moment with fewer good checkpoints.
        """
        keep = max(2, self.keep_last)
        removed = []
        for path in self.committed()[keep:]:
            step = parse_step(path.name)
            if path.resolve() in self.protected or (self.keep_every and step and step % self.keep_every == 0):
                continue
            shutil.rmtree(path)
            removed.append(path)
        if removed:
            fsync_dir(self.folder)
            logger.info("checkpoint retention removed %s", ", ".join(p.name for p in removed))
        return removed

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a rejected checkpoint aside with a reason file (main process only)."""
        target_dir = self.folder / QUARANTINE
        target_dir.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        target = target_dir / f"{path.name}-{stamp}"
        os.replace(path, target)
        (target / "QUARANTINE_REASON.txt").write_text(reason + "\n")
        fsync_dir(self.folder)
        fsync_dir(target_dir)
        return target
