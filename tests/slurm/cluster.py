"""Helpers for tests that run jobs on a real local SLURM cluster (``slurm/local_cluster.sh``).

``ensure_cluster(nodes)`` starts the cluster when needed (or skips the test with the reason and
how to start it by hand) and returns the environment SLURM clients need. ``sbatch``,
``job_info``, ``wait_for`` and ``hostnames`` are thin wrappers over the SLURM command-line
tools. There is no accounting on this cluster (``sacct`` does not work): the final state of a
job is read from ``scontrol show job``, which keeps finished jobs for ``MinJobAge`` (1 hour).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
HOW_TO = "to run them: sudo bash slurm/local_cluster.sh start --nodes 2, then pytest tests/slurm"

# Job states Slurm does not leave by itself.
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}
)

# Per session: nodes of the cluster known to be up (0: not checked / none) and the skip reason
# of a failed start, so that a missing cluster costs one attempt, not one per test.
_nodes_up = 0
_skip_reason: str | None = None


def slurm_root() -> Path:
    return Path(os.environ.get("RADIODIFF_SLURM_ROOT", "/var/tmp/radiodiff_resume-slurm"))


def cluster_env() -> dict[str, str]:
    """This process's environment plus ``SLURM_CONF`` of the local cluster."""
    env = dict(os.environ)
    env["SLURM_CONF"] = str(slurm_root() / "slurm.conf")
    return env


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=cluster_env(), capture_output=True, text=True, timeout=timeout
    )


def cluster_nodes() -> int:
    """Node count of the local cluster if it is up and healthy, else 0."""
    try:
        proc = _run_script("status", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    match = re.search(r"^nodes=(\d+)$", proc.stdout, re.MULTILINE)
    return int(match.group(1)) if proc.returncode == 0 and match else 0


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_cluster(nodes: int = 1) -> dict[str, str]:
    """Environment for SLURM clients, with a healthy local cluster of at least ``nodes`` nodes.

    Reuses a running cluster with at least ``nodes`` nodes; otherwise (re)starts it with
    ``nodes`` nodes, which ends the jobs of a smaller one. Skips the calling test when the
    cluster cannot start (not root, no packages, daemons failing); the reason holds the
    script's stderr tail.
    """
    global _nodes_up, _skip_reason
    if _nodes_up >= nodes:
        return cluster_env()
    if _skip_reason is not None:
        pytest.skip(_skip_reason)
    up = cluster_nodes()
    if up < nodes:
        try:
            proc = _run_script("start", "--nodes", str(nodes), timeout=900)  # may apt-get install
            detail = _tail(proc.stderr or proc.stdout)
            ok = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail, ok = repr(exc), False
        if not ok:
            reason = (
                f"no local SLURM cluster with {nodes} node(s): `bash slurm/local_cluster.sh start "
                f"--nodes {nodes}` failed:\n{detail}\n{HOW_TO}"
            )
            _skip_reason = reason
            pytest.skip(reason)
        up = nodes
    _nodes_up = up
    return cluster_env()


def sbatch(
    script: str | os.PathLike[str],
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    script_args: Sequence[str] = (),
) -> str:
    """Submit a batch job; return its id.

    ``script`` is the script's text (starting with ``#!``) or a path to it. ``args`` are sbatch
    options; ``script_args`` go to the script itself (after its path). ``cwd`` is the submission
    (and job working) folder, where ``slurm-<id>.out`` goes unless ``--output`` is given;
    default: a new temporary folder.
    """
    env = dict(env) if env is not None else cluster_env()
    if cwd is None:
        cwd = tempfile.mkdtemp(prefix="slurm-job-")
    cmd = ["sbatch", "--parsable", *args]
    stdin = None
    if isinstance(script, str) and script.startswith("#!"):
        if script_args:  # sbatch passes arguments only to a script file, not to one on stdin
            fd, path = tempfile.mkstemp(prefix="job-", suffix=".sh", dir=cwd)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            cmd += [path, *script_args]
        else:
            stdin = script
    else:
        cmd += [os.fspath(script), *script_args]
    proc = subprocess.run(cmd, input=stdin, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def parse_show_job(line: str) -> dict[str, str]:
    """``scontrol show job -o`` output → key → value.

    Values may contain spaces (``Command=``, ``Reason=``): a key starts only where a space is
    followed by ``Name=``.
    """
    fields: dict[str, str] = {}
    for match in re.finditer(r"(?:^|\s)([A-Za-z][\w/:]*)=(.*?)(?=\s+[A-Za-z][\w/:]*=|\s*$)", line.strip()):
        fields.setdefault(match.group(1), match.group(2))
    return fields


def job_info(job_id: str | int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``scontrol show job -o <id>`` as a dict (JobState, Restarts, ExitCode, NodeList, StdOut, ...)."""
    env = dict(env) if env is not None else cluster_env()
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], env=env, capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
    return parse_show_job(proc.stdout.strip().splitlines()[0])


def output_tail(info: Mapping[str, str], lines: int = 40) -> str:
    path = Path(info.get("StdOut", ""))
    if not info.get("StdOut") or not path.is_file():
        return f"(no output file {str(path)!r})"
    return _tail(path.read_text(errors="replace"), lines)


REQUEUE_GRACE_S = 30.0
"""How long a job may sit in a final state before a requeue counts as missing."""


def wait_for(
    job_id: str | int,
    states: set[str] | frozenset[str],
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    *,
    min_restarts: int = 0,
    poll: float = 0.25,
) -> dict[str, str]:
    """Wait until the job is in one of ``states`` with ``Restarts >= min_restarts``; return its info.

    Fails the test with the job's info and output tail on timeout, as soon as the job is in a
    final state not asked for (and has restarted ``min_restarts`` times: an older incarnation's
    end does not count), or when it has stayed in a final state for ``REQUEUE_GRACE_S`` without
    the restarts asked for (nothing requeued it).
    """
    deadline = time.monotonic() + timeout
    ended_at: float | None = None
    while True:
        info = job_info(job_id, env)
        state = info.get("JobState", "")
        restarts = int(info.get("Restarts", "0") or 0)
        if restarts >= min_restarts:
            if state in states:
                return info
            if state in TERMINAL_STATES:
                pytest.fail(
                    f"job {job_id} ended {state}, wanted {sorted(states)}: {info}\n"
                    f"--- output tail ---\n{output_tail(info)}"
                )
        ended_at = (ended_at or time.monotonic()) if state in TERMINAL_STATES else None
        if ended_at is not None and time.monotonic() - ended_at > REQUEUE_GRACE_S:
            pytest.fail(
                f"job {job_id} ended {state} after {restarts} restart(s) and was not requeued within "
                f"{REQUEUE_GRACE_S:.0f} s (wanted {sorted(states)} after {min_restarts}): {info}\n"
                f"--- output tail ---\n{output_tail(info)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} not in {sorted(states)} (Restarts >= {min_restarts}) after {timeout:.0f} s: "
                f"{info}\n--- output tail ---\n{output_tail(info)}"
            )
        time.sleep(poll)


def hostnames(nodelist: str, env: Mapping[str, str] | None = None) -> list[str]:
    """``node[1-2]`` → ``["node1", "node2"]`` (``scontrol show hostnames``)."""
    env = dict(env) if env is not None else cluster_env()
    proc = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True, timeout=30,
        check=True,
    )
    return proc.stdout.split()
