"""Durable file writes (write aside, fsync, rename into place, fsync the folder) and safe reads.

A reader never sees a half-written file under the final name, even after a crash. And a file a run
keeps in its results folder is only ever opened when it is a regular file: a symbolic link there
points at something that is not the run's (writing through it would change its target), a FIFO
blocks its reader forever, a device such as ``/dev/zero`` never ends.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    import torch

MAX_DOCUMENT_BYTES = 16 << 20
"""Most bytes read of a config or ledger (``config.yaml``, ``restarts.json``): hundreds of times what a
run writes there; a larger file is refused instead of being read into memory."""
MAX_LOG_BYTES = 256 << 20
"""Most bytes read of a log (``events.jsonl``, ``metrics.jsonl``): about a million records; a larger
file is refused instead of being read into memory."""
_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFSOCK: "a socket"}
_NOT_REGULAR_ERRNOS = {errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV}
"""What ``open`` says for a path that is not a regular file: a link under O_NOFOLLOW, a folder opened
for writing, a FIFO without a reader opened for writing without blocking, a device without a driver."""
ADVICE = "remove it (or put back the file the run wrote there) and run the command again"


class NotRegularFile(UserError):
    """A path where a run keeps one of its files holds a link, a FIFO, a device or a folder."""


def not_regular(path: Path, advice: str = ADVICE) -> NotRegularFile:
    """The one-line refusal for ``path``, saying what it is (and where a link points)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        kind = "not a regular file"
    else:
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        if stat.S_ISLNK(mode):
            try:
                kind += f" to {os.readlink(path)}"
            except OSError:
                pass
    return NotRegularFile(f"{path} is {kind}, not a regular file, so it is not opened: {advice}")


def is_regular_file(path: Path) -> bool:
    """True for a regular file, False when nothing is there; :class:`NotRegularFile` for anything else
    (never follows a link)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise not_regular(path)
    return True


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644, advice: str = ADVICE) -> int:
    """A descriptor of ``path`` only if it is a regular file (created as one when ``flags`` ask):
    never through a link, never blocking on a FIFO, never a device. :class:`NotRegularFile` for
    anything else; ``OSError`` for a missing file and the like."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _NOT_REGULAR_ERRNOS:
            raise not_regular(path, advice) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular(path, advice)
    return fd


def read_regular(path: Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), refused above ``limit``."""
    with os.fdopen(open_regular(path), "rb") as f:
        too_big = os.fstat(f.fileno()).st_size > limit
        data = b"" if too_big else f.read(limit + 1)  # a file still growing stops at the limit too
    if too_big or len(data) > limit:
        raise UserError(f"{path} holds more than {limit >> 20} MiB, more than a run writes there, so it is "
                        "not read: move it out of the way and run the command again")
    return data


_APPENDING = threading.Lock()
"""The training thread and a checkpoint writer thread both append to the event log: one line at a time."""


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (newline included) to the regular file ``path``, creating it if missing. After
    a torn last line (a process killed mid-write) it starts a new line, so only that line is lost."""
    with _APPENDING:
        _append(path, line)


def _append(path: Path, line: str) -> None:
    fd = open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        view = memoryview(("\n" if torn else "").encode() + line.encode("utf-8"))
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def json_objects(data: bytes) -> list[dict[str, tp.Any]]:
    """The JSON objects of ``data``, one a line (see :func:`json_lines`)."""
    return json_lines(data)[0]


def json_lines(data: bytes, parse_constant: tp.Callable[[str], tp.Any] | None = None,
               ) -> tuple[list[dict[str, tp.Any]], int]:
    """The JSON objects of ``data``, one a line, and how many lines were not one (the last line of a
    process killed mid-write, a torn write, nesting too deep to parse): skipped, never fatal.
    ``parse_constant`` reads ``NaN``/``Infinity`` tokens (json's default: as floats)."""
    found, bad = [], 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            value = json.loads(raw, parse_constant=parse_constant)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            found.append(value)
        else:
            bad += 1
    return found, bad


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


def fsync_together(paths: tp.Sequence[Path]) -> None:
    """fsync files and folders at the same time, one thread each: the filesystem commits fsyncs that
    wait together in one go, where one after the other each waits for a commit of its own."""
    with ThreadPoolExecutor(max_workers=len(paths) or 1) as pool:
        list(pool.map(_fsync_path, paths))


def _fsync_path(path: Path) -> None:
    """fsync one file or folder; a failure names it (a failed fsync does not say)."""
    if path.is_dir():
        fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
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
    """Save ``tensors`` as safetensors at ``path`` atomically (torch is imported here, not with this
    module, so that the readers above serve tools that never load it)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata=metadata)
    commit_file(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``, all or nothing: written to a fresh temporary file
    beside it (created exclusively, so never through a link or into a FIFO planted at its name: those
    are refused with :class:`NotRegularFile`), synced, then renamed over ``path`` (which replaces a
    link there instead of following it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if is_regular_file(tmp):
        os.unlink(tmp)  # left by a process of this pid that died mid-write
    fd = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    commit_file(tmp, path)
