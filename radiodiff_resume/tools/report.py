"""``radiodiff-resume report RUN_DIR``: a run's health in one PNG and a short text summary.

It reads only what a run writes for people and tools — ``metrics.jsonl`` and ``events.jsonl`` of
the LDM (``RUN_DIR``) and of the first stage (its subfolder), ``config.yaml`` and the SLURM requeue
ledgers — so it works on a live run, a finished one or a copy, and changes nothing but the PNG.

What it counts is :mod:`radiodiff_resume.tools.report_data`; what it draws,
:mod:`radiodiff_resume.tools.report_plot`.
"""

from __future__ import annotations

import argparse
import json
import typing as tp
from pathlib import Path

from radiodiff_resume.errors import UserError
from radiodiff_resume.tools.report_data import format_text, load_run, summarize

# ----- the command -----------------------------------------------------------------------------


def report(run_dir: Path, out: Path | None = None) -> dict[str, tp.Any]:
    """Read ``run_dir``, draw the PNG (default ``run_dir/report.png``) and return the summary."""
    run = load_run(run_dir)
    png = out if out is not None else run_dir / "report.png"
    if not png.parent.is_dir():
        raise UserError(f"cannot write {png}: {png.parent} is not a folder (choose another --out)")
    summary = summarize(run)
    from radiodiff_resume.tools.report_plot import draw  # matplotlib only when drawing

    draw(run, summary, png)
    summary["png"] = str(png)
    return summary


def cmd_report(args: argparse.Namespace) -> None:
    summary = report(args.run_dir, args.out)
    print(json.dumps(summary, indent=2, allow_nan=False) if args.json else format_text(summary), flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``report`` to the CLI's sub-commands."""
    parser = sub.add_parser(
        "report", help="draw a run's health in one PNG and print a short summary",
        description="Draw a run's health in one PNG — progress over wall time, training loss, gradient norm "
                    "with the clip threshold, skipped steps, validation metrics, with saves, restarts, "
                    "stops, rollbacks, quarantines and halts marked — and print what it counted: steps "
                    "done, time and steps lost to restarts and rollbacks, events by kind, last validation. "
                    "Covers the LDM and, when present, the first stage (first_stage/). Reads the run's "
                    "files only; safe on a live run.")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="the run's results folder (trainer.results_folder)")
    parser.add_argument("--out", metavar="PNG", type=Path, default=None,
                        help="where to write the PNG (default: RUN_DIR/report.png); written atomically")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON document instead of text")
    parser.set_defaults(func=cmd_report)
