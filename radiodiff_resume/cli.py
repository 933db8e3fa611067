"""Command line: ``radiodiff-resume train --cfg configs/x.yaml [key=value ...]``.

User errors (bad config, missing files) print one message and exit 2, no traceback; a run
that halted to protect its state exits 4; a requested stop (checkpoint committed) exits 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing as tp

from radiodiff_resume.errors import HaltError, StopRequested, UserError

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3
"""Stopped on request after committing a checkpoint; run the same command to resume."""
EXIT_HALTED = 4
"""Halted to protect the run's state (guards exhausted, a save refused or failed): resuming as is
would meet the same problem, so a scheduler must not requeue it blindly."""


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO if _is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def train_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a conditional latent diffusion model (RadioDiff-style)."
    )
    parser.add_argument("--cfg", required=True, help="YAML config, e.g. configs/radio_tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.lr=1e-4")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from radiodiff_resume.config import load_config
    from radiodiff_resume.run import train

    train(load_config(args.cfg, args.overrides))


def main(argv: tp.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radiodiff-resume")
    sub = parser.add_subparsers(dest="command", required=True)
    train_cmd = sub.add_parser("train", parents=[train_parser()], add_help=False,
                               help="train the first stage (if needed) and the LDM")
    train_cmd.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    return run_command(args.func, args)


def run_command(func: tp.Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a sub-command; a :class:`UserError` becomes one message and exit code 2."""
    setup_logging()
    try:
        func(args)
    except HaltError as exc:
        if _is_main_process():
            print(f"halted: {exc}", file=sys.stderr)
        return EXIT_HALTED
    except UserError as exc:
        if _is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StopRequested as exc:
        if _is_main_process():
            print(f"stopped: {exc}; run the same command to resume", file=sys.stderr)
        return EXIT_STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
