"""The rollback policy: what a run does when its state cannot go on (non-finite weights, a run of
skipped steps). It reloads the newest verified checkpoint that does not lead straight back here, skips
past the data that led here, and halts for good when that stops helping.
"""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

from radiodiff_resume.checkpoint.checkpointer import Checkpointer
from radiodiff_resume.checkpoint.manifest import parse_step
from radiodiff_resume.events import EventLog
from radiodiff_resume.guard.policy import GuardHalt
from radiodiff_resume.trainer.parts import Parts

logger = logging.getLogger(__name__)


class Rollback:
    """Rolls ``parts`` back through ``checkpointer``; ``rolled_back(step)`` tells the trainer that the
    steps after the restored one, up to ``step``, are gone."""

    def __init__(self, parts: Parts, checkpointer: Checkpointer, events: EventLog, batch_size: int,
                 rolled_back: tp.Callable[[int], None]) -> None:
        self.parts = parts
        self.checkpointer = checkpointer
        self.events = events
        self.batch_size = batch_size
        self.rolled_back = rolled_back

    def roll_back(self, why: str, spikes: bool = False) -> None:
        """Reload the newest verified checkpoint (nothing is quarantined for this) and go on past
        the data that led here. A checkpoint rolled back to that leads straight back here (nothing
        committed since) is not good: the next rollback goes to an older one. After ``max_rollbacks``
        without a new checkpoint, or with none older left, stop, naming the checkpoint still believed
        good (or saying that none is). ``spikes``: every skip that led here was a loss spike."""
        parts = self.parts
        guard, state, stage, step = parts.guard, parts.state, parts.stage, parts.state.step
        led_back = list(guard.rolled_back_to)
        older_than = parse_step(led_back[-1].name) if led_back else None
        self.checkpointer.settle()  # a background commit under way is one of the candidates
        good = self.checkpointer.newest(older_than)
        if good is None or not guard.may_roll_back():
            self.halt(why, good, led_back, spikes)
        data, rank_state, carried = parts.train_stream.state_dict(), parts.rank_state_dict(), guard.carried()
        consumed = state.samples_seen
        path = tp.cast(Path, self.checkpointer.resume(mode="auto", rollback=True, older_than=older_than))
        guard.rolled_back(carried, path)
        skip = guard.cfg.rollback.skip_batches
        if skip is None:
            parts.train_stream.load_state_dict(data)
        else:
            for _ in range(skip):
                next(parts.train_stream)
            consumed += skip * self.batch_size * parts.accelerator.num_processes
        state.samples_seen = consumed  # samples consumed, rolled back or not: never behind the data
        parts.load_rank_state_dict(rank_state)
        parts.apply_loop_settings()
        self.rolled_back(step)
        self.events.emit("rolled_back", stage=stage, step=step, to_step=state.step, path=str(path),
                         reason=why, lr_scale=guard.lr_scale, skipped_batches="all since" if skip is None
                         else skip)
        logger.warning("%s step %d: %s: rolled back to %s (step %d%s), %s, LR x%g", stage, step, why,
                       path, state.step, f"; {led_back[-1].name} led straight back here" if led_back
                       else "", "continuing with the data that comes next" if skip is None
                       else f"skipping {skip} batch(es) past it", guard.lr_scale)

    def halt(self, why: str, good: Path | None, led_back: list[Path], spikes: bool = False) -> tp.NoReturn:
        """Stop the run for good (exit 4): why, which checkpoints rolled back to led straight back
        here, the newest one not proven bad (``good``), if any, and advice that fits (``spikes``: the
        skips were all loss spikes)."""
        guard, stage, step = self.parts.guard, self.parts.stage, self.parts.state.step
        if good is None and not led_back:
            cause, last = "there is nothing to roll back to", "no checkpoint was committed yet"
        else:
            cause = f"{guard.rollbacks_since_save} rollback(s) since the last checkpoint did not help"
            if led_back:
                cause += f" (rolling back to {', '.join(p.name for p in led_back)} led straight back to this)"
            last = (f"the last good checkpoint is {good}" if good is not None
                    else f"no checkpoint is believed good (none is older than {led_back[-1].name})")
        self.events.emit("halted", stage=stage, step=step, reason=why,
                         last_good=None if good is None else str(good), led_back=[str(p) for p in led_back])
        advice = (guard.spike_advice() if spikes
                  else "lower trainer.lr, try trainer.mixed_precision=bf16 or check the data")
        raise GuardHalt(
            f"{stage} step {step}: {why}, and {cause}; {last}. Look at {self.events.path} "
            f"for what was skipped; {advice}, then run the same command to resume.")
