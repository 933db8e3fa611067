"""The crash-loop brake: how many runs in a row resumed from a checkpoint and died before making
progress.

A checkpoint that makes every restart crash (a state that triggers a bug, an allocation that
cannot succeed) would otherwise be requeued forever on a cluster, each run dying the same way.
Such a run dies while loading or within its first steps. So, in a SLURM batch job, rank 0 counts
a run when it resumes from a checkpoint, and the count is cleared as soon as the run has made
progress: ``checkpoint.crash_loop_progress_steps`` optimizer steps past the checkpoint, a stop
signal seen, a new commit, or a clean end. A death after that (a preemption that outran
``KillWait``, a node failure) is not the checkpoint's fault and is not counted.

Outside a batch job nothing is counted: a person who reruns a crashing command by hand, in an
``salloc`` allocation or outside SLURM, sees the crash; an unattended requeue loop does not.
``SLURM_JOB_ID`` is set in both kinds of job, and so is every other ``SLURM_*`` variable a job
step sees, so the controller is asked (``scontrol show job``: ``BatchFlag``).
"""

from __future__ import annotations

import json
import os
import typing as tp
from pathlib import Path

from radiodiff_resume.io import is_regular_file, read_regular, write_text_atomic
from radiodiff_resume.slurm.environment import show_job

LEDGER = "restarts.json"


def batch_job(environ: tp.Mapping[str, str] = os.environ) -> bool | None:
    """Whether this process belongs to a SLURM batch job (``sbatch``, submitit): False outside SLURM
    and in an interactive allocation (``salloc``, a bare ``srun``); None when the controller cannot
    be asked (no ``scontrol``, or it does not know the job)."""
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return False
    flag = (show_job(job) or {}).get("BatchFlag", "")
    return flag != "0" if flag.isdigit() else None


class RestartLedger:
    """``<results folder of the stage>/restarts.json`` (beside ``checkpoints/``, which only the
    checkpoints themselves change): checkpoint folder name → runs in a row that resumed from it
    and died before making progress."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LEDGER

    def counts(self) -> dict[str, int]:
        """Runs per checkpoint name. A link, FIFO or folder in the ledger's place is refused with
        one line (:class:`~radiodiff_resume.io.NotRegularFile`), never read."""
        try:
            data = json.loads(read_regular(self.path))
        except (OSError, ValueError, RecursionError):
            return {}  # missing or unreadable: no evidence of a crash loop
        if not isinstance(data, dict):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}

    def count(self, name: str) -> int:
        return self.counts().get(name, 0)

    def started(self, name: str) -> int:
        """Count a run resuming from ``name`` before it does anything else (a SIGKILL leaves no
        later chance); returns the runs in a row so far (this one included). Written atomically."""
        counts = self.counts()
        counts[name] = counts.get(name, 0) + 1
        write_text_atomic(self.path, json.dumps(counts, sort_keys=True) + "\n")
        return counts[name]

    def clear(self) -> None:
        """Progress or a clean end: no checkpoint is suspect any more (only a regular file is removed)."""
        if is_regular_file(self.path):
            os.unlink(self.path)
