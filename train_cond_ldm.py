"""RadioDiff-compatible entry point: ``accelerate launch train_cond_ldm.py --cfg configs/x.yaml``."""

import sys

from radiodiff_resume.cli import cmd_train, run_command, train_parser

if __name__ == "__main__":
    sys.exit(run_command(cmd_train, train_parser("train_cond_ldm.py").parse_args()))
