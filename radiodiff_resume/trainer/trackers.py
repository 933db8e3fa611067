"""What a stage sends to accelerate's experiment trackers (``trainer.log_with``) across requeues,
rollbacks and restarts.

The run starts accelerate's trackers once per process (``Accelerator(log_with=..., project_dir=
<results>)``, ``init_trackers("radiodiff_resume", ...)``, main process only). Every process of a
results folder logs to the same tracker run: tensorboard's run is its folder
``<results>/radiodiff_resume``; the run each tracker logs to is kept in ``<results>/trackers.json``
so a restart that lands in another run says so.

Steps never go backwards in a tracker: a stage logs a metric only at a step above the highest at
which it logged that metric before, in this process or an earlier one (read back from its
``metrics.jsonl``, which keeps every record). The steps a restart or a rollback replays are
therefore not logged again: after an exact resume they are the values already logged; after a
rollback they are another branch, which ``metrics.jsonl`` and ``events.jsonl`` keep and the
tracker marks with one ``<stage>/rolled_back_to_step`` point at the step the rollback happened.
Logging happens at the log interval only, from values already on the host.
"""

from __future__ import annotations

import json
import logging
import os
import typing as tp
from pathlib import Path

from accelerate import Accelerator

from radiodiff_resume.io import read_regular, write_text_atomic

logger = logging.getLogger(__name__)

RUNS_FILE = "trackers.json"


class TrackerLog:
    """The trackers of one stage, on the main process (a disabled instance does nothing)."""

    def __init__(self, accelerator: Accelerator, stage: str, records: tp.Iterable[tp.Mapping[str, tp.Any]],
                 enabled: bool) -> None:
        self.accelerator = accelerator
        self.stage = stage
        self.enabled = enabled and bool(accelerator.trackers)
        self.logged: dict[str, int] = {}
        """Metric → the highest step it was logged at (this stage, every process so far)."""
        self.last = 0
        """The highest step this stage logged anything at."""
        for record in records if self.enabled else ():
            step = record.get("step")
            if isinstance(step, int) and not isinstance(step, bool):
                for key, value in record.items():
                    if _numeric(value):
                        self._logged(f"{stage}/{key}", step)
        if self.enabled:
            keep_run_names(accelerator)

    def log(self, step: int, values: tp.Mapping[str, tp.Any]) -> None:
        """``values`` (numbers, named ``<stage>/<key>``) at ``step``, less those already logged at
        ``step`` or later."""
        if not self.enabled:
            return
        fresh = {f"{self.stage}/{k}": v for k, v in values.items()
                 if _numeric(v) and step > self.logged.get(f"{self.stage}/{k}", 0)}
        if fresh:
            self.accelerator.log(fresh, step=step)
            for key in fresh:
                self._logged(key, step)

    def rolled_back(self, step: int, to_step: int) -> None:
        """One point ``<stage>/rolled_back_to_step`` = ``to_step``, at ``step`` (or at the highest step
        already logged, when the rollback happens in steps being replayed)."""
        if self.enabled:
            at = max(step, self.last)
            self.accelerator.log({f"{self.stage}/rolled_back_to_step": to_step}, step=at)
            self._logged(f"{self.stage}/rolled_back_to_step", at)

    def _logged(self, key: str, step: int) -> None:
        self.logged[key] = max(step, self.logged.get(key, 0))
        self.last = max(self.last, step)


def _numeric(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_names(accelerator: Accelerator) -> dict[str, str]:
    """Tracker name → the run it logs to: tensorboard's folder (relative to the results folder),
    wandb's run id, otherwise the tracker's run name."""
    names = {}
    project = Path(accelerator.project_dir or ".")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            name = os.path.relpath(tracker.logging_dir, project)
        elif tracker.name == "wandb":
            name = str(tracker.tracker.id)
        else:
            name = str(getattr(tracker, "run_name", ""))
        names[tracker.name] = name
    return names


def keep_run_names(accelerator: Accelerator) -> None:
    """Record the runs in ``<results>/trackers.json`` (written atomically, only when they change; a
    link or FIFO there is refused, never followed); warn when a tracker logs to a new run."""
    if accelerator.project_dir is None:
        return
    path = Path(accelerator.project_dir) / RUNS_FILE
    try:
        kept = json.loads(read_regular(path))
    except (OSError, ValueError, RecursionError):
        kept = {}  # missing or unreadable: the runs are recorded afresh
    kept = kept if isinstance(kept, dict) else {}
    now = run_names(accelerator)
    for name, run in now.items():
        if kept.get(name) not in (None, run):
            logger.warning("tracker %s logs to run %s, not to %s as before: this tracker starts a new run "
                           "on each restart", name, run, kept[name])
    if {**kept, **now} != kept:
        write_text_atomic(path, json.dumps({**kept, **now}, sort_keys=True) + "\n")
