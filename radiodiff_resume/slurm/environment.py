"""What a process learns from SLURM: its place in a multi-task job, and how long the job has left.

One task per GPU (``srun``, or submitit's tasks) with torch's ``env://`` variables taken from
SLURM's, rather than ``srun`` + ``accelerate launch``: the launcher turns a trainer's exit
status 3 ("stopped after a checkpoint, requeue me") into its own failure status 1 (measured:
accelerate 1.15 / torch elastic), and dies of SIGUSR1, whose default action is to terminate.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import typing as tp

from radiodiff_resume.errors import UserError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_HOST = re.compile(r"(?:[^,\[]|\[[^\]]*\])+")
"""One host pattern of a node list: anything up to a comma outside brackets."""
_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """``node[1-3,7],gpu05`` → ``[node1, node2, node3, node7, gpu05]``, in Slurm's order (zero padding
    kept); several bracket groups in one name multiply out as ``scontrol show hostnames`` does:
    ``rack[1-2]-node[01-02]`` → ``rack1-node01, rack1-node02, rack2-node01, rack2-node02``."""
    hosts: list[str] = []
    for pattern in _HOST.findall(nodelist):
        parts = re.split(r"\[([^\]]*)\]", pattern)  # literal, ranges, literal, ranges, ..., literal
        choices = [[text] if i % 2 == 0 else _numbers(text, nodelist) for i, text in enumerate(parts)]
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    return hosts


def _numbers(ranges: str, nodelist: str) -> list[str]:
    """``007-009,012`` → ``[007, 008, 009, 012]``."""
    out = []
    for part in ranges.split(","):
        r = _RANGE.match(part)
        if r is None:
            raise ValueError(f"cannot read node list {nodelist!r} (range {part!r})")
        first, last = r.group(1), r.group(2) or r.group(1)
        out += [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    return out


def tasks_per_node(text: str) -> list[int]:
    """``SLURM_STEP_TASKS_PER_NODE``: ``2(x3),1`` → ``[2, 2, 2, 1]`` (one count per node, in order)."""
    counts: list[int] = []
    for part in text.split(","):
        m = _TASKS.match(part.strip())
        if m is None:
            raise ValueError(f"cannot read tasks per node {text!r} (part {part!r})")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


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
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    node = int(environ.get("SLURM_NODEID", "0"))
    # an uneven layout (``--ntasks=3`` on 2 nodes: ``2,1``) has its own count per node
    local = tasks_per_node(per_node)[node] if per_node else tasks // nodes
    return {
        "MASTER_ADDR": expand_nodelist(nodelist)[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ["SLURM_JOB_ID"]) % 40000),
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(local),
    }


def cpu_threads_from_slurm(environ: tp.Mapping[str, str]) -> int | None:
    """The CPUs SLURM gave this task (``SLURM_CPUS_PER_TASK``) when a task of a job step, unless
    ``OMP_NUM_THREADS`` already says how many threads to use."""
    cpus = environ.get("SLURM_CPUS_PER_TASK", "")
    if "OMP_NUM_THREADS" in environ or "SLURM_STEP_ID" not in environ or not cpus.isdigit() or int(cpus) < 1:
        return None
    return int(cpus)


def export_torch_env() -> None:
    """Set torch's distributed variables from SLURM's when ``srun`` started this task, and its CPU
    threads (:func:`use_task_cpus`)."""
    os.environ.update(torch_env_from_slurm(os.environ))
    use_task_cpus()


def use_task_cpus() -> None:
    """CPU threads = the task's CPUs in a job step (unless ``OMP_NUM_THREADS`` is set): unset, torch
    uses every core of the node, and tasks sharing a node slow each other down many times over
    (measured: 2.1 s a step against 0.13 s for two tasks on one 2-core host)."""
    threads = cpu_threads_from_slurm(os.environ)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch = sys.modules.get("torch")  # already imported: its thread pool is sized, so resize it
        if torch is not None:
            torch.set_num_threads(threads)


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


def show_job(job: str) -> dict[str, str] | None:
    """``scontrol show job -o``'s fields (``JobState``, ``Reason``, ``PreemptTime``, ``Restarts``);
    None when the controller does not answer or no scontrol is here."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    try:
        out = subprocess.run([scontrol, "show", "job", "-o", job], capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    fields: dict[str, str] = {}
    for key, value in re.findall(r"(?:^|\s)(\w+)=(\S*)", out.stdout):
        fields.setdefault(key, value)  # the first: the command line (Command=) comes late
    return fields


class Verdict(tp.NamedTuple):
    """Whether a job that stopped with a committed checkpoint goes back to the queue, and why."""

    requeue: bool
    why: str
    cause: str = "signal"
    """``time limit`` (the controller says ``Reason=TimeLimit``), ``preemption``, ``signal`` (a
    ``--signal`` ahead of the time limit, or an operator's), ``cancel`` or ``unknown``."""


def stop_verdict(info: tp.Mapping[str, str] | None, terminated: bool, restart_count: int) -> Verdict:
    """Requeue a stopped job, or leave it ended, from what the controller says now.

    Measured on Slurm 22.05 (``tests/slurm/test_cancel.py``, ``test_preemption.py``): ``scancel``
    makes the job ``COMPLETING`` with ``Reason=None`` at once, and the controller still accepts a
    requeue then — which silently undoes the cancel, whatever signal came first. A time limit is
    ``COMPLETING`` with ``Reason=TimeLimit``. A preemption with a ``GraceTime`` sends SIGTERM to the
    job steps (not to the batch shell) while the job stays ``RUNNING`` with ``PreemptTime`` set;
    Slurm requeues it only if it still runs when the grace time ends (a job that ends earlier is
    ``COMPLETED``), so a job that stopped in time requeues itself. ``terminated``: this process saw
    a SIGTERM; one that neither a time limit nor a preemption explains (``scancel --signal=TERM``)
    ends the job too. ``info`` None (no controller answer): requeue unless a SIGTERM came.
    """
    if info is None:
        return Verdict(not terminated, "the controller did not answer"
                       + ("; SIGTERM came: treated as a cancel" if terminated else ""), "unknown")
    if int(info.get("Restarts", "0") or 0) > restart_count:
        return Verdict(False, "already requeued (by Slurm when a preemption's grace time ran out, "
                              "or by an operator)", "unknown")
    state, reason = info.get("JobState", ""), info.get("Reason", "")
    if reason == "TimeLimit":
        return Verdict(True, "time limit", "time limit")
    if state in ("COMPLETING", "CANCELLED"):  # also a cancel during a preemption's grace time
        return Verdict(False, f"cancelled (scancel: JobState={state} Reason={reason or 'None'})", "cancel")
    if info.get("PreemptTime", "None") not in ("None", "Unknown", ""):
        return Verdict(True, f"preempted at {info['PreemptTime']}", "preemption")
    if terminated:
        return Verdict(False, "SIGTERM without a time limit or a preemption (scancel --signal=TERM)",
                       "cancel")
    return Verdict(True, "stop signal")


def restart_count() -> int:
    """How often this job was requeued before this run (``SLURM_RESTART_COUNT``)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def main(argv: tp.Sequence[str]) -> int:
    """``python -m radiodiff_resume.slurm.environment verdict JOB TERMINATED``: for the sbatch
    template; prints ``requeue: <why>`` (exit 0) or ``stay: <why>`` (exit 1)."""
    if len(argv) != 3 or argv[0] != "verdict" or argv[2] not in ("0", "1"):
        print("usage: python -m radiodiff_resume.slurm.environment verdict JOB_ID 0|1 (1: a SIGTERM came)",
              file=sys.stderr)
        return 2
    verdict = stop_verdict(show_job(argv[1]), argv[2] == "1", restart_count())
    print(f"{'requeue' if verdict.requeue else 'stay'}: {verdict.why}")
    return 0 if verdict.requeue else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
