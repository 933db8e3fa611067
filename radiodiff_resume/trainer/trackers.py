"""What a stage sends to accelerate's experiment trackers (``trainer.log_with``) across requeues,
rollbacks and restarts.

The run starts accelerate's trackers once per process (``Accelerator(log_with=..., project_dir=
<results>)``, ``init_trackers("radiodiff_resume", ..., init_kwargs=init_kwargs(...))``, main process
only). Every process of a results folder logs to the same tracker run: tensorboard's run is its
folder ``<results>/radiodiff_resume``; wandb's is the run id chosen on the first start and kept in
``<results>/trackers.json``, resumed by every later process (``wandb.init(id=<kept>,
resume="allow", dir=<results>)``). The run each tracker logs to is recorded there too, so a restart
that lands in another run says so.

Steps never go backwards in a tracker: a stage logs a metric only at a step above the highest at
which it logged that metric before, in this process or an earlier one (read back from its
``metrics.jsonl``, which keeps every record). The steps a restart or a rollback replays are
therefore not logged again: after an exact resume they are the values already logged; after a
rollback they are another branch, which ``metrics.jsonl`` and ``events.jsonl`` keep and the
tracker marks with one ``<stage>/rolled_back_to_step`` point at the step the rollback happened.
wandb gets the step as the value ``<stage>/step``, the x-axis of the stage's metrics
(``define_metric``), not as its own ``step``: wandb's step is one per run and only grows, which a
second stage starting at step 1 would break, and an offline process resumes it from 0.
Logging happens at the log interval only, from values already on the host.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
import typing as tp
from pathlib import Path

from accelerate import Accelerator

from radiodiff_resume.errors import UserError
from radiodiff_resume.io import read_regular, write_text_atomic

logger = logging.getLogger(__name__)

RUNS_FILE = "trackers.json"
WANDB_ID = re.compile(r"[a-z0-9]{1,64}")
"""A wandb run id as kept in ``trackers.json``: what wandb itself generates (8 of ``a-z0-9``), up to 64."""


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
            for tracker in accelerator.trackers:
                if tracker.name == "wandb":
                    tracker.tracker.define_metric(f"{stage}/step")
                    tracker.tracker.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def log(self, step: int, values: tp.Mapping[str, tp.Any]) -> None:
        """``values`` (numbers, named ``<stage>/<key>``) at ``step``, less those already logged at
        ``step`` or later."""
        if not self.enabled:
            return
        fresh = {f"{self.stage}/{k}": v for k, v in values.items()
                 if _numeric(v) and step > self.logged.get(f"{self.stage}/{k}", 0)}
        if fresh:
            self._send(fresh, step)
            for key in fresh:
                self._logged(key, step)

    def rolled_back(self, step: int, to_step: int) -> None:
        """One point ``<stage>/rolled_back_to_step`` = ``to_step``, at ``step`` (or at the highest step
        already logged, when the rollback happens in steps being replayed)."""
        if self.enabled:
            at = max(step, self.last)
            self._send({f"{self.stage}/rolled_back_to_step": to_step}, at)
            self._logged(f"{self.stage}/rolled_back_to_step", at)

    def _send(self, values: dict[str, tp.Any], step: int) -> None:
        """``values`` at ``step`` to every tracker; to wandb as the value ``<stage>/step`` (see above)."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.log({**values, f"{self.stage}/step": step})
            else:
                tracker.log(values, step=step)

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


def init_kwargs(accelerator: Accelerator, log_with: tp.Sequence[str]) -> dict[str, dict[str, tp.Any]]:
    """``init_trackers``' ``init_kwargs``: wandb resumes the run whose id ``<results>/trackers.json``
    keeps; on the first start the main process chooses the id and keeps it (atomically) before the
    run starts, so even a process killed during ``wandb.init`` leaves it for the next. Every process
    checks a kept id (the same one-line error on each); only the main process starts wandb."""
    if "wandb" not in log_with or accelerator.project_dir is None:
        return {}
    results = Path(accelerator.project_dir)
    path = results / RUNS_FILE
    kept = kept_runs(path)
    run = kept.get("wandb")
    if run is not None and not (isinstance(run, str) and WANDB_ID.fullmatch(run)):
        raise UserError(f"{path}: the kept wandb run id {str(run)[:80]!r} is not 1 to 64 characters "
                        "a-z, 0-9: write the run's id there, or remove the \"wandb\" entry for a new run")
    if not accelerator.is_main_process:
        return {}
    if run is None:
        run = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        write_text_atomic(path, json.dumps({**kept, "wandb": run}, sort_keys=True) + "\n")
    return {"wandb": {"id": run, "resume": "allow", "dir": str(results)}}


def kept_runs(path: Path) -> dict[str, tp.Any]:
    """What ``trackers.json`` keeps, read as data only: ``{}`` when it is missing; a one-line error
    naming it when it is not a JSON object (or is a link, a FIFO, ...)."""
    try:
        kept = json.loads(read_regular(path))
    except FileNotFoundError:
        return {}
    except (ValueError, RecursionError):
        kept = None
    if not isinstance(kept, dict):
        raise UserError(f"{path} is not a JSON object of tracker runs: restore it, or move it away to start "
                        "new tracker runs (a wandb run then gets a new id)")
    return kept


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
