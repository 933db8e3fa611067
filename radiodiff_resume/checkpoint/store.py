"""The ``checkpoints/`` folder of one stage: atomic commit, retention, quarantine, set-aside.

Commit protocol (every rank calls :meth:`CheckpointStore.save`; each phase ends with all
ranks learning whether any rank failed, so a failure never leaves another rank waiting):

1. rank 0 makes a fresh staging folder;
2. every rank writes and fsyncs its own files, hashed from the bytes written; rank 0 writes the
   shared files at the same time;
3. rank 0 writes ``manifest.json`` last, fsyncs it and the staging folder, renames the folder
   into place, fsyncs the parent;
4. only then retention (rank 0): a checkpoint is retired by renaming it out of the
   ``step-*`` namespace first, then deleted, so a kill never leaves a half-deleted
   folder that looks like a checkpoint.

A background save (:mod:`~radiodiff_resume.checkpoint.background`) runs the same phases in its
writer thread, agreed over a gloo group of its own (:meth:`Ranks.background`).

A crash at any point leaves either the complete new checkpoint or none, and the previous
ones untouched; a failed write (disk full, EIO) removes the staging folder and stops every
rank with the same message.

A symbolic link where a checkpoint folder belongs is foreign: it is skipped with a warning, never
verified, retired or deleted through, and when the store needs its name for a save it is moved,
unchanged, into ``foreign-<time>/`` (with ``SET_ASIDE.txt``), never followed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from radiodiff_resume.checkpoint.files import read_manifest, write_durable
from radiodiff_resume.checkpoint.manifest import (
    MANIFEST,
    FileRecord,
    Manifest,
    ManifestError,
    parse_step,
    step_dirname,
)
from radiodiff_resume.dist import Ranks
from radiodiff_resume.errors import HaltError, UserError
from radiodiff_resume.io import fsync_dir, fsync_together

logger = logging.getLogger(__name__)

QUARANTINE = "quarantine"
CRASH_LOOP = "crash-loop"
FOREIGN = "foreign"
REASON_SUFFIX = ".reason.txt"
LEFTOVER_PREFIXES = (".staging-", ".replaced-", ".retired-")


class SaveFailed(HaltError):
    """A checkpoint could not be written; the earlier ones are untouched."""


def rank_component(rank: int) -> str:
    return f"rank-{rank:05d}"


def stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


class CheckpointStore:
    """The ``checkpoints/`` folder of one training stage."""

    def __init__(self, folder: Path, ranks: Ranks, keep_last: int = 3, keep_every: int | None = None) -> None:
        self.folder = Path(folder)
        self.ranks = ranks
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.protected: set[Path] = set()
        self.line: str | None = None
        """The line this run writes; retention only ever touches checkpoints of this line."""
        self._lines: dict[str, str | None] = {}
        self._warned: set[str] = set()

    def _own_folders(self, wanted: tp.Callable[[str], bool]) -> list[Path]:
        """The real folders (not links) of ``checkpoints/`` whose names are ``wanted``; a link with
        such a name is skipped with a warning (once per store)."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in os.scandir(self.folder):
            if not wanted(entry.name):
                continue
            if entry.is_symlink():
                if entry.name not in self._warned:
                    self._warned.add(entry.name)
                    logger.warning("%s, so it is skipped: never verified, resumed, moved or deleted through; "
                                   "to resume from its target pass checkpoint.resume=<that folder>",
                                   _foreign(Path(entry.path)))
            elif entry.is_dir(follow_symlinks=False):
                found.append(Path(entry.path))
        return found

    def _set_aside_foreign(self, path: Path) -> None:
        """Move whatever that is not a real folder holds a name the store must write (a link, a file)
        into ``foreign-<time>/``, unchanged and not followed."""
        if not path.is_symlink() and (path.is_dir() or not path.exists()):
            return
        where = self.set_aside([path], f"{_foreign(path)}; moved here, unchanged, because the checkpoint "
                                      "store needed its name", prefix=FOREIGN)
        logger.warning("%s; moved, unchanged, to %s because the checkpoint store needs its name",
                       _foreign(path), where)

    # ----- reading -----------------------------------------------------------------
    def candidates(self) -> list[Path]:
        """Every ``step-*`` folder, newest first, manifest or not (a missing one is a finding); no link."""
        found = self._own_folders(lambda name: parse_step(name) is not None)
        return sorted(found, key=lambda p: (parse_step(p.name), p), reverse=True)

    def committed(self) -> list[Path]:
        """``step-*`` folders whose manifest exists, newest first."""
        return [p for p in self.candidates() if (p / MANIFEST).is_file()]

    def quarantined(self) -> list[Path]:
        folder = self.folder / QUARANTINE
        return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def line_of(self, path: Path) -> str | None:
        """The line a committed checkpoint belongs to (None when its manifest is unreadable)."""
        if path.name not in self._lines:
            try:
                self._lines[path.name] = read_manifest(path).line
            except (OSError, ManifestError):
                self._lines[path.name] = None
        return self._lines[path.name]

    # ----- housekeeping (rank 0) -----------------------------------------------------
    def leftovers(self) -> list[str]:
        """Folders a crash left behind: uncommitted staging, retired and moved-aside ones."""
        return sorted(p.name for p in self._own_folders(lambda name: name.startswith(LEFTOVER_PREFIXES)))

    def remove_leftovers(self) -> list[str]:
        """Clean up after a crash: uncommitted staging and retired folders go; a checkpoint that
        a re-save had moved aside (``.replaced-step-N``) goes back if ``step-N`` is missing."""
        handled = []
        for path in (self.folder / name for name in self.leftovers()):
            if path.name.startswith(".replaced-"):
                original = self.folder / path.name.removeprefix(".replaced-")
                self._set_aside_foreign(original)
                if not original.exists():
                    os.replace(path, original)
                    handled.append(path.name)
                    continue
            shutil.rmtree(path)
            handled.append(path.name)
        if handled:
            fsync_dir(self.folder)
        return handled

    def crash_looped(self) -> list[Path]:
        """Folders of checkpoints set aside because runs kept dying after resuming from them."""
        return sorted(p for p in self.folder.glob(f"{CRASH_LOOP}-*") if p.is_dir())

    def set_aside(self, paths: tp.Sequence[Path], reason: str, prefix: str = "previous") -> Path:
        """Move ``paths`` unchanged into ``<prefix>-<time>/`` with a note saying why (nothing is deleted)."""
        target = self.folder / f"{prefix}-{stamp()}"
        suffix = 1
        while target.exists():
            target = self.folder / f"{prefix}-{stamp()}-{suffix}"
            suffix += 1
        target.mkdir()
        (target / "SET_ASIDE.txt").write_text(reason + "\n")
        for path in paths:
            os.replace(path, target / path.name)
        fsync_dir(target)
        fsync_dir(self.folder)
        return target

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a checkpoint that failed an integrity check into ``quarantine/``, unchanged.

        The reason goes into a file beside it, never into the folder, so the folder can be
        passed back as ``checkpoint.resume=<folder>`` once repaired.
        """
        target_dir = self.folder / QUARANTINE
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{path.name}-{stamp()}"
        suffix = 1
        while target.exists():
            target = target_dir / f"{path.name}-{stamp()}-{suffix}"
            suffix += 1
        write_durable(target.with_name(target.name + REASON_SUFFIX), (reason + "\n").encode())
        os.replace(path, target)
        fsync_dir(self.folder)
        fsync_dir(target_dir)
        return target

    # ----- writing -----------------------------------------------------------------
    def save(
        self,
        step: int,
        shared: tp.Callable[[Path], dict[str, FileRecord]],
        own: tp.Callable[[Path], dict[str, FileRecord]],
        manifest: Manifest | None,
        ranks: Ranks | None = None,
    ) -> Path:
        """Commit a checkpoint of ``step`` (every rank calls this).

        ``shared`` (rank 0 only) and ``own`` (each rank) write their files into the folder they are
        given and return the records once the files are fsynced (rank 0 runs the two at the same
        time); an error while serialising is caught and agreed like a write error. ``manifest`` is
        used on rank 0 only. ``ranks``: who agrees on each phase (the writer thread passes
        :meth:`Ranks.background`); the store's own by default.
        """
        ranks = ranks or self.ranks
        final = self.folder / step_dirname(step)
        staging = self.folder / f".staging-{step_dirname(step)}"
        self._phase(ranks, step, staging, lambda: self._prepare(staging) if ranks.is_main else None)
        gathered = self._phase(ranks, step, staging,
                               lambda: _together(own, shared, staging) if ranks.is_main else own(staging))
        if ranks.is_main:
            assert manifest is not None
            manifest.files = {k: v for records in gathered for k, v in records.items()}
            self._phase(ranks, step, staging, lambda: self._commit(staging, final, manifest))
            self._lines[final.name] = manifest.line
            self.apply_retention()
        else:
            self._phase(ranks, step, staging, lambda: None)
        return final

    def _prepare(self, staging: Path) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._set_aside_foreign(staging)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()

    def _phase(self, ranks: Ranks, step: int, staging: Path, work: tp.Callable[[], tp.Any]) -> list[tp.Any]:
        """Run ``work`` on this rank; every rank learns whether any failed, and all stop together."""
        result, error, caught = None, None, None
        try:
            result = work()
        except Exception as exc:  # re-raised below on every rank, never swallowed
            caught, error = exc, f"{type(exc).__name__}: {exc}"
        outcomes = ranks.gather((error, result))
        failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(outcomes) if e is not None]
        if not failed:
            return [r for _, r in outcomes]
        if ranks.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if caught is not None and not isinstance(caught, (OSError, UserError)):
            raise caught  # a bug, not the environment: keep its traceback
        newest = self.committed()
        kept = f"the newest committed checkpoint is {newest[0]}" if newest else "no earlier checkpoint exists"
        raise SaveFailed(
            f"checkpoint of step {step} could not be written ({'; '.join(failed)}); nothing was "
            f"committed and earlier checkpoints are untouched ({kept}). Fix that cause (disk space, "
            f"permissions of {self.folder}, ...), then run the same command to resume."
        ) from caught

    def _commit(self, staging: Path, final: Path, manifest: Manifest) -> None:
        """Every file is on disk already; the manifest and the staging folder's entries are fsynced at
        once, then the rename, then the parent's fsync: only then is the checkpoint committed."""
        manifest.world_size = self.ranks.world
        write_durable(staging / MANIFEST, manifest.to_json().encode(), sync=False)
        fsync_together([staging / MANIFEST, staging])
        self._set_aside_foreign(final)
        if final.exists():
            old = final.with_name(f".replaced-{final.name}")
            self._set_aside_foreign(old)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            fsync_dir(self.folder)
            self._retire(old)
        else:
            os.replace(staging, final)
            fsync_dir(self.folder)

    def apply_retention(self) -> list[Path]:
        """Delete this line's checkpoints beyond ``keep_last`` (never below 2, never a protected one).

        Runs only after a commit, so there is never a moment with fewer good checkpoints.
        Checkpoints of another line are never touched. A failure to delete is logged, not
        raised: the new checkpoint is already committed.
        """
        keep = max(2, self.keep_last)
        ours = [p for p in self.committed() if self.line is not None and self.line_of(p) == self.line]
        removed = []
        for path in ours[keep:]:
            step = parse_step(path.name)
            if path.resolve() in self.protected or (self.keep_every and step and step % self.keep_every == 0):
                continue
            try:
                self._retire(path)
            except OSError as exc:
                logger.warning("checkpoint retention could not remove %s (%s); it is retried at the next "
                               "start", path, exc)
                continue
            removed.append(path)
        if removed:
            logger.info("checkpoint retention removed %s", ", ".join(p.name for p in removed))
        return removed

    def _retire(self, path: Path) -> None:
        """Rename out of the ``step-*`` namespace (atomic), then delete."""
        name = path.name.removeprefix(".replaced-")
        retired = path.with_name(f".retired-{name}")
        self._set_aside_foreign(retired)
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(path, retired)
        fsync_dir(self.folder)
        self._lines.pop(name, None)
        shutil.rmtree(retired)


def _together(own: tp.Callable[[Path], dict[str, FileRecord]],
              shared: tp.Callable[[Path], dict[str, FileRecord]], staging: Path) -> dict[str, FileRecord]:
    """Rank 0's own files and the shared ones, written at the same time (their fsyncs overlap)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        theirs = pool.submit(shared, staging)
        mine = own(staging)
        return {**mine, **theirs.result()}


def _foreign(path: Path) -> str:
    """'<path> is a symbolic link to <target>, not a checkpoint folder of this run' (or a file)."""
    if path.is_symlink():
        try:
            what = f"a symbolic link to {os.readlink(path)}"
        except OSError:
            what = "a symbolic link"
    else:
        what = "not a folder"
    return f"{path} is {what}, not a checkpoint folder of this run"
