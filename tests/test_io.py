"""The files a run keeps beside its checkpoints (``events.jsonl``, ``metrics.jsonl``, ``restarts.json``) are
opened only as regular files, and a bad line in them is skipped, never fatal: real files, links, FIFOs and
``/dev/zero``. What could block runs in a subprocess under a timeout and a memory limit."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate import Accelerator

from radiodiff_resume.checkpoint.restarts import RestartLedger
from radiodiff_resume.errors import UserError
from radiodiff_resume.events import EventLog
from radiodiff_resume.tools.report_data import read_jsonl
from radiodiff_resume.trainer.runlog import RunLog

REPO = Path(__file__).resolve().parents[1]
DEEP = b"[" * 100_000 + b"]" * 100_000
"""One JSON value nested deeper than a recursive parser can go."""
RECORD = {"time": 1.5, "event": "checkpoint_saved", "step": 2}
LOG_LIMIT = 256 << 20
"""The documented most a log is read of (``radiodiff_resume.io.MAX_LOG_BYTES``)."""


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # reading /dev/zero fails, not the machine


def in_subprocess(code: str, *args: str) -> str:
    """stdout of ``code`` run by a fresh interpreter; raises TimeoutExpired when it blocks."""
    proc = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=30, preexec_fn=limited)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def hostile(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


TRY = """
import sys
from pathlib import Path
from radiodiff_resume.errors import UserError
from radiodiff_resume.checkpoint.restarts import RestartLedger
from radiodiff_resume.events import EventLog
action = {"counts": lambda: RestartLedger(Path(sys.argv[1]).parent).counts(),
           "clear": lambda: RestartLedger(Path(sys.argv[1]).parent).clear(),
           "emit": lambda: EventLog(Path(sys.argv[1]), True).emit("saved", step=1)}[sys.argv[2]]
try:
    print("returned", action())
except UserError as exc:
    print("refused", exc)
"""


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
@pytest.mark.parametrize(("name", "action"), [("restarts.json", "counts"), ("restarts.json", "clear"),
                                               ("events.jsonl", "emit")])
def test_a_link_fifo_or_folder_in_place_of_a_run_file_is_refused_in_one_line(
    tmp_path: Path, kind: str, name: str, action: str
) -> None:
    path = tmp_path / name
    hostile(path, kind)
    out = in_subprocess(TRY, str(path), action)
    assert out.startswith(f"refused {path} is a"), out
    assert "not a regular file" in out and len(out.strip().splitlines()) == 1, out
    assert path.is_symlink() if kind == "dev-zero" else path.exists()


def test_the_crash_loop_ledger_nested_too_deep_or_with_bad_counts_is_no_evidence(tmp_path: Path) -> None:
    ledger = RestartLedger(tmp_path)
    ledger.path.write_bytes(DEEP)
    assert ledger.counts() == {}
    ledger.path.write_text(json.dumps({"step-00000002": 2, "step-00000004": "x", "a": None, "b": True}))
    assert ledger.counts() == {"step-00000002": 2}
    assert ledger.started("step-00000002") == 3


def test_events_are_never_appended_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("not the run's\n")
    (tmp_path / "events.jsonl").symlink_to(target)
    with pytest.raises(UserError, match=r"events.jsonl is a symbolic link to .*elsewhere.txt, not a regular"):
        EventLog(tmp_path / "events.jsonl", True).emit("saved", step=1)
    assert target.read_text() == "not the run's\n"


def test_a_torn_or_too_deep_line_is_skipped_and_the_next_record_survives(tmp_path: Path) -> None:
    """A process killed mid-write leaves a line without its end; the next record starts a line of its own."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(json.dumps(RECORD).encode() + b"\n" + DEEP + b"\n" + b'{"time": 2, "event": "sav')
    log = EventLog(path, True)
    log.emit("resumed", step=2)
    assert [r["event"] for r in log.read()] == ["checkpoint_saved", "resumed"]


def test_metrics_records_skip_torn_and_too_deep_lines(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_bytes(b'{"stage": "ldm", "step": 2, "loss": 0.5}\n' + DEEP + b"\n"
                                             + b'{"stage": "ldm", "st')
    log = RunLog(tmp_path, Accelerator(), "ldm", enabled=True)
    log.write(4, {"loss": 0.25})
    assert [(r["step"], r["loss"]) for r in log.records()] == [(2, 0.5), (4, 0.25)]
    log.plot(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_report_counts_a_line_nested_too_deep_as_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(json.dumps(RECORD).encode() + b"\n" + DEEP + b"\n")
    lines = read_jsonl(path)
    assert (lines.records, lines.unreadable) == ([RECORD], 1)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_report_refuses_a_log_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "events.jsonl"
    hostile(path, kind)
    with pytest.raises(UserError, match=r"events.jsonl is a .*, not a regular file, so it is not opened"):
        read_jsonl(path)


def test_report_refuses_a_log_beyond_the_read_limit_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with path.open("wb") as f:
        f.truncate(LOG_LIMIT + 1)  # sparse: no disk space, 256 MiB of zeros to a reader
    with pytest.raises(UserError, match=r"metrics.jsonl holds more than 256 MiB"):
        read_jsonl(path)
