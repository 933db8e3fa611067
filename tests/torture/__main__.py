"""The full torture set, one table at the end:

    .venv/bin/python -m tests.torture [--kills 50] [--seed 0] [--workdir DIR]

- SIGKILL: one run killed ``--kills`` times at random moments (start-up and resume, steps, saves,
  right after commits), re-run to the end, compared bit for bit with an uninterrupted run;
- corruption: every generic mutation of every file of a checkpoint, every manifest and component
  forgery, nesting at the recursion limit, end-to-end discovery, and untouched controls;
- differences: environment and config changes on re-run (no quarantine; a way out that works);
- hostile files: links, FIFOs, /dev/zero and over-deep JSON where a run keeps its files, through the CLI
  (one-line refusal or as promised, no traceback, no hang, link targets untouched).

``bash scripts/test.sh`` runs a reduced set of each (tests/torture/test_*.py). Any failure
raises after the table is printed.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from radiodiff_resume.data.synthetic import ensure_synthetic
from tests.checkpoint.helpers import train_golden
from tests.torture.corruption import run_trials
from tests.torture.differences import run_differences
from tests.torture.hostile import run_hostile
from tests.torture.kills import run_kill_trials


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.torture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept afterwards when given")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="torture-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "synth"
        ensure_synthetic(cache, num_maps=6, tx_per_map=2, seed=0, size=64)
        golden = work / "golden" / "run"
        train_golden(golden, cache)

        rows = []
        start = time.perf_counter()
        kills = run_kill_trials(work / "kills", cache, kills=args.kills, seed=args.seed)
        rows.append(("SIGKILL at random moments", kills.kills, kills.kills, 0, 0, 0,
                     kills.lost_steps, time.perf_counter() - start))
        start = time.perf_counter()
        corruption = run_trials(golden, None, args.seed, workdir=work / "corruption")
        rows.append(("corruption fuzzing", corruption.trials, corruption.detected + corruption.accepted,
                     corruption.missed, corruption.crashed, corruption.false_alarms, 0,
                     time.perf_counter() - start))
        start = time.perf_counter()
        differences = run_differences(golden, work / "differences")
        rows.append(("environment / config differences", differences.trials, differences.handled,
                     differences.trials - differences.handled, 0, differences.false_alarms, 0,
                     time.perf_counter() - start))
        start = time.perf_counter()
        hostile = run_hostile(golden, work / "hostile")
        rows.append(("hostile files", hostile.trials, hostile.handled, hostile.trials - hostile.handled,
                     0, 0, 0, time.perf_counter() - start))

    print()
    print("| set | trials | detected / handled | missed | crashed | false alarms | lost steps | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, trials, ok, missed, crashed, false_alarms, lost, seconds in rows:
        print(f"| {name} | {trials} | {ok} | {missed} | {crashed} | {false_alarms} | {lost} "
              f"| {seconds:.0f} |")
    print(f"\nSIGKILL moments: {kills.by_moment}; {kills.restarts_resumed} restarts resumed a verified "
          f"checkpoint; final weights bit-identical to the uninterrupted run ({kills.steps} steps).")
    print(f"SIGKILL lost steps: steps computed after the last commit before a kill (redone), of "
          f"{kills.steps}.")
    failures = corruption.report().splitlines()[2:] + differences.failures + hostile.failures
    if kills.kills < args.kills:
        failures.append(f"SIGKILL: the run finished after {kills.kills} of {args.kills} kills")
    for line in failures:
        print(line)
    if failures or corruption.crashed or corruption.false_alarms:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
