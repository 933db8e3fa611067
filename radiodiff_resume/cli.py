"""Command line: ``radiodiff-resume train --cfg configs/x.yaml [key=value ...]``, ``submit``, and the
operator tools ``dry-run``, ``doctor``, ``import``, ``report`` and ``convert-config``
(``radiodiff_resume.tools``).

User errors (bad config, missing files) print one message and exit 2, no traceback; a run
that halted to protect its state exits 4; a requested stop (checkpoint committed) exits 3.
"""

from __future__ import annotations

import argparse
import sys
import typing as tp

from radiodiff_resume.errors import (
    EXIT_HALTED,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    HaltError,
    StopRequested,
    UserError,
)
from radiodiff_resume.process import is_main_process, setup_logging
from radiodiff_resume.slurm.environment import export_torch_env
from radiodiff_resume.slurm.signals import STOP
from radiodiff_resume.tools import convert_config, doctor, dry_run, evaluate, export, importer, report

if tp.TYPE_CHECKING:
    from radiodiff_resume.config import Config

EXIT_STATUS = {
    "train": "Exit 0: trained to trainer.train_num_steps; 2: a user error (config, data or files; one "
             "'error:' line, no traceback); 3: stopped on request (a signal) after committing a checkpoint: "
             "run the same command to resume; 4: halted to protect the run's state (guards could not "
             "recover, a save was refused or failed): read events.jsonl before running it again.",
    "submit": "Exit 0: submitted (with --local: the job finished); 2: a user error, or the --local job "
              "failed or ended unfinished (its log is named).",
    "import": "Exit 0: converted, written and read back; 2: a user error or a refused source (one 'error:' "
              "line; nothing is written).",
    "report": "Exit 0: summary printed and PNG written; 2: a user error (no such run folder, no log in it, "
              "--out not writable).",
    "convert-config": "Exit 0: translated; 2: a user error (the file is missing, not YAML, or no config).",
}
"""What each verb's exit status means, at the end of its ``--help``; the other verbs say it in their
own descriptions (``dry-run`` and ``doctor`` exit 1 when a check failed)."""


def train_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a conditional latent diffusion model (RadioDiff-style).",
        epilog=EXIT_STATUS["train"],
    )
    parser.add_argument("--cfg", required=True, help="YAML config, e.g. configs/radio_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.lr=1e-4")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    STOP.install()  # first of all: a signal while torch imports or data is prepared is kept too
    from radiodiff_resume.config import load_config
    from radiodiff_resume.run import train

    cfg = load_config(args.cfg, args.overrides)
    STOP.install(cfg.slurm.signals)
    export_torch_env()
    try:
        train(cfg)
    finally:
        STOP.ignore()


def train_in_job(cfg: Config) -> None:
    """What a submitted job runs, pickled by name: torch and the run are imported in the job, not by
    ``submit`` (seconds of CPU per submission otherwise)."""
    from radiodiff_resume.run import train

    train(cfg)


def cmd_submit(args: argparse.Namespace) -> None:
    from radiodiff_resume.config import load_config
    from radiodiff_resume.slurm.submit import submit

    cfg = load_config(args.cfg, args.overrides)
    job = submit(cfg, train_in_job, local=args.local)
    print(f"submitted job {job.job_id} ({'local' if args.local else 'SLURM'}); "
          f"logs: {job.paths.stdout} and {job.paths.stderr}; results: {cfg.results_folder}", flush=True)
    if args.local:
        job.wait()
        if not job.paths.result_pickle.exists():
            raise UserError(f"local job {job.job_id} ended without finishing (see {job.paths.stderr}); "
                            "run the same command to go on from its last checkpoint")
        try:
            job.result()
        except Exception as exc:  # submitit re-raises the job's failure with its traceback text
            raise UserError(f"local job {job.job_id} failed ({type(exc).__name__}); see {job.paths.stderr}") \
                from None
        print(f"job {job.job_id} finished", flush=True)


def main(argv: tp.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radiodiff-resume")
    sub = parser.add_subparsers(dest="command", required=True)
    train_cmd = sub.add_parser("train", parents=[train_parser()], add_help=False,
                               help="train the first stage (if needed) and the LDM")
    train_cmd.set_defaults(func=cmd_train)
    submit_cmd = sub.add_parser("submit", parents=[train_parser()], add_help=False,
                                help="submit the training job to SLURM (submitit); it requeues itself "
                                     "until done")
    submit_cmd.add_argument("--local", action="store_true",
                            help="run the same job here through submitit's local executor, and wait")
    submit_cmd.set_defaults(func=cmd_submit)
    importer.register(sub)
    export.register(sub)
    dry_run.register(sub)
    doctor.register(sub)
    report.register(sub)
    convert_config.register(sub)
    evaluate.register(sub)
    for verb, status in EXIT_STATUS.items():
        sub.choices[verb].epilog = status
    args = parser.parse_args(argv)
    return run_command(args.func, args)


def run_command(func: tp.Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a sub-command (its own exit status, 0 when it returns None); a :class:`UserError` becomes
    one message and exit code 2."""
    setup_logging()
    try:
        status = func(args)
    except HaltError as exc:
        if is_main_process():
            print(f"halted: {exc}", file=sys.stderr)
        return EXIT_HALTED
    except UserError as exc:
        if is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StopRequested as exc:
        if is_main_process():
            print(f"stopped: {exc}; run the same command to resume", file=sys.stderr)
        return EXIT_STOPPED
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
