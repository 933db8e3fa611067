"""What a resume does to the checkpoint folder: act on it, or (the dry-run) only say what it would do.

Discovery decides once what to quarantine, set aside, clean up and count; whether that happens is
chosen once, when the checkpointer is built, by which of these two it holds, so discovery itself
never asks whether it is a dry-run.
"""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

from radiodiff_resume.checkpoint.manifest import parse_step
from radiodiff_resume.checkpoint.restarts import RestartLedger
from radiodiff_resume.checkpoint.store import CRASH_LOOP, CheckpointStore
from radiodiff_resume.checkpoint.verify import Report
from radiodiff_resume.events import EventLog

logger = logging.getLogger(__name__)

FRESH_START = "checkpoint.resume=never"


class Actions(tp.Protocol):
    would: list[str]
    """What a real resume would have done, in order (the dry-run's; empty when acting)."""
    rejected: list[Report]
    """The checkpoints found damaged or refused (the dry-run's; empty when acting)."""
    moved: str
    """How the damaged checkpoints' move is told: "were" or "would be"."""

    def remove_leftovers(self) -> None: ...
    def set_aside_all(self, paths: list[Path]) -> None: ...
    def count_restart(self, name: str, limit: int) -> int | None: ...
    def quarantine(self, report: Report) -> None: ...
    def refused(self, report: Report) -> None: ...
    def set_aside_crash_loop(self, path: Path, reason: str) -> None: ...
    def set_aside_others(self, others: list[Path], chosen: Path, step: int) -> None: ...
    def clear_counts(self) -> None: ...


class Act:
    """A real resume: moves, deletes and counts, each logged and sent to the event log."""

    moved = "were"

    def __init__(self, store: CheckpointStore, restarts: RestartLedger, events: EventLog, stage: str) -> None:
        self.store, self.restarts, self.events, self.stage = store, restarts, events, stage
        self.would: list[str] = []
        self.rejected: list[Report] = []

    def remove_leftovers(self) -> None:
        """Remove the staging folders of saves that died."""
        leftovers = self.store.remove_leftovers()
        if leftovers:
            logger.info("%s: removed unfinished save(s) %s (the process died mid-save)", self.stage,
                        ", ".join(leftovers))
            self.events.emit("staging_removed", stage=self.stage, folders=leftovers)

    def set_aside_all(self, paths: list[Path]) -> None:
        """``checkpoint.resume=never``: the previous run's checkpoints, moved out of the way."""
        if not paths:
            return
        moved = self.store.set_aside(paths, f"{FRESH_START}: a deliberate fresh start")
        logger.warning("%s: %s: the previous run's checkpoints were moved to %s, starting fresh", self.stage,
                       FRESH_START, moved)
        self.events.emit("checkpoints_set_aside", stage=self.stage, to=str(moved))

    def count_restart(self, name: str, limit: int) -> int | None:
        """Count a run resuming from ``name`` before it does anything else; the step it is counted
        against."""
        runs = self.restarts.started(name)
        if runs > 1:
            logger.warning("%s: run %d in a row resuming from %s (set aside after %d)", self.stage, runs,
                           name, limit)
        return parse_step(name)

    def quarantine(self, report: Report) -> None:
        reason = report.describe()
        moved = self.store.quarantine(report.path, reason)
        self.events.emit("checkpoint_quarantined", stage=self.stage, path=str(report.path), to=str(moved),
                         reason=reason)
        logger.warning("%s: checkpoint damaged, moved to %s\n%s", self.stage, moved, reason)

    def refused(self, report: Report) -> None:
        """A sound checkpoint this run cannot use: the error raised says it all."""

    def set_aside_crash_loop(self, path: Path, reason: str) -> None:
        moved = self.store.set_aside([path], reason, prefix=CRASH_LOOP)
        self.events.emit("checkpoint_set_aside", stage=self.stage, path=str(path), to=str(moved),
                         reason=reason)
        logger.error("%s: %s set aside to %s: %s", self.stage, path.name, moved, reason)

    def set_aside_others(self, others: list[Path], chosen: Path, step: int) -> None:
        """``checkpoint.resume=<folder>``: the checkpoints the resumed run would mix with."""
        if not others:
            return
        names = ", ".join(p.name for p in others)
        moved = self.store.set_aside(others, f"checkpoint.resume={chosen} (step {step}): these "
                                             "checkpoints are newer or of another line, so the resumed "
                                             "run would mix with them")
        logger.warning("%s: resuming from %s (step %d): %s set aside, unchanged, in %s (nothing deleted)",
                       self.stage, chosen, step, names, moved)
        self.events.emit("checkpoints_set_aside", stage=self.stage, to=str(moved), folders=names)

    def clear_counts(self) -> None:
        """Progress or a clean end: no checkpoint is suspect any more."""
        self.restarts.clear()


class Record:
    """The dry-run: moves, deletes and counts nothing; lists what a real resume would have done in
    ``would`` and keeps the reports of the checkpoints found damaged or refused in ``rejected``."""

    moved = "would be"

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.would: list[str] = []
        self.rejected: list[Report] = []

    def remove_leftovers(self) -> None:
        self.would += [self._leftover(name) for name in self.store.leftovers()]

    def _leftover(self, name: str) -> str:
        original = name.removeprefix(".replaced-")
        if name != original and not (self.store.folder / original).exists():
            return f"put {name} back as {original} (not verified here: a dry-run moves nothing)"
        return f"remove {name}, left by a process that died mid-save"

    def set_aside_all(self, paths: list[Path]) -> None:
        if paths:
            self.would.append(f"set aside {len(paths)} checkpoint(s) ({FRESH_START})")

    def count_restart(self, name: str, limit: int) -> int | None:
        return None

    def quarantine(self, report: Report) -> None:
        self.rejected.append(report)
        self.would.append(f"quarantine {report.path.name} ({tp.cast(tp.Any, report.failure).name} failed)")

    def refused(self, report: Report) -> None:
        self.rejected.append(report)

    def set_aside_crash_loop(self, path: Path, reason: str) -> None:
        self.would.append(f"set aside {path.name}: {reason}")

    def set_aside_others(self, others: list[Path], chosen: Path, step: int) -> None:
        if others:
            self.would.append(f"set aside {', '.join(p.name for p in others)} (newer than {chosen.name}, or "
                              "of another line)")

    def clear_counts(self) -> None:
        """The ledger is left as it is: a dry-run counts nothing, so it clears nothing either."""
