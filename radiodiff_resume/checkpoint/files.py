"""The files of a checkpoint, each hashed from the very bytes written or loaded.

Saving serialises a component to bytes, hashes those bytes, writes them and fsyncs;
loading reads a file once, hashes what was read and decodes the same buffer. There is
no second read that could see other bytes than the ones the hash vouched for, and no
loaded tensor points into a file mapping that a later write could change.

The hash is XXH3-128 (:data:`~radiodiff_resume.checkpoint.manifest.HASH`): on one core it runs
several times faster than SHA-256, so reading, not hashing, bounds a load. It detects corruption;
it is not a signature.
"""

from __future__ import annotations

import json
import math
import os
import stat
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from radiodiff_resume.checkpoint.codec import CodecError, decode, encode
from radiodiff_resume.checkpoint.manifest import (
    HASH,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    FileRecord,
    Manifest,
    ManifestError,
    hasher,
    record_of,
)

Blob = np.ndarray
"""A file's bytes as a writable uint8 array: tensors decoded from it are views of it, not copies."""
NOTHING: Blob = np.empty(0, dtype=np.uint8)
READ_THREADS = 4
READ_CHUNK = 8 << 20
MAX_HEADER = 100 << 20
"""The safetensors library's own limit on a header."""
MAX_DEPTH = 32
"""Our state trees are a few levels deep; anything deeper is not ours (and would overflow the
recursion of a deep copy inside torch or diffusers)."""


class CheckpointCorrupt(Exception):
    """A checkpoint's files are not what its manifest recorded, or cannot be decoded."""


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it; a failure names the file."""
    try:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _named(exc, path) from exc


def write_component(folder: Path, name: str, tree: tp.Any) -> dict[str, FileRecord]:
    """Write and fsync ``name.json`` (structure) and, if the tree holds tensors, ``name.safetensors``;
    their records come from the bytes as they are written."""
    structure, tensors = encode(tree)
    data = json.dumps(structure, sort_keys=True).encode()
    write_durable(folder / f"{name}.json", data)
    records = {f"{name}.json": record_of(data)}
    if tensors:
        path = folder / f"{name}.safetensors"
        records[path.name] = write_safetensors(path, tensors, {"component": name})
    return records


def write_components(folder: Path, trees: tp.Mapping[str, tp.Any]) -> dict[str, FileRecord]:
    """:func:`write_component` for each tree, in threads (writing and hashing release the GIL)."""
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(trees) or 1)) as pool:
        parts = list(pool.map(lambda item: write_component(folder, *item), trees.items()))
    return {name: record for part in parts for name, record in part.items()}


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: Path, tensors: tp.Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> FileRecord:
    """The safetensors format, streamed from each (contiguous, CPU) tensor's own memory and hashed on
    the way: no serialised copy of the whole file in memory. It is read back by the safetensors library."""
    unknown = sorted(k for k, t in tensors.items() if t.dtype not in SAFETENSORS_DTYPES)
    if unknown:
        raise CodecError(f"cannot store tensor '{unknown[0]}' of dtype {tensors[unknown[0]].dtype}")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # keeps every tensor aligned
    header: dict[str, tp.Any] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = tensors[key]
        size = t.numel() * t.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    chunks = [len(head).to_bytes(8, "little"), head,
              *(memoryview(tensors[k].reshape(-1).view(torch.uint8).numpy()) for k in order)]
    digest, size = hasher(HASH), 0
    try:
        with path.open("wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _named(exc, path) from exc
    return FileRecord(digest=digest.hexdigest(), bytes=size, algorithm=HASH)


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with the file it concerns (a failed write does not say)."""
    return exc if exc.filename is not None else OSError(exc.errno, exc.strerror, str(path))


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
) -> dict[str, Blob]:
    """Read each named file once and check it against its record (threads: hashing releases the GIL;
    the largest files start first, so that no thread is left alone with a big one at the end)."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(names) or 1)) as pool:
        started = {n: pool.submit(_read_checked, folder / n, records[n])
                   for n in sorted(names, key=lambda n: -records[n].bytes)}
        results = [started[n].result() for n in names]
    problems = [problem for _, problem in results if problem]
    if problems:
        raise CheckpointCorrupt("; ".join(problems))
    return {name: data for name, (data, _) in zip(names, results, strict=True)}


def _read_checked(path: Path, record: FileRecord) -> tuple[Blob, str | None]:
    """The file's bytes, read once into memory we own (not zero-filled first) and hashed as they
    arrive, with the hash the record names."""
    data = np.empty(record.bytes, dtype=np.uint8)
    view, digest, got = memoryview(data), hasher(record.algorithm), 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO must not block us
        with os.fdopen(fd, "rb", buffering=0) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return NOTHING, f"{path.name} is not a regular file"
            while got < record.bytes:
                n = f.readinto(view[got:got + READ_CHUNK])
                if not n:
                    break
                digest.update(view[got:got + n])
                got += n
            extra = len(f.read(1)) if got == record.bytes else 0
    except OSError as exc:
        return NOTHING, f"{path.name} unreadable ({exc.strerror or exc})"
    if got != record.bytes or extra:
        return NOTHING, f"{path.name} has {'more' if extra else got} bytes, manifest says {record.bytes}"
    if digest.hexdigest() != record.digest:
        return NOTHING, f"{path.name} {record.algorithm} mismatch (content changed after the save)"
    return data, None


def read_safetensors(data: Blob) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in ``data``, as views of it (no copy), after checking what the
    safetensors library checks: header size, dtypes, shapes, and offsets that tile the data exactly."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8].tobytes(), "little")
    if size > min(len(data) - 8, MAX_HEADER):
        raise ValueError(f"header of {size} bytes does not fit the file")
    header = json.loads(data[8:8 + size].tobytes())
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    start, tensors, spans = 8 + size, {}, []
    for name, info in header.items():
        dtype = DTYPES_BY_NAME.get(info.get("dtype")) if isinstance(info, dict) else None
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if dtype else (None, None)
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and _are_counts(shape) and _are_counts(offsets)):
            raise ValueError(f"tensor '{name}': malformed entry")
        count = math.prod(shape)
        begin, end = offsets
        if end - begin != count * dtype.itemsize or start + end > len(data):
            raise ValueError(f"tensor '{name}': offsets do not match its shape and dtype")
        spans.append((begin, end))
        tensors[name] = (torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin).reshape(shape)
                         if count else torch.empty(shape, dtype=dtype))
    edge = 0
    for begin, end in sorted(spans):
        if begin != edge:
            raise ValueError("tensor data overlaps or leaves gaps")
        edge = end
    if start + edge != len(data):
        raise ValueError("tensor data does not end where the file does")
    return tensors


def _are_counts(values: list[tp.Any]) -> bool:
    """Every value a non-negative int (JSON gives exact ``int`` or ``bool``; a bool is no count)."""
    return all(type(v) is int and v >= 0 for v in values)


def decode_component(blobs: tp.Mapping[str, Blob], name: str) -> tp.Any:
    """The state tree of component ``name`` from already hash-checked bytes."""
    try:
        structure = json.loads(blobs[f"{name}.json"].tobytes())
        if _depth(structure) > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        tensor_file = f"{name}.safetensors"
        tensors = read_safetensors(blobs[tensor_file]) if tensor_file in blobs else {}
        return decode(structure, tensors)
    except (ValueError, RecursionError, CodecError, TypeError, KeyError, RuntimeError, OverflowError) as exc:
        raise CheckpointCorrupt(f"{name} cannot be decoded ({type(exc).__name__}: {exc})") from None


def _depth(tree: tp.Any) -> int:
    """Nesting depth of a JSON tree (a scalar is one level), without recursion: one level at a time."""
    deepest, level = 1, [tree] if isinstance(tree, (dict, list)) else []
    while level:
        children = [c for node in level for c in (node.values() if isinstance(node, dict) else node)]
        deepest += bool(children)
        level = [c for c in children if isinstance(c, (dict, list))]
    return deepest
