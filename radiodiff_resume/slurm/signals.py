"""The process-wide stop flag, set by signals.

A handler that saves, logs or talks to other ranks can deadlock (it interrupts the main thread
anywhere, collectives included), so ours only records which signal came. The training loop
reads the flag at its next step boundary, the ranks agree, all of them save together, and the
command exits with the requeue status. The flag belongs to the process, not to one trainer: it
is installed when the command starts, so a signal during data preparation, the first stage,
between the stages, during validation or sampling is kept until the next boundary.
"""

from __future__ import annotations

import functools
import signal
import typing as tp

DEFAULT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")
"""Slurm sends USR1/USR2 ahead of a time limit or preemption (``--signal``; submitit uses USR2
because NCCL may use USR1) and SIGTERM at the limit itself, KillWait seconds before SIGKILL."""


def signal_number(name: str) -> int:
    """``SIGUSR1``, ``USR1`` or ``10`` → the signal's number (ValueError for anything else)."""
    text = name.strip().upper()
    if text.isdigit():
        return int(signal.Signals(int(text)))
    return int(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])


CANCEL = "SIGTERM"
"""What ``scancel`` sends: a stop that must not requeue the job."""


def agreed_reason(reasons: tp.Sequence[str | None]) -> tuple[str, int]:
    """The one stop reason every rank acts on, and the rank that saw it.

    A signal reaches the ranks at slightly different moments, so at the step boundary where they
    agree to stop, some have not seen it yet; without agreeing on the reason too, rank 0 — which
    decides whether the job is requeued — could know only that "another rank" asked. A cancel seen
    by any rank wins (requeueing would undo it); otherwise the lowest rank's reason.
    """
    seen = [(why, rank) for rank, why in enumerate(reasons) if why is not None]
    if not seen:
        return "requested", 0
    return next((s for s in seen if s[0] == CANCEL), seen[0])


class StopFlag:
    """Which stop was asked for first (a signal's name or a reason); None while running on."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.terminated = False
        """A SIGTERM came, whatever came first; :meth:`clear` keeps it: a TERM after the stop was
        agreed (a ``scancel`` during the save) must still end the job."""
        self._previous: dict[int, tp.Any] = {}

    def install(self, names: tp.Iterable[str] = DEFAULT_SIGNALS) -> None:
        """Catch ``names`` from now on (only the signals named; earlier ones are given back)."""
        self.uninstall()
        for number in sorted({signal_number(n) for n in names}):
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    @property
    def signals(self) -> tuple[int, ...]:
        return tuple(self._previous)

    def _handle(self, signum: int, frame: tp.Any) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask for a stop; the first reason is kept (the stop is the same), a SIGTERM is noted in
        :attr:`terminated` (whether it ends the job is decided before a requeue)."""
        self.terminated = self.terminated or reason == CANCEL
        if self.reason is None:
            self.reason = reason

    def clear(self) -> None:
        self.reason = None

    def ignore(self) -> None:
        """Once the work is over: ignore the stop signals. Python gives a signal with a Python
        handler back its default action while the interpreter shuts down, and the default
        action of USR1/USR2/TERM is to die — a late signal would turn a clean exit into 138."""
        for number in self._previous:
            signal.signal(number, signal.SIG_IGN)

    def worker_init_fn(self) -> tp.Callable[[int], None] | None:
        """For DataLoaders: workers ignore the stop signals (a signal sent to the whole process
        group must reach the trainer, not kill a worker or set a flag in a copy of it)."""
        return functools.partial(ignore_signals, self.signals) if self._previous else None


def ignore_signals(numbers: tp.Iterable[int], worker_id: int = 0) -> None:
    for number in numbers:
        signal.signal(number, signal.SIG_IGN)


STOP = StopFlag()
"""The flag of this process."""
