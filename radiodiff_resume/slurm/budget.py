"""Whether a stop fits the time that is left: the rest of a step, a validation when one is due, one save.

Two sides. The signal's lead (``slurm.signal_lead_s``) is checked against the measured step and save
times once, when the first checkpoint of the process has been written. The job's clock stops the run
by itself (``slurm.stop_margin_s``): the job's end time is asked from the controller when training
starts and again at each save (never per step), and at each step the loop asks :meth:`StopBudget.
out_of_time` — host arithmetic only — whether one more step, a validation when one is due and a save
would still end ``stop_margin_s`` before it. A signal that comes early, late or never (a job submitted
without ``--signal``) cannot then cost the checkpoint.

Times are measured on the host clock (no device sync: the guarded step already waits for the device
once).
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import shutil
import statistics
import subprocess
import time
import typing as tp

logger = logging.getLogger(__name__)

CLOCK = "clock"
"""The stop reason of a clock-based stop: the job's time limit is near (it requeues like ``--signal``'s
USR1 ahead of a time limit)."""
RECENT_STEPS = 20
"""A step's time for the clock is the slowest of this many recent steps."""


def parse_end_time(text: str) -> float | None:
    """``squeue -o %e`` / ``scontrol show job`` EndTime (``2026-12-06T09:52:01``, the controller's local
    time as the client prints it) → seconds since the epoch; None for ``Unknown``, ``N/A``, ``NONE``."""
    value = text.strip()
    try:
        moment = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return moment.timestamp()  # naive: local time, as squeue prints it


def end_time_from_env(env: tp.Mapping[str, str]) -> float | None:
    """``SLURM_JOB_END_TIME`` (seconds since the epoch; set by newer Slurm versions), None if unset."""
    value = env.get("SLURM_JOB_END_TIME", "").strip()
    return float(value) if value.isdigit() and int(value) > 0 else None


def job_end_time(job: str, env: tp.Mapping[str, str] | None = None) -> float | None:
    """When this job's time limit ends (seconds since the epoch): ``SLURM_JOB_END_TIME`` where set, else
    the controller's answer (``squeue -h -j JOB -o %e``, which follows ``scontrol update TimeLimit``);
    None when neither knows (no time limit, no squeue)."""
    env = os.environ if env is None else env
    known = end_time_from_env(env)
    if known is not None:
        return known
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_end_time(out.stdout) if out.returncode == 0 else None


class StopBudget:
    """Step, save and validation times of this process, against ``slurm.signal_lead_s`` and the job's
    end time (``slurm.stop_margin_s``)."""

    def __init__(self, stage: str, lead_s: float | None, under_slurm: bool,
                 margin_s: float | None = None) -> None:
        self.stage, self.lead_s, self.under_slurm = stage, lead_s, under_slurm
        self.margin_s = margin_s
        """Seconds kept spare before the end time; None: no clock-based stop."""
        self.steps: list[float] = []
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self.save_s = 0.0
        self.validation_s = 0.0
        self.deadline: float | None = None
        """The end time on this process's monotonic clock (None: unknown, no clock-based stop)."""
        self.reported = False

    # ----- measurements --------------------------------------------------------------
    def step(self, seconds: float) -> None:
        if len(self.steps) < 50:
            self.steps.append(seconds)
        self.recent.append(seconds)

    def validated(self, seconds: float) -> None:
        self.validation_s = seconds

    def saved(self, seconds: float) -> str | None:
        """After a save: the one report (logged; a warning when the lead is too short)."""
        self.save_s = seconds
        if self.reported or not self.steps:
            return None
        self.reported = True
        step = statistics.median(self.steps[1:] or self.steps)  # the first step warms up
        need = step + seconds
        text = (f"{self.stage}: a step takes {step:.2f} s and a checkpoint {seconds:.2f} s, so a stop "
                f"signal needs {need:.0f} s of lead")
        if self.validation_s:
            text += f" ({self.validation_s:.0f} s more at a validation step, which a stop skips)"
        if self.lead_s is None:
            logger.info("%s", text)
        elif self.lead_s < need:
            text += (f", more than slurm.signal_lead_s={self.lead_s:g}: a time limit may kill the job "
                     "before its checkpoint is committed, unless the clock-based stop "
                     "(slurm.stop_margin_s) ends it in time; raise slurm.signal_lead_s "
                     "(sbatch --signal=...@LEAD)")
            (logger.warning if self.under_slurm else logger.info)("%s", text)
        else:
            logger.info("%s (slurm.signal_lead_s=%g covers it)", text, self.lead_s)
        return text

    # ----- the clock -------------------------------------------------------------------
    def time_left(self, seconds: float | None) -> None:
        """The job ends ``seconds`` from now (None: unknown); every rank is given the same number."""
        self.deadline = None if seconds is None or self.margin_s is None else time.monotonic() + seconds

    def need_s(self, validation_due: bool) -> float:
        """Seconds one more step, the validation (``validation_due``), a save and the margin take."""
        step = max(self.recent, default=0.0)
        return (self.margin_s or 0.0) + step + self.save_s + (self.validation_s if validation_due else 0.0)

    def out_of_time(self, validation_due: bool = False) -> bool:
        """Whether the job must stop now to commit its checkpoint before its end time (host only)."""
        return self.deadline is not None and time.monotonic() + self.need_s(validation_due) >= self.deadline


class _Broadcasts(tp.Protocol):
    is_main: bool

    def broadcast(self, obj: tp.Any) -> tp.Any: ...


def ask_time_left(ranks: _Broadcasts, budget: StopBudget) -> float | None:
    """Seconds until this job's end time, the same on every rank: rank 0 asks the controller, the
    others get its answer (one small CPU broadcast), so no rank stops alone on a clock of its own.
    None outside a SLURM job, without a time limit, or with the clock-based stop off (then nothing is
    asked and nothing is broadcast)."""
    job = os.environ.get("SLURM_JOB_ID")
    if budget.margin_s is None or job is None:
        return None
    left = None
    if ranks.is_main:
        end = job_end_time(job)
        left = None if end is None else end - time.time()
    return tp.cast("float | None", ranks.broadcast(left))
