"""The files of a checkpoint, each hashed from the very bytes written or loaded.

Saving serialises a component to bytes, hashes those bytes, writes them and fsyncs;
loading reads a file once, hashes what was read and decodes the same buffer. There is
no second read that could see other bytes than the ones the hash vouched for. A file whose
tensors are only copied out (the model's, the EMA's) may be memory-mapped instead and hashed
through the mapping, saving the copy a read makes; see :func:`_map_hashed` for what a process
that truncates or rewrites such a file during the load can do.

The hash is XXH3-128 (:data:`~radiodiff_resume.checkpoint.manifest.HASH`): on one core it runs
several times faster than SHA-256, so reading, not hashing, bounds a load. It detects corruption;
it is not a signature.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import stat
import threading
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
    Hasher,
    Manifest,
    ManifestError,
    hasher,
)

Blob = np.ndarray
"""A file's bytes as a writable uint8 array: tensors decoded from it are views of it, not copies."""
NOTHING: Blob = np.empty(0, dtype=np.uint8)
READ_THREADS = 4
IOV_MAX = os.sysconf("SC_IOV_MAX")
"""Most buffers one ``writev`` takes."""
WRITE_BATCH = 8 << 20
"""Bytes hashed, then written, per ``writev``: the hash reads them while they are still in cache."""
READ_CHUNK = 8 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux's number for it (the mmap module names it from Python 3.13 on)."""
MAX_HEADER = 100 << 20
"""The safetensors library's own limit on a header."""
MAX_DEPTH = 32
"""Our state trees are a few levels deep; anything deeper is not ours (and would overflow the
recursion of a deep copy inside torch or diffusers)."""


class CheckpointCorrupt(Exception):
    """A checkpoint's files are not what its manifest recorded, or cannot be decoded."""


def write_durable(path: Path, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to ``path`` and fsync it (``sync=False``: the caller fsyncs it, together with
    others); a failure names the file."""
    try:
        with path.open("wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
    except OSError as exc:
        raise _named(exc, path) from exc


def write_component(folder: Path, name: str, tree: tp.Any) -> dict[str, FileRecord]:
    """Write and fsync ``name.json`` (structure) and, if the tree holds tensors, ``name.safetensors``;
    their records come from the bytes as they are written."""
    return write_components(folder, {name: tree})


def write_components(folder: Path, trees: tp.Mapping[str, tp.Any],
                     files: tp.Mapping[str, bytes] | None = None) -> dict[str, FileRecord]:
    """:func:`write_component` for each tree, and each of ``files`` (name → bytes) as it is.

    Each file's bytes are laid out on the calling thread (encoding is Python work that holds the GIL),
    then hashed, written and fsynced in a thread of its own that starts at once, doing next to no
    Python work, while the next file is laid out. So the fsyncs of a save wait at the same time and
    the filesystem commits them together, where one after the other each would wait for a journal
    commit of its own: the fixed cost that dominated a small checkpoint. Returns once every file is on
    disk, or raises the first error after every thread ended."""
    records: dict[str, FileRecord] = {}
    errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def write(path: Path, chunks: list[memoryview]) -> None:
        try:
            records[path.name] = write_hashed(path, chunks)
        except BaseException as exc:  # raised below, on the caller's thread
            errors.append(exc)

    def start(path: Path, chunks: list[memoryview]) -> None:
        threads.append(threading.Thread(target=write, args=(path, chunks),
                                        name=f"checkpoint-write-{path.name}"))
        threads[-1].start()

    try:
        for name, data in (files or {}).items():
            start(folder / name, [memoryview(data)])
        for name, tree in trees.items():
            structure, tensors = encode(tree)
            if tensors:
                start(folder / f"{name}.safetensors", safetensors_chunks(tensors, {"component": name}))
            start(folder / f"{name}.json", [memoryview(json.dumps(structure, sort_keys=True).encode())])
    finally:
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    return records


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
    return write_hashed(path, safetensors_chunks(tensors, metadata))


def safetensors_chunks(tensors: tp.Mapping[str, torch.Tensor], metadata: dict[str, str]) -> list[memoryview]:
    """A safetensors file as the buffers it is made of: its header, then each tensor's own memory."""
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
    return [memoryview(len(head).to_bytes(8, "little") + head), *(_memory_of(tensors[k]) for k in order)]


def _memory_of(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, not copied: through numpy where it knows the dtype (several times
    faster than torch's reshape and view, which counts with hundreds of tensors), else through uint8."""
    try:
        return memoryview(tensor.numpy()).cast("B")
    except TypeError:  # bfloat16, float8 (no numpy dtype) and empty tensors
        return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_hashed(path: Path, chunks: list[memoryview]) -> FileRecord:
    """Write ``chunks`` one after the other to ``path``, hashed on the way, and fsync it; a failure
    names the file."""
    digest = hasher(HASH)
    try:
        with path.open("wb", buffering=0) as f:
            size = _write_hashed(f.fileno(), chunks, digest)
            os.fsync(f.fileno())
    except OSError as exc:
        raise _named(exc, path) from exc
    return FileRecord(digest=digest.hexdigest(), bytes=size, algorithm=HASH)


def _write_hashed(fd: int, chunks: list[memoryview], digest: Hasher) -> int:
    """Hash and write every chunk, in order, a batch of up to :data:`IOV_MAX` buffers and about
    :data:`WRITE_BATCH` bytes per ``writev`` (hashed just before, while in cache): few system calls
    matter because each one gives up the GIL, and taking it back can wait for the thread that
    encodes the next files. A short write goes on where it stopped."""
    views = [c for c in chunks if len(c)]
    first, written = 0, 0
    while first < len(views):
        last, batch = first, 0
        while last < len(views) and last - first < IOV_MAX and (batch < WRITE_BATCH or last == first):
            batch += len(views[last])
            last += 1
        for view in views[first:last]:
            digest.update(view)
        while first < last:
            n = os.writev(fd, views[first:last])
            if not n:
                raise OSError(errno.EIO, "the write made no progress")
            written += n
            while first < last and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if n:
                views[first] = views[first][n:]
    return written


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
    folder: Path, records: tp.Mapping[str, FileRecord], names: tp.Iterable[str],
    mapped: tp.Collection[str] = (),
) -> dict[str, Blob]:
    """Read each named file once and check it against its record (threads: hashing releases the GIL;
    the largest files start first, so that no thread is left alone with a big one at the end).

    The files named in ``mapped`` are memory-mapped instead (:func:`_map_hashed`): for a file whose
    tensors are only copied out of it, mapping skips the copy into memory of our own that reading makes."""
    names = list(names)
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(names) or 1)) as pool:
        started = {n: pool.submit(_read_checked, folder / n, records[n], n in mapped)
                   for n in sorted(names, key=lambda n: -records[n].bytes)}
        results = [started[n].result() for n in names]
    problems = [problem for _, problem in results if problem]
    if problems:
        raise CheckpointCorrupt("; ".join(problems))
    return {name: data for name, (data, _) in zip(names, results, strict=True)}


def _read_checked(path: Path, record: FileRecord, mapped: bool = False) -> tuple[Blob, str | None]:
    """The file's bytes, hashed with the hash the record names as they are read: read once into memory
    we own (not zero-filled first), or (``mapped``) mapped; a problem instead names the file.

    It is opened without following a symlink and without blocking on a FIFO, and only a regular file
    of the recorded size is read: the size comes from the opened file itself, not from a listing that
    could have changed since."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return NOTHING, f"{path.name} unreadable ({exc.strerror or exc})"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return NOTHING, f"{path.name} is not a regular file"
        if info.st_size != record.bytes:
            return NOTHING, f"{path.name} has {info.st_size} bytes, manifest says {record.bytes}"
        digest = hasher(record.algorithm)
        data, got = (_map_hashed(fd, record.bytes, digest) if mapped and record.bytes
                     else _read_hashed(fd, record.bytes, digest))
    except OSError as exc:
        return NOTHING, f"{path.name} unreadable ({exc.strerror or exc})"
    finally:
        os.close(fd)
    if got != record.bytes:
        count = "more" if got > record.bytes else got
        return NOTHING, f"{path.name} has {count} bytes, manifest says {record.bytes}"
    if digest.hexdigest() != record.digest:
        return NOTHING, f"{path.name} {record.algorithm} mismatch (content changed after the save)"
    return data, None


def _read_hashed(fd: int, size: int, digest: Hasher) -> tuple[Blob, int]:
    """``size`` bytes read from ``fd`` into a new buffer, each chunk hashed right after it is read; the
    count read, one more if the file holds more than ``size``."""
    data = np.empty(size, dtype=np.uint8)
    view, got = memoryview(data), 0
    with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
        while got < size:
            n = f.readinto(view[got:got + READ_CHUNK])
            if not n:
                return data, got
            digest.update(view[got:got + n])
            got += n
        return data, got + len(f.read(1))


def _map_hashed(fd: int, size: int, digest: Hasher) -> tuple[Blob, int]:
    """The first ``size`` bytes of ``fd`` (its size, checked on the open file) mapped copy-on-write, so
    that a write through a tensor never reaches the file, and hashed through the mapping.

    The tensors decoded from it read the file's pages, so they see the hashed bytes only while nobody
    writes the file. This code never writes a committed checkpoint's files (a save writes a new folder
    and renames it; deleting a mapped file leaves the mapping intact). Another process that truncates
    the file before ``load_state_dict`` has copied the tensors out kills the loading process with
    SIGBUS: a crash before any step, and a later resume finds the file's size wrong and quarantines
    the checkpoint. One that rewrites it in place with as many bytes in that window could change what
    is loaded, unnoticed unless the probe depends on it. Reading a page that fails (an I/O error) shows
    while the pages are brought in, before hashing (Linux ≥ 5.14; before, it kills the process too):
    the file is then read instead, and the error fails the checkpoint as a read's would."""
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:  # no memory left to commit, or a filesystem that cannot map: not the file's fault
        return _read_hashed(fd, size, digest)
    try:  # every page in at once (Linux ≥ 5.14; before, one fault at a time)
        mapping.madvise(MADV_POPULATE_READ)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a page that cannot be read (an I/O error): reading says which
            mapping.close()
            return _read_hashed(fd, size, digest)
    view = memoryview(mapping)
    for start in range(0, size, READ_CHUNK):
        digest.update(view[start:start + READ_CHUNK])
    view.release()
    return np.frombuffer(mapping, dtype=np.uint8), size


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
