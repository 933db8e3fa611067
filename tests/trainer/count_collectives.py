"""Run under ``accelerate launch`` (2 processes): train with every ``torch.distributed`` collective
called from Python counted by the step the trainer was at; rank 1 sends itself a real SIGUSR1 from
inside its collective of step ``SIGNAL_AFTER + 1``. Each rank writes ``rank<r>.json``: the
collectives per step, the step it stopped at and the stop's message.

Only torch is wrapped (DDP's gradient all-reduce runs in C++ and is not seen: it is the same in every
version of the loop); nothing of radiodiff_resume is replaced.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import signal
import sys
import typing as tp
from pathlib import Path

import torch.distributed as dist

from radiodiff_resume.config import load_config
from radiodiff_resume.errors import StopRequested
from radiodiff_resume.run import build_ldm_trainer, make_accelerator
from radiodiff_resume.slurm.signals import STOP

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "gather", "gather_object",
               "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv")
SIGNAL_AFTER = 3


def main() -> None:
    cfg_path, out, *overrides = sys.argv[1:]
    cfg = load_config(cfg_path, overrides)
    STOP.install()
    accelerator = make_accelerator(cfg)
    trainer = build_ldm_trainer(cfg, accelerator)
    rank = accelerator.process_index
    per_step: dict[int, list[str]] = collections.defaultdict(list)
    sent = False

    def counting(name: str, original: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
        @functools.wraps(original)
        def call(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            nonlocal sent
            per_step[trainer.state.step].append(name)
            if rank == 1 and trainer.state.step == SIGNAL_AFTER and not sent:
                sent = True
                os.kill(os.getpid(), signal.SIGUSR1)
            return original(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counting(name, getattr(dist, name)))
    try:
        trainer.fit()
        stopped, message = None, ""
    except StopRequested as exc:
        stopped, message = trainer.state.step, str(exc)
    record = {"per_step": per_step, "stopped": stopped, "message": message}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    STOP.uninstall()


if __name__ == "__main__":
    main()
