"""What a process learns from SLURM: its place in a multi-task job, and how long the job has left.

One task per GPU (``srun``, or submitit's tasks) with torch's ``env://`` variables taken from
SLURM's, rather than ``srun`` + ``accelerate launch``: the launcher turns a trainer's exit
status 3 ("stopped after a checkpoint, requeue me") into its own failure status 1 (measured:
accelerate 1.15 / torch elastic), and dies of SIGUSR1, whose default action is to terminate.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import typing as tp

from radiodiff_resume.errors import UserError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[1-3,7],gpu05`` → ``[node1, node2, node3, node7, gpu05]`` (zero padding kept)."""
    hosts: list[str] = []
    for group in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,\[]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", group)
        if m is None:
            hosts.append(group)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            r = _RANGE.match(part)
            if r is None:
                raise ValueError(f"cannot read node list {nodelist!r} (range {part!r})")
            first, last = r.group(1), r.group(2) or r.group(1)
            width = len(first)
            hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(first), int(last) + 1)]
    return hosts


def torch_env_from_slurm(environ: tp.Mapping[str, str]) -> dict[str, str]:
    """``MASTER_ADDR`` … ``LOCAL_RANK`` for a task that ``srun`` started, or ``{}`` when torch's
    variables are already set (torchrun, accelerate launch) or the step has a single task.

    Every task derives the same port from the job id, so no task has to tell the others.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_ID" not in environ:
        return {}
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if tasks <= 1:
        return {}
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
    return {
        "MASTER_ADDR": expand_nodelist(nodelist)[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ["SLURM_JOB_ID"]) % 40000),
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks // nodes),
    }


def export_torch_env() -> None:
    """Set torch's distributed variables from SLURM's when ``srun`` started this task."""
    os.environ.update(torch_env_from_slurm(os.environ))


def job_id() -> str | None:
    """This job's id (an array task's own id), None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID")


def parse_time_left(text: str) -> float | None:
    """Seconds in squeue's ``%L`` (``[D-]HH:MM:SS``, ``MM:SS``); None for UNLIMITED/NOT_SET."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if m is None:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def time_left_s(job: str) -> float | None:
    """Seconds until this job's time limit, as the controller sees it (None if unknown)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    out = subprocess.run([squeue, "-h", "-j", job, "-o", "%L"], capture_output=True, text=True,
                         timeout=60, check=False)
    return parse_time_left(out.stdout) if out.returncode == 0 else None


def requeue(job: str) -> None:
    """``scontrol requeue``: the job goes back to PENDING and restarts under the same id (Slurm
    ends the rest of the current run). Only called once the checkpoint is committed."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise UserError(
            f"cannot requeue SLURM job {job}: scontrol is not on PATH (in a container, bind-mount "
            "the host's Slurm tools); the checkpoint is committed: resubmit the same command")
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise UserError(
            f"scontrol requeue {job} failed ({out.stderr.strip() or out.returncode}); the job needs "
            "--requeue (or JobRequeue=1 on the cluster); the checkpoint is committed: resubmit the "
            "same command")
