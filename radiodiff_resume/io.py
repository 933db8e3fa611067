"""Durable file writes: write aside, fsync, rename into place, fsync the folder.

A reader never sees a half-written file under the final name, even after a crash.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def fsync_dir(path: Path) -> None:
    """Persist directory entries (new files, renames) so a crash cannot lose them.

    Some network filesystems refuse fsync on a directory (EINVAL); their renames are
    still atomic, so that refusal is not an error.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it to ``final`` and fsync the folder."""
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def save_tensors_atomic(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` as safetensors at ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata=metadata)
    commit_file(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    commit_file(tmp, path)
