"""Run under ``accelerate launch``: ``dist_save_fail.py CFG OUT FAIL_RANK LIMIT [key=value ...]``.

Trains with ``run.train`` (resuming whatever the results folder holds) after capping, on rank
``FAIL_RANK`` only, the size of any file that process writes at ``LIMIT`` bytes
(``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored): a write past the cap then fails in the kernel
with ``EFBIG`` ("File too large"), a real ``OSError`` as a full disk would give, on one rank.

Each rank records how ``train`` ended in ``OUT/rank<r>.json``; a :class:`UserError` (what the
CLI turns into exit code 2) exits 2, anything else propagates with its traceback.

Why not a first ``run.train`` to step 2 in this same process: ``train`` ends with
``accelerator.end_training()``, which destroys the process group, so a second ``train`` in the
process fails in its first collective. The test commits step 2 with a launch of its own.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from radiodiff_resume.config import load_config
from radiodiff_resume.errors import UserError
from radiodiff_resume.run import make_accelerator, train


def main() -> None:
    cfg_path, out, fail_rank, limit, *overrides = sys.argv[1:]
    cfg = load_config(cfg_path, overrides)
    accelerator = make_accelerator(cfg)
    rank = accelerator.process_index
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == int(fail_rank):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
        # Only the soft limit: the kernel enforces it the same way, and it can be raised back
        # afterwards so this rank can write its report (a hard limit could not be, without root).
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), hard))
    record: dict[str, str | None]
    try:
        train(cfg, accelerator)
    except UserError as exc:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        record = {"type": type(exc).__name__, "message": str(exc), "cause": repr(exc.__cause__)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
        # Both reports must be on disk before either rank exits: the launcher terminates the other
        # workers as soon as one exits non-zero. A rank that never gets here (hung elsewhere) makes
        # rank 0 raise after the timeout instead of waiting forever.
        dist.monitored_barrier(timeout=dt.timedelta(seconds=60))
        sys.exit(2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    record = {"type": None, "message": None, "cause": None}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
