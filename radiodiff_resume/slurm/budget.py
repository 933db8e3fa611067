"""Whether the signal's lead time covers a stop: the rest of a step, then one save.

Measured on the running job (host clock, no device sync: the guarded step already waits for the
device once), reported once, when the first checkpoint of the process has been written.
"""

from __future__ import annotations

import logging
import statistics

logger = logging.getLogger(__name__)


class StopBudget:
    """Step and save times of this process, against ``slurm.signal_lead_s``."""

    def __init__(self, stage: str, lead_s: float | None, under_slurm: bool) -> None:
        self.stage, self.lead_s, self.under_slurm = stage, lead_s, under_slurm
        self.steps: list[float] = []
        self.reported = False

    def step(self, seconds: float) -> None:
        if len(self.steps) < 50:
            self.steps.append(seconds)

    def saved(self, seconds: float) -> str | None:
        """After a save: the one report (logged; a warning when the lead is too short)."""
        if self.reported or not self.steps:
            return None
        self.reported = True
        step = statistics.median(self.steps[1:] or self.steps)  # the first step warms up
        need = step + seconds
        text = (f"{self.stage}: a step takes {step:.2f} s and a checkpoint {seconds:.2f} s, so a stop "
                f"signal needs {need:.0f} s of lead")
        if self.lead_s is None:
            logger.info("%s", text)
        elif self.lead_s < need:
            text += (f", more than slurm.signal_lead_s={self.lead_s:g}: a time limit may kill the job "
                     "before its checkpoint is committed (the previous one is used then); raise "
                     "slurm.signal_lead_s (sbatch --signal=...@LEAD), and allow for a validation "
                     "when one is due")
            (logger.warning if self.under_slurm else logger.info)("%s", text)
        else:
            logger.info("%s (slurm.signal_lead_s=%g covers it)", text, self.lead_s)
        return text
