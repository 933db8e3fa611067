"""The crash-loop brake: how many runs in a row resumed from a checkpoint and then died.

A checkpoint that makes every restart crash (a state that triggers a bug, an allocation that
cannot succeed) would otherwise be requeued forever on a cluster, each run dying the same way.
Under SLURM, rank 0 counts a run when it resumes from a checkpoint; a new commit or a clean
end (a stop, the end of training) clears the count. Outside SLURM nothing is counted: a person
who reruns a crashing command by hand sees the crash; an unattended requeue loop does not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from radiodiff_resume.io import is_regular_file, read_regular, write_text_atomic

LEDGER = "restarts.json"


class RestartLedger:
    """``<results folder of the stage>/restarts.json`` (beside ``checkpoints/``, which only the
    checkpoints themselves change): checkpoint folder name → runs that resumed from it and
    ended neither by committing a newer checkpoint nor cleanly."""

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
        """Count a run resuming from ``name``; returns the runs in a row so far (this one included)."""
        counts = self.counts()
        counts[name] = counts.get(name, 0) + 1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(counts, sort_keys=True) + "\n")
        return counts[name]

    def clear(self) -> None:
        """Progress or a clean end: no checkpoint is suspect any more (only a regular file is removed)."""
        if is_regular_file(self.path):
            os.unlink(self.path)
