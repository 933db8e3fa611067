"""One writer per results folder: real processes contend for ``RunLock``; the no-flock
fallback is exercised by making ``flock`` report ENOLCK, as such filesystems do."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from radiodiff_resume import lock as lock_mod
from radiodiff_resume.errors import UserError
from radiodiff_resume.lock import LockHeld, RunLock, holder_record

REPO = Path(__file__).resolve().parents[1]

TRY_ACQUIRE = """
import sys
from pathlib import Path
from radiodiff_resume.lock import LockHeld, RunLock
lk = RunLock(Path(sys.argv[1]))
try:
    note = lk.acquire()
except LockHeld as exc:
    print(exc)
    sys.exit(3)
lk.release()
print("acquired", note)
"""

HOLD = """
import sys, time
from pathlib import Path
from radiodiff_resume.lock import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""

PRINT_RECORD_AND_SLEEP = """
import json, time
from radiodiff_resume.lock import holder_record
print(json.dumps(holder_record()), flush=True)
time.sleep(60)
"""


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], env=child_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=child_env(), text=True, capture_output=True, timeout=30
    )


def wait_for_record_pid(path: Path, pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("}\n") and json.loads(text).get("pid") == pid:  # a complete record only
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never named pid {pid}")


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture()
def sleeper_record() -> Iterator[tuple[dict[str, str | int], subprocess.Popen[str]]]:
    """The holder record of a live child process (which sleeps until the test ends)."""
    proc = python(PRINT_RECORD_AND_SLEEP)
    assert proc.stdout is not None
    rec = json.loads(proc.stdout.readline())
    yield rec, proc
    proc.kill()
    proc.wait()


@pytest.fixture()
def no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for a filesystem without flock (cannot be mounted in a test)."""

    def refuse(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_mod.fcntl, "flock", refuse)


def write_record(folder: Path, rec: dict[str, str | int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps(rec))


# ---------------------------------------------------------------- flock


def test_second_process_is_refused_with_our_pid_and_host(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run") as lk:
        assert lk.path == tmp_path / "run" / ".lock"
        proc = run_python(TRY_ACQUIRE, str(tmp_path / "run"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    msg = proc.stdout.strip()
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert str(tmp_path / "run" / ".lock") in msg


def test_the_kernel_lock_is_exclusive_while_held_and_free_after_release(tmp_path: Path) -> None:
    lk = RunLock(tmp_path)
    lk.acquire()
    fd = os.open(lk.path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        lk.release()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_sigkilled_holder_is_taken_over_with_a_note(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    proc = python(HOLD, str(folder))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        wait_for_record_pid(folder / ".lock", proc.pid)
        with pytest.raises(LockHeld):  # really held while it lives
            RunLock(folder).acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    lk = RunLock(folder)
    note = lk.acquire()
    try:
        assert note is not None and f"pid {proc.pid}" in note and "gone" in note
        assert json.loads(lk.path.read_text())["pid"] == os.getpid()
    finally:
        lk.release()


def test_release_then_reacquire_has_no_note(tmp_path: Path) -> None:
    lk = RunLock(tmp_path)
    assert lk.acquire() is None
    lk.release()
    lk.release()  # idempotent
    assert lk.path.exists() and lk.path.read_text() == ""  # emptied, never unlinked under flock
    assert run_python(TRY_ACQUIRE, str(tmp_path)).stdout.strip() == "acquired None"
    assert RunLock(tmp_path).acquire() is None


def test_two_locks_in_one_process_conflict(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    with RunLock(tmp_path):
        pass


def test_garbled_record_under_flock_is_replaced(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text('{"host": "x", "pi')
    lk = RunLock(tmp_path)
    note = lk.acquire()
    assert note is not None and "unreadable lock record was replaced" in note
    assert json.loads(lk.path.read_text())["pid"] == os.getpid()
    lk.release()


def test_context_manager_logs_the_takeover(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rec = holder_record() | {"pid": dead_pid(), "slurm_job_id": "4242"}
    write_record(tmp_path, rec)
    with RunLock(tmp_path):
        pass
    assert f"took over the lock of {rec['host']} pid {rec['pid']} (SLURM job 4242)" in caplog.text


def test_lock_held_message_is_one_paragraph_with_advice(tmp_path: Path) -> None:
    assert issubclass(LockHeld, UserError)
    with RunLock(tmp_path) as lk, pytest.raises(LockHeld) as info:
        RunLock(tmp_path).acquire()
    msg = str(info.value)
    assert "\n" not in msg
    assert str(lk.path) in msg
    assert "wait for that job to finish or cancel it" in msg.lower()
    assert "use another trainer.results_folder" in msg


def test_holder_record_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    rec = holder_record()
    assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
    assert (rec["slurm_job_id"], rec["slurm_array_job_id"], rec["slurm_array_task_id"]) == ("77", "70", "7")
    assert rec["slurm_restart_count"] == "2"
    assert isinstance(rec["cmdline"], str) and str(rec["acquired"]).endswith("+00:00")
    if Path("/proc/self/stat").exists():
        assert isinstance(rec["start_time"], int)


# ---------------------------------------------------------------- what is not a lock file

PROBE = """
import sys
from pathlib import Path
from radiodiff_resume.lock import LockHeld, RunLock
lk = RunLock(Path(sys.argv[1]))
for name, call in (("live_holder", lk.live_holder), ("acquire", lk.acquire)):
    try:
        print(name, "returned", call())
    except LockHeld as exc:
        print(name, "refused", exc)
    except OSError as exc:
        print(name, "crashed", exc)
"""


def test_a_symlinked_lock_is_refused_in_one_line_and_its_target_left_whole(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("not a lock\n")
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / ".lock"
    lock.symlink_to(target)
    for call in (RunLock(lock.parent).acquire, RunLock(lock.parent).live_holder):
        with pytest.raises(LockHeld) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"{lock} is a symbolic link to {target}, not a regular file"), msg
        assert "\n" not in msg and "remove it" in msg
    assert target.read_text() == "not a lock\n" and lock.is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_lock_that_is_a_fifo_or_folder_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    """In a child under a timeout: opening a FIFO to read blocks until a writer comes, which none does."""
    lock = tmp_path / ".lock"
    if kind == "fifo":
        os.mkfifo(lock)
    else:
        lock.mkdir()
    proc = run_python(PROBE, str(tmp_path))
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr
    for name, line in zip(("live_holder", "acquire"), lines, strict=True):
        assert line.startswith(f"{name} refused {lock} is a {'FIFO' if kind == 'fifo' else 'folder'}, not a "
                               "regular file"), line


def test_a_results_folder_that_cannot_be_a_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    cases = ((file, "it exists and is not a folder"), (file / "sub", "Not a directory"),
             (Path("/proc/radiodiff-lock-test"), "No such file or directory"))
    for folder, why in cases:
        with pytest.raises(LockHeld) as info:
            RunLock(folder).acquire()
        msg = str(info.value)
        assert msg.startswith(f"The results folder {folder} cannot be used: {why}"), msg
        assert "\n" not in msg and "point trainer.results_folder at a folder" in msg
    assert file.read_text() == "x"


# ---------------------------------------------------------------- no-flock fallback


def test_fallback_live_holder_on_this_host_is_held(
    tmp_path: Path, no_flock: None, sleeper_record: tuple[dict[str, str | int], subprocess.Popen[str]]
) -> None:
    rec, proc = sleeper_record
    write_record(tmp_path, rec)
    with pytest.raises(LockHeld) as info:
        RunLock(tmp_path).acquire()
    msg = str(info.value)
    assert f"pid {proc.pid}" in msg and "does not support flock" in msg and "delete" in msg
    assert "\n" not in msg
    assert json.loads((tmp_path / ".lock").read_text()) == rec  # untouched


def test_fallback_reused_pid_is_stale(
    tmp_path: Path, no_flock: None, sleeper_record: tuple[dict[str, str | int], subprocess.Popen[str]]
) -> None:
    rec, proc = sleeper_record
    if "start_time" not in rec:
        pytest.skip("no /proc start times on this platform")
    write_record(tmp_path, rec | {"start_time": int(rec["start_time"]) + 1})
    lk = RunLock(tmp_path)
    note = lk.acquire()
    lk.release()
    assert note is not None and f"pid {proc.pid}" in note and "another process" in note


def test_fallback_dead_pid_is_taken_over_and_released(tmp_path: Path, no_flock: None) -> None:
    pid = dead_pid()
    write_record(tmp_path, holder_record() | {"pid": pid})
    lk = RunLock(tmp_path)
    note = lk.acquire()
    assert note is not None and f"pid {pid}" in note and "gone" in note
    assert json.loads(lk.path.read_text())["pid"] == os.getpid()
    with pytest.raises(LockHeld):  # same process, second RunLock
        RunLock(tmp_path).acquire()
    lk.release()
    assert not lk.path.exists()  # ours: removed
    with RunLock(tmp_path) as again:
        assert again.path.exists()


def test_fallback_same_slurm_job_on_other_host_is_our_previous_incarnation(
    tmp_path: Path, no_flock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    write_record(tmp_path, {"host": "other-node-17", "pid": 999, "slurm_job_id": "123456",
                            "acquired": "2024-01-01T00:00:00+00:00"})
    lk = RunLock(tmp_path)
    note = lk.acquire()
    lk.release()
    assert note is not None and "other-node-17 pid 999 (SLURM job 123456)" in note
    assert "earlier incarnation" in note


def test_fallback_other_host_other_job_is_held(
    tmp_path: Path, no_flock: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    write_record(tmp_path, {"host": "other-node-17", "pid": 999, "slurm_job_id": "654321",
                            "acquired": "2024-01-01T00:00:00+00:00"})
    with pytest.raises(LockHeld, match="scancel 654321 / kill 999"):
        RunLock(tmp_path).acquire()


def test_fallback_garbled_record_is_held_not_guessed(tmp_path: Path, no_flock: None) -> None:
    (tmp_path / ".lock").write_text("{not json")
    with pytest.raises(LockHeld, match="unreadable") as info:
        RunLock(tmp_path).acquire()
    assert f"delete {tmp_path / '.lock'}" in str(info.value)


def test_fallback_release_keeps_a_record_that_is_not_ours(tmp_path: Path, no_flock: None) -> None:
    lk = RunLock(tmp_path)
    assert lk.acquire() is None
    other = {"host": "other-node", "pid": 5, "acquired": "2024-01-01T00:00:00+00:00"}
    write_record(tmp_path, other)  # e.g. the file was deleted by hand and another job took it
    lk.release()
    assert json.loads(lk.path.read_text()) == other


def test_fallback_empty_file_holds_no_one(tmp_path: Path, no_flock: None) -> None:
    (tmp_path / ".lock").write_text("")  # e.g. a flock attempt killed before removing its file
    lk = RunLock(tmp_path)
    assert lk.acquire() is None
    assert json.loads(lk.path.read_text())["pid"] == os.getpid()
    lk.release()
