"""The files of a checkpoint, each hashed from the very bytes written or loaded.

Saving serialises a component to bytes, hashes those bytes, writes them and fsyncs;
loading reads a file once, hashes what was read and decodes the same buffer. There is
no second read that could see other bytes than the ones the hash vouched for, and no
loaded tensor points into a file mapping that a later write could change.
"""

from __future__ import annotations

import json
import os
import stat
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from radiodiff_resume.checkpoint.codec import CodecError, decode, encode
from radiodiff_resume.checkpoint.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    FileRecord,
    Manifest,
    ManifestError,
    record_of,
)

READ_THREADS = 4
MAX_DEPTH = 32
"""Our state trees are a few levels deep; anything deeper is not ours (and would overflow the
recursion of a deep copy inside torch or diffusers)."""


class CheckpointCorrupt(Exception):
    """A checkpoint's files are not what its manifest recorded, or cannot be decoded."""


def component_files(name: str, tree: tp.Any) -> dict[str, bytes]:
    """``name.json`` (structure) and, if the tree holds tensors, ``name.safetensors``."""
    structure, tensors = encode(tree)
    files = {f"{name}.json": json.dumps(structure, sort_keys=True).encode()}
    if tensors:
        files[f"{name}.safetensors"] = save_tensors(tensors, metadata={"component": name})
    return files


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it; a failure names the file (a failed write does not)."""
    try:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def write_files(folder: Path, files: tp.Mapping[str, bytes]) -> dict[str, FileRecord]:
    """Write and fsync each file; its record is computed from the bytes in memory."""
    records = {}
    for name, data in files.items():
        records[name] = record_of(data)
        write_durable(folder / name, data)
    return records


def read_manifest(folder: Path) -> Manifest:
    """The parsed manifest of ``folder``; :class:`ManifestError` or ``OSError`` otherwise."""
    path = folder / MANIFEST
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError("manifest.json is not a regular file")
    with path.open("rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    return Manifest.from_json(data)



def listing_problems(folder: Path, manifest: Manifest) -> list[str]:
    """What is wrong with the folder's entries: missing, stray, not a regular file, wrong size."""
    problems = []
    present = {entry.name: entry for entry in os.scandir(folder)}
    for name, record in sorted(manifest.files.items()):
        entry = present.get(name)
        if entry is None:
            problems.append(f"{name} missing")
        elif entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            problems.append(f"{name} is not a regular file")
        elif (size := entry.stat(follow_symlinks=False).st_size) != record.bytes:
            problems.append(f"{name} has {size} bytes, manifest says {record.bytes}")
    stray = sorted(set(present) - set(manifest.files) - {MANIFEST})
    if stray:
        shown = [n + ("/" if present[n].is_dir(follow_symlinks=False) else "") for n in stray]
        problems.append("stray entries not in the manifest: " + ", ".join(shown))
    return problems


def read_files(
    folder: Path, records: tp.Mapping[str, FileRecord], names: tp.Iterable[str]
) -> dict[str, bytes]:
    """Read each named file once and check it against its record (threads: hashing releases the GIL)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(names) or 1)) as pool:
        results = list(pool.map(lambda n: _read_checked(folder / n, records[n]), names))
    problems = [problem for _, problem in results if problem]
    if problems:
        raise CheckpointCorrupt("; ".join(problems))
    return {name: data for name, (data, _) in zip(names, results, strict=True)}


def _read_checked(path: Path, record: FileRecord) -> tuple[bytes, str | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block us
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return b"", f"{path.name} is not a regular file"
            data = f.read(record.bytes + 1)
    except OSError as exc:
        return b"", f"{path.name} unreadable ({exc.strerror or exc})"
    if len(data) != record.bytes:
        return b"", f"{path.name} has {len(data)} bytes, manifest says {record.bytes}"
    if record_of(data).sha256 != record.sha256:
        return b"", f"{path.name} sha256 mismatch (content changed after the save)"
    return data, None


def decode_component(blobs: tp.Mapping[str, bytes], name: str) -> tp.Any:
    """The state tree of component ``name`` from already hash-checked bytes."""
    try:
        structure = json.loads(blobs[f"{name}.json"])
        if _depth(structure) > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        tensor_file = f"{name}.safetensors"
        tensors: dict[str, torch.Tensor] = load_tensors(blobs[tensor_file]) if tensor_file in blobs else {}
        return decode(structure, tensors)
    except (ValueError, RecursionError, SafetensorError, CodecError, TypeError, KeyError) as exc:
        raise CheckpointCorrupt(f"{name} cannot be decoded ({type(exc).__name__}: {exc})") from None


def _depth(tree: tp.Any) -> int:
    """Nesting depth of a JSON tree, without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest
