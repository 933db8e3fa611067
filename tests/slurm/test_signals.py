"""The stop flag with real signals: handlers only record, DataLoader workers ignore them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import typing as tp

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from radiodiff_resume.slurm.environment import stop_verdict
from radiodiff_resume.slurm.signals import DEFAULT_SIGNALS, StopFlag, agreed_reason, signal_number


@pytest.fixture
def flag() -> tp.Iterator[StopFlag]:
    f = StopFlag()
    yield f
    f.uninstall()


def test_signal_names() -> None:
    assert signal_number("SIGUSR1") == signal_number("usr1") == signal_number(str(int(signal.SIGUSR1)))
    with pytest.raises(KeyError):
        signal_number("SIGNOPE")


@pytest.mark.parametrize("name", DEFAULT_SIGNALS)
def test_a_real_signal_only_sets_the_flag(flag: StopFlag, name: str) -> None:
    flag.install()
    os.kill(os.getpid(), signal_number(name))
    assert flag.reason == name
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.reason == name, "the first stop's reason is kept"
    assert flag.terminated, "a SIGTERM after it is noted: it may be a cancel"
    flag.clear()
    assert flag.reason is None and flag.terminated, "still known when the requeue is decided"


def test_without_a_sigterm_nothing_is_terminated(flag: StopFlag) -> None:
    flag.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.reason == "SIGUSR1" and not flag.terminated


def test_only_configured_signals_are_caught_and_uninstall_gives_them_back(flag: StopFlag) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    flag.install(["SIGUSR2"])
    assert signal.getsignal(signal.SIGUSR1) is before
    flag.install(["SIGUSR1"])  # a second install replaces the first set
    assert signal.getsignal(signal.SIGUSR2) is not flag._handle
    assert flag.signals == (int(signal.SIGUSR1),)
    flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


class SignalsItself(Dataset):
    """Each item sends SIGUSR1 to the worker process that loads it, then says how it is handled."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGUSR1)
        return torch.tensor([os.getpid(), int(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_ignore_the_stop_signals(flag: StopFlag, context: str) -> None:
    flag.install()
    loader = DataLoader(SignalsItself(), batch_size=2, num_workers=1, worker_init_fn=flag.worker_init_fn(),
                        multiprocessing_context=context)
    rows = torch.cat(list(loader))
    assert rows[:, 0].ne(os.getpid()).all(), "items were loaded in a worker"
    assert rows[:, 1].eq(1).all(), "the worker ignores SIGUSR1 (it survived sending it to itself)"
    assert flag.reason is None, "the trainer's flag is untouched by a signal its worker got"


def test_without_installed_signals_workers_keep_their_handlers(flag: StopFlag) -> None:
    assert flag.worker_init_fn() is None


def test_after_the_work_a_late_signal_is_ignored_not_fatal() -> None:
    """Python restores a Python-handled signal's default action (death, for USR1) during
    interpreter shutdown; after ``ignore()`` a signal then changes nothing (exit status 0)."""
    code = (
        "import os, signal, sys\n"
        "from radiodiff_resume.slurm.signals import STOP\n"
        "STOP.install()\n"
        "if sys.argv[1] == 'ignore':\n"
        "    STOP.ignore()\n"
        "class Late:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGUSR1)\n"
        "late = Late()\n"
    )
    ignored = subprocess.run([sys.executable, "-c", code, "ignore"], capture_output=True, text=True)
    assert ignored.returncode == 0, ignored.stderr
    handled = subprocess.run([sys.executable, "-c", code, "keep"], capture_output=True, text=True)
    assert handled.returncode == -signal.SIGUSR1, "without ignore() the late signal kills the exit"


@pytest.mark.parametrize(("reasons", "agreed"), [
    ([None, "SIGUSR2"], ("SIGUSR2", 1)),
    (["SIGUSR2", None], ("SIGUSR2", 0)),
    (["SIGUSR2", "SIGTERM"], ("SIGTERM", 1)),
    ([None, "SIGUSR1", "SIGUSR2"], ("SIGUSR1", 1)),
    (["SIGUSR2"], ("SIGUSR2", 0)),
])
def test_every_rank_acts_on_one_reason(reasons: list[str | None], agreed: tuple[str, int]) -> None:
    """Rank 0 decides the requeue: it must learn the signal another rank saw first (it was
    "another rank" before, and a 2-node job at its time limit was not requeued), and a cancel
    anywhere must not be undone by a requeue."""
    assert agreed_reason(reasons) == agreed


# What ``scontrol show job`` said inside real jobs on the local cluster (Slurm 22.05.8), at the moment
# the job's tasks got their signal.
RUNNING = {"JobState": "RUNNING", "Reason": "None", "Restarts": "0", "PreemptTime": "None"}
CANCELLED = {**RUNNING, "JobState": "COMPLETING"}  # scancel: at once, before any task has ended
TIMED_OUT = {**RUNNING, "JobState": "COMPLETING", "Reason": "TimeLimit"}
PREEMPTED = {**RUNNING, "PreemptTime": "2026-12-06T08:53:23"}  # GraceTime running: still RUNNING
REQUEUED_BY_SLURM = {**RUNNING, "JobState": "COMPLETING", "Restarts": "1"}  # grace time ran out


@pytest.mark.parametrize(("info", "terminated", "requeue", "cause"), [
    (RUNNING, False, True, "signal"),             # --signal ahead of the time limit, or scancel --signal=USR1
    (RUNNING, True, False, "cancel"),             # scancel --signal=TERM: nothing explains it
    (CANCELLED, False, False, "cancel"),          # USR1, then scancel before the requeue
    (CANCELLED, True, False, "cancel"),
    (TIMED_OUT, True, True, "time limit"),
    (PREEMPTED, True, True, "preemption"),        # Slurm would not requeue a job that ended in time
    ({**PREEMPTED, "JobState": "COMPLETING"}, True, False, "cancel"),  # scancel during the grace time
    (REQUEUED_BY_SLURM, True, False, "unknown"),  # requeueing again would fail or run it twice
    (None, False, True, "unknown"),               # no answer: the signal decides
    (None, True, False, "unknown"),
])
def test_the_controller_decides_whether_a_stopped_job_requeues(
    info: dict[str, str] | None, terminated: bool, requeue: bool, cause: str
) -> None:
    verdict = stop_verdict(info, terminated, restart_count=0)
    assert (verdict.requeue, verdict.cause) == (requeue, cause), verdict
