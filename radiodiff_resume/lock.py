"""One writer per results folder.

Two training jobs writing the same results folder (a SLURM requeue that overlaps the old
job, a double submit) would interleave checkpoints and corrupt the run, so a job takes
an exclusive lock on ``<results_folder>/.lock`` for its whole life.

Primary mechanism: ``flock`` on that file. The kernel (or the NFS lock manager) drops the
lock when the holder dies, however it dies, so a dead holder can never block a new job;
the JSON holder record inside the file only serves to name the holder in messages.

Fallback, for filesystems without ``flock`` (ENOLCK, ENOTSUP, EINVAL, ENOSYS): an
exclusively created file whose record is checked for staleness (dead pid on this host,
pid reused, host rebooted, or an earlier incarnation of our own SLURM job).

Only one process per job should take the lock (the main process): all ranks of one
SLURM job share its job id, and the fallback takes a record of our own job id written on
another host for "our own previous incarnation".

The lock file is only ever opened as a regular file (:func:`radiodiff_resume.io.open_regular`): a
symbolic link, FIFO, device or folder named ``.lock`` is refused with one line naming it, never
followed (the target would be truncated), never read (a FIFO would block). ``filelock`` is not used:
what it does differs between the versions torch accepts (3.x opens the lock file with O_TRUNC through
a link, and keeps no holder record), and the record naming the SLURM job, the takeover warning and the
no-flock rules (an earlier incarnation of the same job) would remain ours anyway.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from radiodiff_resume.errors import UserError
from radiodiff_resume.io import open_regular

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_NO_FLOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_SLURM_VARS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
}
_ADVICE = "or use another trainer.results_folder"
_NOT_REGULAR_ADVICE = ("a run keeps its lock there as a regular file: remove it and run the command again, "
                       + _ADVICE)
_RECORD_MAX = 1 << 16
# Lock files held by RunLock objects of this process: tells "another RunLock here holds it"
# apart from "a record this process left behind" under the fallback, where pids are equal.
_HELD_HERE: set[Path] = set()
_WARNED_NO_FLOCK: set[Path] = set()

Record = dict[str, str | int]


class LockHeld(UserError):
    """Another live job holds the results folder."""


class LockUnusable(LockHeld):
    """The results folder or its lock file cannot be used (not a folder, not a regular file, not
    writable); a :class:`LockHeld` so that every caller stops all ranks on it alike."""


class _NoFlock(Exception):
    """flock is not supported on this filesystem (carries the OSError)."""


# ---------------------------------------------------------------- who holds it


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat, None if unavailable.

    The command name (field 2) may contain spaces and parentheses, so split after the last ')'.
    """
    line = _read_first_line(f"/proc/{pid}/stat")
    if not line or ")" not in line:
        return None
    fields = line.rpartition(")")[2].split()
    try:
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime)
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    """Changes at every boot: a record from an earlier boot of this host is dead."""
    return _read_first_line("/proc/sys/kernel/random/boot_id") or None


def holder_record() -> Record:
    """Who we are, so a blocked job can name us (and a later one can tell we are gone)."""
    pid = os.getpid()
    rec: Record = {"host": socket.gethostname(), "pid": pid}
    stat = _proc_stat(pid)
    if stat is not None:
        rec["start_time"] = stat[1]
    boot = _boot_id()
    if boot:
        rec["boot_id"] = boot
    for key, var in _SLURM_VARS.items():
        value = os.environ.get(var)
        if value:
            rec[key] = value
    rec["cmdline"] = shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    rec["acquired"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return rec


def _parse_record(raw: bytes) -> Record | None:
    """The record in a lock file, None when empty or unreadable (e.g. a crash mid-write)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("host"), str) or not isinstance(
        rec.get("pid"), int
    ):
        return None
    return rec


def _same_holder(a: Record, b: Record) -> bool:
    return all(a.get(k) == b.get(k) for k in ("host", "pid", "start_time", "acquired"))


def _is_this_process(rec: Record, me: Record) -> bool:
    return all(rec.get(k) == me.get(k) for k in ("host", "pid", "start_time", "boot_id"))


def _describe(rec: Record) -> str:
    """'<host> pid <pid> (SLURM job <id>)' for messages."""
    text = f"{rec['host']} pid {rec['pid']}"
    job = rec.get("slurm_job_id")
    if job:
        extra = f"SLURM job {job}"
        if rec.get("slurm_array_job_id"):
            extra += f", array task {rec['slurm_array_job_id']}_{rec.get('slurm_array_task_id', '?')}"
        if rec.get("slurm_restart_count"):
            extra += f", restart {rec['slurm_restart_count']}"
        text += f" ({extra})"
    return text


def _cancel_hint(rec: Record) -> str:
    job = rec.get("slurm_job_id")
    kill = f"kill {rec['pid']} on {rec['host']}"
    return f"scancel {job} / {kill}" if job else kill


def _local_gone_reason(rec: Record, me: Record) -> str | None:
    """Why a holder on *this* host is certainly gone, or None if it may be alive.

    ``kill(pid, 0)`` alone is not enough: after a crash the pid may belong to another
    process, which the recorded /proc start time (and the boot id) tells apart.
    """
    if rec.get("boot_id") and me.get("boot_id") and rec["boot_id"] != me["boot_id"]:
        return "that host has rebooted since"
    pid = int(rec["pid"])
    ours = True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "that process is gone"
    except PermissionError:
        ours = False  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        # Our own process exited between kill() and the /proc read; another user's may just be
        # hidden (/proc mounted with hidepid), and without /proc kill() is all we know.
        return "that process is gone" if ours and Path("/proc/self/stat").exists() else None
    state, start = stat
    if state in ("Z", "X"):
        return "that process is gone"
    if "start_time" in rec and rec["start_time"] != start:
        return "that pid now belongs to another process"
    return None


def _takeover_note(rec: Record | None, reason: str) -> str:
    if rec is None:
        return f"an unreadable lock record was replaced ({reason})"
    return f"took over the lock of {_describe(rec)}, acquired {rec.get('acquired', '?')}: {reason}"


# ---------------------------------------------------------------- messages


def _held_message(path: Path, rec: Record | None, *, dead_pid: bool = False) -> str:
    if rec is None:
        return (
            f"The results folder {path.parent} is in use: another process holds the lock {path} "
            f"but its holder record could not be read. Find it with `fuser -v {path}` on the hosts "
            f"that use this folder and wait for it to finish or stop it, {_ADVICE}."
        )
    msg = (
        f"The results folder {path.parent} is in use: the lock {path} is held by {_describe(rec)} "
        f"since {rec.get('acquired', '?')}."
    )
    if dead_pid:
        msg += (
            f" That pid has exited but a process it forked (e.g. a data-loader worker) still has the "
            f"lock file open: find it with `fuser -v {path}` on {rec['host']} and stop it, {_ADVICE}."
        )
    else:
        msg += (
            f" Wait for that job to finish or cancel it ({_cancel_hint(rec)}), {_ADVICE}."
        )
    return msg


def _fallback_held_message(path: Path, rec: Record | None) -> str:
    note = (
        "This filesystem does not support flock, so the lock is a plain file that cannot be "
        "checked across hosts"
    )
    if rec is None:
        return (
            f"The results folder {path.parent} may be in use: the lock {path} holds an unreadable "
            f"holder record (a job may have crashed while writing it). {note}: if no other job uses "
            f"this folder, delete {path} by hand and start again, {_ADVICE}."
        )
    return (
        f"{_held_message(path, rec)} {note}: if that job is certainly gone, delete {path} by hand "
        "and start again."
    )


# ---------------------------------------------------------------- the lock


def _encode(rec: Record) -> bytes:
    return (json.dumps(rec, sort_keys=True) + "\n").encode("utf-8")


class RunLock:
    """Exclusive lock on one results folder, held for the life of a job."""

    def __init__(self, folder: Path) -> None:
        self.path: Path = Path(folder) / LOCK_NAME
        self._fd: int | None = None  # open while held with flock
        self._record: Record | None = None  # our record while held
        self._owner_pid: int | None = None  # a forked child must not release the parent's lock
        self._fallback = False
        self._key: Path | None = None  # entry in _HELD_HERE while held

    @property
    def held(self) -> bool:
        return self._record is not None

    def live_holder(self) -> str | None:
        """Who holds the lock now ('<host> pid <pid> ...'), or None; takes nothing and writes nothing
        (a shared ``flock`` probe on a read-only descriptor; None where the filesystem has no flock)."""
        try:
            fd = self._open(os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            rec = _parse_record(os.pread(fd, _RECORD_MAX, 0))
            return _describe(rec) if rec is not None else "a process that has not written its record yet"
        except OSError:
            return None
        finally:
            os.close(fd)  # also drops the shared probe lock
        return None

    def acquire(self) -> str | None:
        """Take the lock; create the folder if needed.

        Returns a one-line note when a stale lock of a dead holder was taken over (the caller
        logs it), None otherwise. Raises LockHeld when a live job holds it.
        """
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LockUnusable(self._unusable_folder(exc)) from None
        key = self.path.resolve()
        if key in _HELD_HERE:  # cheap and exact; flock would say the same, the fallback could not
            raise LockHeld(_held_message(self.path, self._read_record_file()))
        try:
            note = self._acquire_flock()
        except _NoFlock as exc:
            self._warn_no_flock(exc.args[0])
            note = self._acquire_fallback()
        _HELD_HERE.add(key)
        self._key, self._owner_pid = key, os.getpid()
        return note

    def release(self) -> None:
        """Give the lock up; idempotent. Removes nothing but our own holder record."""
        if not self.held:
            return
        try:
            if os.getpid() != self._owner_pid:
                self._close_fd()  # forked child: the parent still holds the lock
            elif self._fallback:
                self._release_fallback()
            else:
                self._release_flock()
        finally:
            if os.getpid() == self._owner_pid and self._key is not None:
                _HELD_HERE.discard(self._key)
            self._record = self._owner_pid = self._key = None

    def __enter__(self) -> RunLock:
        note = self.acquire()
        if note:
            log.warning(note)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------ flock

    def _acquire_flock(self) -> str | None:
        """flock the lock file; a record left in it belongs to a holder the kernel saw die."""
        fd = self._open_locked()
        try:
            old_raw = os.pread(fd, _RECORD_MAX, 0)
            old = _parse_record(old_raw)
            me = holder_record()
            note = self._flock_takeover_note(old, old_raw, me)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _encode(me), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._record, self._fallback = fd, me, False
        return note

    def _open_locked(self) -> int:
        """Open and flock the lock file, retrying if it was replaced between open and flock.

        We never unlink it under flock, but a user might: then we would lock an orphan inode.
        """
        for _ in range(10):
            fd, created = self._open_file()
            if fd < 0:
                continue
            try:
                self._flock_or_raise(fd)
                if self._same_inode(fd):
                    return fd
            except _NoFlock:
                self._discard_created(fd, created)
                raise
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise LockHeld(f"The lock file {self.path} keeps being replaced while locking it; {_ADVICE}.")

    def _open_file(self) -> tuple[int, bool]:
        """(fd, whether we created the file); fd -1 if it vanished between the two opens."""
        try:
            return self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            pass
        except OSError as exc:
            raise LockUnusable(self._unusable_folder(exc)) from None
        try:
            return self._open(os.O_RDWR), False
        except FileNotFoundError:
            return -1, False
        except OSError as exc:
            raise LockUnusable(self._unusable_folder(exc)) from None

    def _open(self, flags: int) -> int:
        """The lock file, opened only as a regular file (:class:`LockUnusable` otherwise)."""
        try:
            return open_regular(self.path, flags, advice=_NOT_REGULAR_ADVICE)
        except UserError as exc:
            raise LockUnusable(str(exc)) from None

    def _unusable_folder(self, exc: OSError) -> str:
        """One line for a results folder that cannot hold the lock (a file, under /proc, read-only)."""
        folder = self.path.parent
        why = exc.strerror or str(exc)
        if isinstance(exc, FileExistsError):
            why = "it exists and is not a folder"
        if exc.filename and str(exc.filename) != str(folder):
            why += f" ({exc.filename})"
        return (f"The results folder {folder} cannot be used: {why}; point trainer.results_folder at a "
                "folder this job can create and write.")

    def _discard_created(self, fd: int, created: bool) -> None:
        """Remove the empty file our flock attempt created, so the fallback starts from scratch."""
        try:
            if created and self._same_inode(fd) and os.fstat(fd).st_size == 0:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _flock_or_raise(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            rec, dead = self._read_held_record(fd)
            raise LockHeld(_held_message(self.path, rec, dead_pid=dead)) from None
        except OSError as exc:
            if exc.errno in _NO_FLOCK_ERRNOS:
                raise _NoFlock(exc) from exc
            raise

    def _same_inode(self, fd: int) -> bool:
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return False
        fst = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

    @staticmethod
    def _read_held_record(fd: int) -> tuple[Record | None, bool]:
        """The flock holder's record, and whether it names a process of this host that is gone.

        A holder that has just taken the flock may not have replaced the previous (empty or
        dead) record yet, so give it a moment before reporting such a record.
        """
        me = holder_record()
        rec, dead = None, False
        for _ in range(10):
            rec = _parse_record(os.pread(fd, _RECORD_MAX, 0))
            dead = rec is not None and rec["host"] == me["host"] and _local_gone_reason(rec, me) is not None
            if rec is not None and not dead:
                break
            time.sleep(0.02)
        return rec, dead

    def _flock_takeover_note(self, old: Record | None, old_raw: bytes, me: Record) -> str | None:
        if old is None:
            return _takeover_note(None, "its writer is gone") if old_raw.strip() else None
        if _is_this_process(old, me):
            return _takeover_note(old, "left behind by this process")
        if old.get("host") == me["host"] and _local_gone_reason(old, me) is None:
            # Alive, yet we got its flock: flock is not effective here. Refuse rather than share.
            raise LockHeld(
                _held_message(self.path, old) + " (Its flock did not exclude us: flock on this "
                "filesystem looks ineffective.)"
            )
        return _takeover_note(old, "that process is gone")

    def _release_flock(self) -> None:
        """Empty the file, then close (dropping the flock); never unlink.

        Unlinking would race with a job that has already opened the old inode and is waiting
        to lock it: it would then lock a file nobody else can see.
        """
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    # ------------------------------------------------------------ fallback (no flock)

    def _warn_no_flock(self, exc: OSError) -> None:
        folder = self.path.parent.resolve()
        if folder not in _WARNED_NO_FLOCK:
            _WARNED_NO_FLOCK.add(folder)
            log.warning(
                "flock is not supported in %s (%s); using an exclusive lock file instead, which "
                "cannot detect a dead holder on another host", folder, exc.strerror or exc,
            )

    def _acquire_fallback(self) -> str | None:
        """Exclusive-create the lock file; replace it only when its holder is provably gone."""
        me = holder_record()
        for _ in range(10):
            if self._create_exclusive(me):
                self._confirm(me)
                return None
            raw = self._read_settled()
            if raw is None:
                continue  # released meanwhile: try to create it again
            old = _parse_record(raw)
            # An empty file holds no one: a flock attempt that died before removing it.
            reason = self._fallback_stale_reason(old, me) if raw.strip() else ""
            if reason is None:
                raise LockHeld(_fallback_held_message(self.path, old))
            self._write_atomic(me)
            self._confirm(me)
            return _takeover_note(old, reason) if reason else None
        raise LockHeld(f"The lock file {self.path} keeps appearing and disappearing; {_ADVICE}.")

    def _read_settled(self) -> bytes | None:
        """The lock file's bytes, giving an empty file (being created, or a flock attempt about
        to remove it) a moment to fill or vanish; None if it does not exist."""
        raw = self._read_raw()
        for _ in range(15):
            if raw is None or raw.strip():
                break
            time.sleep(0.02)
            raw = self._read_raw()
        return raw

    def _confirm(self, me: Record) -> None:
        """Check the file carries our record: another job may have replaced it in the same instant."""
        if not self._record_is(me):
            raise LockHeld(_fallback_held_message(self.path, self._read_record_file()))
        self._record, self._fallback = me, True

    def _fallback_stale_reason(self, old: Record | None, me: Record) -> str | None:
        """Why the recorded holder is certainly gone, or None when it may still be running."""
        if old is None:
            return None  # cannot prove anything about a garbled record
        if _is_this_process(old, me):
            return "left behind by this process"  # _HELD_HERE ruled out a live RunLock here
        if old.get("host") == me["host"]:
            # Checked before the job id: an old incarnation still alive here must not be shared.
            return _local_gone_reason(old, me)
        if old.get("slurm_job_id") and old.get("slurm_job_id") == me.get("slurm_job_id"):
            return "it was an earlier incarnation of this SLURM job (requeued)"
        return None

    def _tmp_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.tmp-{socket.gethostname()}-{os.getpid()}")

    def _write_tmp(self, rec: Record) -> Path:
        tmp = self._tmp_path()
        with open(tmp, "wb") as f:
            f.write(_encode(rec))
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create_exclusive(self, rec: Record) -> bool:
        """Create the lock file with our record in one step; False if it exists.

        A hard link of a complete temp file is atomic even on old NFS and never exposes an
        empty record; where hard links are refused, O_EXCL creation is the next best thing.
        """
        tmp = self._write_tmp(rec)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            return self._create_excl_open(rec)
        finally:
            tmp.unlink(missing_ok=True)

    def _create_excl_open(self, rec: Record) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, _encode(rec))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _write_atomic(self, rec: Record) -> None:
        os.replace(self._write_tmp(rec), self.path)

    def _read_raw(self) -> bytes | None:
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return os.pread(fd, _RECORD_MAX, 0)
        finally:
            os.close(fd)

    def _read_record_file(self) -> Record | None:
        raw = self._read_raw()
        return None if raw is None else _parse_record(raw)

    def _record_is(self, rec: Record) -> bool:
        current = self._read_record_file()
        return current is not None and _same_holder(current, rec)

    def _release_fallback(self) -> None:
        """Unlink the lock file only if it still carries our record (never someone else's)."""
        if self._record is not None and self._record_is(self._record):
            self.path.unlink(missing_ok=True)
