"""``radiodiff-resume submit``: the training job through submitit, requeued until it is done.

What submitit pickles is :class:`TrainJob`: the resolved config as plain data, the working
folder and the training function (by name: the CLI passes ``radiodiff_resume.cli.train_in_job``, so
this layer never imports the run), nothing else. A requeued job builds everything again and finds its
state through checkpoint discovery, so it can never replay a stale model or trainer.

The stop is ours, not submitit's: submitit's own handler would call ``checkpoint()`` inside the
signal handler, on rank 0 only. :class:`TrainJob` replaces that handler with the flag-only one
(:mod:`radiodiff_resume.slurm.signals`); at the next step boundary all ranks save together,
then rank 0 requeues the job — ``scontrol requeue`` on SLURM (the job keeps its id, its log files
and its place in the accounting), the local controller's restart status under ``--local`` —
and every rank exits with status 3. ``checkpoint()`` still returns a fresh submission built
from the config, for a signal that reaches submitit's handler before ours is installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import typing as tp
from pathlib import Path

from radiodiff_resume.config import Config, build_config, to_dict
from radiodiff_resume.errors import EXIT_STOPPED, StopRequested, UserError
from radiodiff_resume.io import read_regular, write_text_atomic
from radiodiff_resume.slurm.environment import (
    Verdict,
    job_id,
    requeue,
    restart_count,
    show_job,
    stop_verdict,
    time_left_s,
    use_task_cpus,
)
from radiodiff_resume.slurm.signals import CANCEL, STOP

logger = logging.getLogger(__name__)

LEDGER = "requeues.json"
"""In the job's own log folder: how often the job was requeued, and why (time limit or not)."""
EARLY_SIGNAL_S = 90
"""Slurm may send the ``--signal`` up to 60 s before the lead it was asked for: a stop this close
to the lead counts as a time limit."""


class TrainJob:
    """The submitted callable: the config, the working folder and the function that trains."""

    def __init__(self, config: dict[str, tp.Any], cwd: str, train: tp.Callable[[Config], tp.Any]) -> None:
        self.config = config
        self.cwd = cwd
        self.train = train

    def __call__(self) -> None:
        import submitit

        STOP.install(self.config["slurm"]["signals"])  # replaces submitit's handlers: flag only
        # submitit's SIGCONT handler logs from inside the handler (a lock the interrupted code may hold);
        # the process continues on SIGCONT whatever its handler, so none is needed
        signal.signal(signal.SIGCONT, signal.SIG_DFL)
        os.chdir(self.cwd)
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # CUDA_VISIBLE_DEVICES stays: accelerate picks cuda:LOCAL_RANK among the node's GPUs.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        use_task_cpus()
        from radiodiff_resume.process import setup_logging

        setup_logging()
        cfg = build_config(self.config, source="the submitted job")
        try:
            self.train(cfg)
        except StopRequested as exc:
            logger.warning("%s", exc)
            if env.global_rank == 0:
                self.requeue(cfg, env, terminated=STOP.terminated or exc.reason == CANCEL)
            sys.exit(EXIT_STOPPED)  # SystemExit: submitit writes no result, the job is not over
        finally:
            STOP.ignore()

    def checkpoint(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        """A fresh submission of the same config (no state: the next run discovers it)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.cwd, self.train))

    def requeue(self, cfg: Config, env: tp.Any, terminated: bool) -> None:
        """Put the job back in the queue, unless the controller says it is being cancelled (or a
        SIGTERM came that no time limit or preemption explains: :func:`stop_verdict`), or it
        reached its time limit too often. ``terminated``: a SIGTERM reached this process."""
        from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

        job = job_id()
        if job is None:  # --local: no controller to ask; each stop counts as a time limit
            verdict = Verdict(not terminated, "SIGTERM ends a job", "time limit")
        else:
            verdict = stop_verdict(show_job(job), terminated, restart_count())
        if not verdict.requeue:
            logger.warning("not requeued: %s; the checkpoint is committed: submit the same command to "
                           "go on", verdict.why)
            return
        left = time_left_s(job) if job and verdict.cause == "signal" else None
        timed_out = verdict.cause == "time limit" or (left is not None and left <= cfg.slurm.signal_lead_s
                                                       + EARLY_SIGNAL_S)
        ledger_path = log_folder(cfg) / str(env.job_id) / LEDGER
        fresh = {"timeouts": 0, "other": 0}
        ledger = json.loads(read_regular(ledger_path)) if ledger_path.exists() else fresh
        if timed_out and ledger["timeouts"] >= cfg.slurm.max_num_timeout:
            logger.error("not requeued: the job reached its time limit %d times (slurm.max_num_timeout); "
                         "its checkpoint is committed: submit the same command to go on", ledger["timeouts"])
            return
        ledger["timeouts" if timed_out else "other"] += 1
        write_text_atomic(ledger_path, json.dumps(ledger) + "\n")
        logger.warning("requeueing job %s (%s; %d time-limit requeues of %d)", env.job_id,
                       "time limit" if timed_out else verdict.why, ledger["timeouts"],
                       cfg.slurm.max_num_timeout)
        if job is None:
            sys.exit(LOCAL_REQUEUE_RETURN_CODE)  # the local controller starts the tasks again
        requeue(job)


def log_folder(cfg: Config) -> Path:
    return Path(cfg.slurm.log_folder) if cfg.slurm.log_folder else cfg.results_folder / "slurm"


def make_executor(cfg: Config, local: bool) -> tp.Any:
    """A submitit AutoExecutor with the ``slurm.*`` settings."""
    import submitit

    s = cfg.slurm
    if not local and shutil.which("sbatch") is None:
        raise UserError("sbatch not found: submit needs a SLURM cluster (on this machine: "
                        "bash slurm/local_cluster.sh start), or use --local to run the job here")
    executor = submitit.AutoExecutor(folder=log_folder(cfg) / "%j", cluster="local" if local else "slurm",
                                     slurm_max_num_timeout=s.max_num_timeout)
    tasks = s.tasks_per_node or max(1, s.gpus_per_node)
    executor.update_parameters(
        name=s.job_name, timeout_min=s.time_min, nodes=s.nodes, tasks_per_node=tasks,
        gpus_per_node=s.gpus_per_node or None, cpus_per_task=s.cpus_per_task, mem_gb=s.mem_gb,
        slurm_partition=s.partition, slurm_signal_delay_s=s.signal_lead_s, slurm_account=s.account,
        slurm_qos=s.qos, slurm_constraint=s.constraint, slurm_setup=list(s.setup) or None,
        # --requeue: the job may be requeued (scontrol requeue, node failure); append: a requeued
        # run adds to the log files instead of truncating the previous runs' output.
        slurm_additional_parameters={"requeue": True, "open_mode": "append", **s.additional_parameters},
    )
    return executor


def submit(cfg: Config, train: tp.Callable[[Config], tp.Any], local: bool = False) -> tp.Any:
    """Submit the job that runs ``train(cfg)``; returns the submitit job."""
    cfg.results_folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(cfg, local)
    job = executor.submit(TrainJob(to_dict(cfg), os.getcwd(), train))
    template = log_folder(cfg) / "%j"  # submitit creates its folder pattern literally too
    if template.is_dir() and not any(template.iterdir()):
        template.rmdir()
    return job
