"""Steps lost per stop and time to the first step after a requeue, on a real SLURM cluster.

Six jobs of the same config at the same time on the local cluster (``slurm/local_cluster.sh``), each
step paced to a fixed time (``tests/slurm/paced.py``). Two ``radiodiff-resume submit`` jobs,
interrupted at the same seeded random steps:

- **ours**: ``scancel --signal=USR2 <job>`` (what a preemption sends): the job stops at the next
  step boundary, commits a checkpoint, requeues itself and resumes from it;
- **baseline** (a job without the step-boundary save): the training process SIGKILLed in the
  middle of its step, then ``scontrol requeue <job>``: it resumes from its last periodic
  checkpoint.

and four through ``slurm/train.sbatch``, each stopped once: a time limit with ``--signal``, a time
limit without it (the job's own clock), a real preemption (partition ``preemptible``, GraceTime) and
a cancel after USR1 (it must stay cancelled). Each one's steps lost and last step → first step after
the requeue stand beside the SIGKILL → requeue baseline's of the same invocation.

Every figure comes from the jobs' own files (``metrics.jsonl``, ``events.jsonl``, submitit's
log) and is written to the ``bench_requeue`` section of ``bench/RESULTS.md``.

    python bench/bench_requeue.py                          # 3 preemptions per side (about 5 min)
    python bench/bench_requeue.py --preemptions 5 --steps 800 --seed 1 --out /tmp/r.md

See ``bench/README.md`` for what each side does and how to read the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' SLURM helpers and the paced denoiser (tests/slurm)

from results import cpu_model, write_section  # noqa: E402

from tests.slurm.cluster import job_info, sbatch  # noqa: E402
from tests.slurm.test_cancel import REQUEUE_WOULD_SHOW_S  # noqa: E402
from tests.slurm.test_clock_stop import template_without_signal  # noqa: E402
from tests.slurm.test_preemption import SLOT  # noqa: E402
from tests.slurm.test_requeue import job_env  # noqa: E402

CONFIG = REPO / "configs" / "radio_tiny.yaml"
CLUSTER = REPO / "slurm" / "local_cluster.sh"
SECTION = "bench_requeue"
EVERY = 100
"""checkpoint.every: the baseline's periodic checkpoints (its loss is visible against this)."""
GAP_MIN = 30
"""Each preemption comes 30 + U[0, EVERY) steps after the previous one: the job has trained a
few steps since it resumed, and the preemption's place in the checkpoint interval is uniform."""
AFTER = 10
"""Steps the last run trains past the step the job had reached before the last interruption; then
the bench ends the job (it is not trained to the end)."""
QUIET_S = 20
"""The queue must stay empty this long before a side starts."""
WAIT_S = 300
"""Longest wait for one thing (a step, a requeued run) before the bench gives up."""
STEP_S = 0.4
"""Every job trains the paced denoiser (``tests/slurm/paced.py``): its forwards start at least this far
apart, so six jobs at once on two cores train at the same pace whatever each one's neighbours do."""
LIMIT_MIN, LEAD_S = 3, 30
"""The time-limited jobs: ``--time=3``; the signal job asks for USR1 30 s ahead (Slurm sends it 30-60 s
ahead: it checks time limits every 30 s); the clock job keeps the default ``slurm.stop_margin_s``."""
SIDES = ("ours", "baseline")
STOPS = ("limit_signal", "limit_clock", "preempted", "cancelled")
"""The other ways a run is stopped, each one job through ``slurm/train.sbatch``, stopped once."""
PREEMPT_LATER = 60
"""The preemption comes this many steps after the first drawn step (24 s of paced steps): not while
ours, the baseline and the cancelled job stop and start up again at that step, beside it on two cores."""
ENDED = frozenset({"FAILED", "CANCELLED", "COMPLETED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"})
LABELS = {"ours": "ours (USR2 → step-boundary save → requeue)",
          "baseline": "baseline (SIGKILL → `scontrol requeue`)",
          "limit_signal": f"time limit, `--signal=B:USR1@{LEAD_S}` (`slurm.stop_margin_s=null`)",
          "limit_clock": "time limit, no `--signal`: the job's clock (`slurm.stop_margin_s` 60)",
          "preempted": "preemption: partition `preemptible` (GraceTime 60 s), an `urgent` job takes the slot",
          "cancelled": "cancel: `scancel --batch --signal=USR1`, then `scancel`"}
START_LINE = re.compile(
    r"submitit INFO \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\) - Starting with JobEnvironment")
BUDGET_LINE = re.compile(r"a step takes ([\d.]+) s and a checkpoint ([\d.]+) s")


# ----- the cluster ---------------------------------------------------------------------
def slurm_env() -> dict[str, str]:
    root = Path(os.environ.get("RADIODIFF_SLURM_ROOT", "/var/tmp/radiodiff_resume-slurm"))
    env = dict(os.environ)
    env["SLURM_CONF"] = str(root / "slurm.conf")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 60, check: bool = True) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ensure_cluster(env: dict[str, str]) -> str:
    """``local_cluster.sh status``; start it (2 nodes, as ``.ci/run``) only when it is down.
    Exits with a message when it cannot be started."""
    status = subprocess.run(["bash", str(CLUSTER), "status"], env=env, capture_output=True, text=True,
                            timeout=60)
    if status.returncode != 0:
        print("the local SLURM cluster is down: bash slurm/local_cluster.sh start --nodes 2", flush=True)
        if os.geteuid() != 0:
            raise SystemExit("bench_requeue: the local SLURM cluster is down and starting it needs root "
                             "(network namespaces, daemons): run `sudo bash slurm/local_cluster.sh start "
                             "--nodes 2`, then this bench again")
        try:
            start = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", "2"], env=env,
                                   capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SystemExit(f"bench_requeue: cannot start the local SLURM cluster: {exc!r}") from None
        if start.returncode != 0:
            tail = "\n".join((start.stderr or start.stdout).strip().splitlines()[-20:])
            raise SystemExit(f"bench_requeue: cannot start the local SLURM cluster (bash "
                             f"slurm/local_cluster.sh start --nodes 2 exited {start.returncode}):\n{tail}")
        status = subprocess.run(["bash", str(CLUSTER), "status"], env=env, capture_output=True, text=True,
                                timeout=60)
        if status.returncode != 0:
            raise SystemExit(f"bench_requeue: the local SLURM cluster started but is not healthy:\n"
                             f"{status.stdout}{status.stderr}")
    for tool in ("sbatch", "squeue", "scontrol", "scancel"):
        if shutil.which(tool, path=env["PATH"]) is None:
            raise SystemExit(f"bench_requeue: {tool} not found on PATH")
    return status.stdout


def queue(env: dict[str, str]) -> list[str]:
    """Every job in the queue, one ``id state workdir`` line each."""
    lines = run(["squeue", "-h", "-o", "%i %T %Z"], env).splitlines()
    return [line.strip() for line in lines if line.strip()]


def wait_idle(env: dict[str, str], timeout: float) -> float:
    """Wait until ``squeue`` has shown no job for QUIET_S seconds in a row (a test that requeues its
    job after each death leaves the queue empty for a moment only); returns the seconds waited."""
    start = time.monotonic()
    said, quiet_since = -1e9, None
    while True:
        jobs = queue(env)
        now = time.monotonic()
        if not jobs:
            quiet_since = quiet_since if quiet_since is not None else now
            if now - quiet_since >= QUIET_S:
                return now - start
        else:
            quiet_since = None
            if now - start > timeout:
                raise SystemExit(f"bench_requeue: the cluster is still busy after {timeout:.0f} s "
                                 f"(squeue: {'; '.join(jobs)}); run the bench when no other job runs")
            if now - start - said >= 30:
                print(f"waiting for an idle cluster ({len(jobs)} other job(s): {'; '.join(jobs[:4])}) "
                      f"[{now - start:.0f} s of at most {timeout:.0f} s]", flush=True)
                said = now - start
        time.sleep(1)


def slurmctld_log() -> Path:
    root = Path(os.environ.get("RADIODIFF_SLURM_ROOT", "/var/tmp/radiodiff_resume-slurm"))
    return root / "log" / "slurmctld.log"


def controller_times(job: str, since: float) -> tuple[list[float], list[float]] | None:
    """From slurmctld's log (ms resolution): when the job was started (each run) and requeued, from
    ``since`` on (job ids start again when a cluster's state is wiped); None when the log cannot be
    read."""
    try:
        text = slurmctld_log().read_text(errors="replace")
    except OSError:
        return None
    stamp = r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})\] "
    started = re.compile(stamp + rf"(?:sched: Allocate|sched/backfill: _start_job: Started) JobId={job}\b",
                         re.MULTILINE)
    requeued = re.compile(stamp + rf"Requeuing JobId={job}\b", re.MULTILINE)

    def epochs(pattern: re.Pattern[str]) -> list[float]:
        times = (local_epoch(m.group(1), "%Y-%m-%dT%H:%M:%S") + int(m.group(2)) / 1000
                 for m in pattern.finditer(text))
        return [t for t in times if t >= since]

    return epochs(started), epochs(requeued)


def local_epoch(text: str, fmt: str) -> float:
    """A local wall-clock time as written by Slurm or submitit, as an epoch."""
    return time.mktime(time.strptime(text, fmt))


# ----- the job's files -----------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, tp.Any]]:
    """Complete JSON lines only (a SIGKILL may cut the last one)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def last_metric(path: Path) -> dict[str, tp.Any] | None:
    """The newest complete line of ``metrics.jsonl``, reading only the file's tail."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return tp.cast(dict[str, tp.Any], json.loads(line))
        except json.JSONDecodeError:
            continue
    return None


def run_starts(log: Path) -> list[float]:
    """submitit's ``Starting with JobEnvironment`` line of each run, as epochs (the log is appended
    across requeues)."""
    if not log.exists():
        return []
    return [local_epoch(m.group(1), "%Y-%m-%d %H:%M:%S") + int(m.group(2)) / 1000
            for m in START_LINE.finditer(log.read_text(errors="replace"))]


def training_pids(folder: Path) -> list[int]:
    """The job's training processes (the python running submitit's ``_submit`` for this job
    folder; not the ``srun`` whose command line holds the same words)."""
    out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {folder}/"], capture_output=True,
                         text=True).stdout.split()
    pids = []
    for pid in out:
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if Path(argv0).name.startswith("python"):
            pids.append(int(pid))
    return pids


# ----- one side ------------------------------------------------------------------------
@dataclass
class Side:
    name: str
    folder: Path
    job: str = ""
    log_folder: Path = field(default_factory=Path)
    signals: list[float] = field(default_factory=list)
    """When each preemption was sent (USR2, or the SIGKILL)."""
    requeued: list[float] = field(default_factory=list)
    """Baseline: when the bench ran ``scontrol requeue`` (the job had ended FAILED)."""
    targets: list[int] = field(default_factory=list)
    slurm_starts: dict[int, tuple[float, str]] = field(default_factory=dict)
    """Restarts → (Slurm StartTime of that run, node)."""
    other_jobs: dict[str, set[str]] = field(default_factory=dict)
    """Other users' jobs seen in the queue while this side ran: id → states seen."""
    submitted: float = 0.0
    ended: float = 0.0
    load_after: float = 0.0
    helpers: list[str] = field(default_factory=list)
    """Other jobs this side submitted (the preemption's ``urgent`` job)."""
    final: dict[str, str] = field(default_factory=dict)
    """The cancelled job's controller view, ``REQUEUE_WOULD_SHOW_S`` after it ended."""

    @property
    def template(self) -> bool:
        """Submitted through ``slurm/train.sbatch`` (the sides of STOPS), not ``radiodiff-resume submit``."""
        return self.name in STOPS

    @property
    def root(self) -> Path:
        """The bench's folder: every job whose working directory lies below it is the bench's own."""
        return self.folder.parent

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.jsonl"

    @property
    def out_log(self) -> Path:
        return self.log_folder / f"{self.job}_0_log.out"

    @property
    def err_log(self) -> Path:
        if self.template:
            return self.folder / f"job-{self.job}.out"
        return self.log_folder / f"{self.job}_0_log.err"


def overrides(folder: Path, ae: Path, steps: int, cache_dir: str | None) -> list[str]:
    out = [
        f"trainer.results_folder={folder}",
        f"model.first_stage.ckpt_path={ae}",
        "trainer.val_batches=0",
        "trainer.log_freq=1",
        f"trainer.train_num_steps={steps}",
        f"trainer.save_and_sample_every={steps}",
        f"checkpoint.every={EVERY}",
        "slurm.time_min=30",
        "slurm.cpus_per_task=1",
        "model.unet.target=tests.slurm.paced.PacedUNet",
        f"model.unet.params.step_s={STEP_S}",
        "data.batch_size=4",
    ]
    if cache_dir:
        out.append(f"data.synthetic.cache_dir={cache_dir}")
    return out


def submit(side: Side, args: argparse.Namespace, env: dict[str, str], ae: Path) -> None:
    job_env = {**env, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "radiodiff_resume.cli", "submit", "--cfg", str(CONFIG),
           *overrides(side.folder, ae, args.steps, args.cache_dir)]
    proc = subprocess.run(cmd, env=job_env, cwd=side.folder.parent, capture_output=True, text=True,
                          timeout=120)
    m = re.search(r"submitted job (\d+) \(SLURM\); logs: (\S+)", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"submit failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    side.job = m.group(1)
    side.log_folder = Path(m.group(2)).parent


class Watch:
    """Polls one job: its files, its Slurm state, the queue (for other users' jobs)."""

    def __init__(self, side: Side, env: dict[str, str]) -> None:
        self.side, self.env = side, env
        self.last_poll = 0.0

    def poll_slurm(self, force: bool = False) -> dict[str, str]:
        now = time.monotonic()
        if not force and now - self.last_poll < 1.0:
            return {}
        self.last_poll = now
        info = job_info(self.side.job, self.env)
        if info.get("JobState") == "RUNNING" and info.get("StartTime", "Unknown") != "Unknown":
            restarts = int(info.get("Restarts", "0") or 0)
            if restarts not in self.side.slurm_starts:
                self.side.slurm_starts[restarts] = (local_epoch(info["StartTime"], "%Y-%m-%dT%H:%M:%S"),
                                                    info.get("NodeList", "?"))
        for line in queue(self.env):
            job_id, state, *workdir = line.split(maxsplit=2)
            if not (workdir and Path(workdir[0]).is_relative_to(self.side.root)):
                self.side.other_jobs.setdefault(job_id, set()).add(state)
        return info

    def fail(self, what: str) -> tp.NoReturn:
        info = job_info(self.side.job, self.env)
        log = self.side.err_log
        tail = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else ["(no log yet)"]
        raise RuntimeError(f"{self.side.name}: job {self.side.job} {what}: {info}\n"
                           + "\n".join(tail))

    def until(self, ready: tp.Callable[[], bool], what: str, poll: float = 0.02,
              may_end: bool = False, timeout: float = WAIT_S) -> None:
        """Poll ``ready`` until it holds; fail when the job ends (unless ``may_end``) or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not ready():
            info = self.poll_slurm()
            if info.get("JobState") in ENDED and not may_end:
                self.fail(f"ended {info['JobState']} while the bench waited until it {what}")
            if time.monotonic() > deadline:
                self.fail(f"never {what}")
            time.sleep(poll)

    def runs(self) -> int:
        return len(run_starts(self.side.out_log))

    def stepped_past(self, step: int, since: float) -> bool:
        last = last_metric(self.side.metrics)
        return last is not None and last["step"] >= step and last["time"] >= since

    def step_seconds(self) -> float:
        recent = read_jsonl(self.side.metrics)[-8:]
        diffs = [b["time"] - a["time"] for a, b in zip(recent, recent[1:], strict=False)
                 if b["step"] == a["step"] + 1]
        return statistics.median(diffs) if diffs else 0.25

    def new_run(self, index: int, past_step: int = 0) -> tuple[float, int]:
        """Wait until run ``index`` (0-based) started and trained a step past ``past_step``; returns its
        start and the last step the runs before it trained."""
        self.until(lambda: self.runs() > index, "started again")
        start = run_starts(self.side.out_log)[index]
        before = [m["step"] for m in read_jsonl(self.side.metrics) if m["time"] < start]
        self.until(lambda: self.stepped_past(past_step + 1, start),
                   f"trained past step {past_step} in run {index}")
        return start, before[-1] if before else 0


def sigkill_training(side: Side) -> float:
    pids = training_pids(side.folder)
    if not pids:
        raise RuntimeError(f"{side.name}: no training process of job {side.job} found to kill")
    when = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return when


def run_side(side: Side, args: argparse.Namespace, env: dict[str, str], ae: Path,
             targets: list[int], offsets: list[float]) -> None:
    side.folder.mkdir(parents=True)
    side.targets = targets
    side.submitted = time.time()
    submit(side, args, env, ae)
    print(f"{side.name}: job {side.job}, preemptions after steps {targets}", flush=True)
    watch = Watch(side, env)
    for i, target in enumerate(targets):
        since = run_starts(side.out_log)[i] if watch.runs() > i else 0.0
        watch.until(lambda t=target, s=since, n=i + 1: watch.stepped_past(t, s) and watch.runs() == n,
                    f"reached step {target}")
        time.sleep(offsets[i] * watch.step_seconds())  # a random moment inside the running step
        if side.name == "ours":
            side.signals.append(time.time())
            run(["scancel", "--signal=USR2", side.job], env)
        else:
            side.signals.append(sigkill_training(side))
            watch.until(lambda: job_info(side.job, env).get("JobState") == "FAILED", "ended FAILED",
                        poll=0.1, may_end=True)
            side.requeued.append(time.time())
            run(["scontrol", "requeue", side.job], env)
        _, last = watch.new_run(i + 1)
        resumed = next((e["step"] if e["event"] == "resumed" else 0 for e in
                        reversed(read_jsonl(side.folder / "events.jsonl"))
                        if e["event"] in {"resumed", "fresh_start"}), "?")
        print(f"  {side.name}: preemption {i + 1}/{len(targets)}: trained to step {last}, the next run "
              f"resumed from step {resumed}", flush=True)
        watch.poll_slurm(force=True)
    # The last run trains AFTER steps past the step the job had reached before its last interruption.
    _, last = watch.new_run(len(targets))
    watch.until(lambda: watch.stepped_past(last + AFTER, 0.0), f"trained past step {last + AFTER}")
    watch.poll_slurm(force=True)
    end_job(side, env)
    side.ended = time.time()


def submit_template(side: Side, args: argparse.Namespace, env: dict[str, str], ae: Path) -> None:
    """Submit the side's job through ``slurm/train.sbatch`` (the time limit, the partition and the
    signal as each scenario needs them), with the same config as the other sides."""
    side.folder.mkdir(parents=True)
    script, opts, extra = REPO / "slurm" / "train.sbatch", [f"--time={LIMIT_MIN}"], []
    if side.name == "limit_signal":
        opts.append(f"--signal=B:USR1@{LEAD_S}")
        extra.append("slurm.stop_margin_s=null")  # the signal alone: the clock would stop it first
    elif side.name == "limit_clock":
        script = template_without_signal(side.folder)
    elif side.name == "preempted":
        opts = ["-p", "preemptible", SLOT, "--time=20"]
    else:
        opts = ["--time=20"]
    side.submitted = time.time()
    side.job = sbatch(script, *opts, "--cpus-per-task=1", f"--job-name=bench-{side.name}",
                      f"--output={side.folder}/job-%j.out", env=job_env(env), cwd=side.folder,
                      script_args=["--cfg", str(CONFIG), *extra,
                                   *overrides(side.folder, ae, args.steps, args.cache_dir)])


def resumed_and_trained(side: Side) -> bool:
    """The job was requeued, resumed and trained a few steps since."""
    runs = event_runs(side)
    return len(runs) > 1 and runs[1].last_step is not None and runs[1].last_step >= runs[1].from_step + 3


def run_stop(side: Side, args: argparse.Namespace, env: dict[str, str], ae: Path, target: int,
             offset: float) -> None:
    """One of STOPS: submit, stop it the scenario's way (or let its time limit come), then wait until the
    requeued run trained a few steps (the cancel: until the job has stayed cancelled for
    ``REQUEUE_WOULD_SHOW_S``)."""
    submit_template(side, args, env, ae)
    side.targets = [target] if side.name in {"preempted", "cancelled"} else []
    print(f"{side.name}: job {side.job}" + (f", stopped after step {target}" if side.targets else ""),
          flush=True)
    watch = Watch(side, env)
    if side.targets:
        watch.until(lambda: watch.stepped_past(target, 0.0), f"reached step {target}", poll=0.05)
        time.sleep(offset * STEP_S)  # a random moment inside the running step
        side.signals.append(time.time())
        if side.name == "preempted":
            node = job_info(side.job, env)["NodeList"]
            side.helpers.append(sbatch("#!/bin/bash\ntrue\n", "-p", "urgent", SLOT, f"--nodelist={node}",
                                       f"--output={side.folder}/urgent-%j.out", env=env, cwd=side.folder))
        else:
            run(["scancel", "--batch", "--signal=USR1", side.job], env)
            run(["scancel", side.job], env)
    if side.name == "cancelled":
        def ended_or_back() -> bool:
            info = job_info(side.job, env)
            return info.get("JobState") in ENDED or info.get("Restarts", "0") != "0"

        watch.until(ended_or_back, "ended", poll=0.2, may_end=True)
        time.sleep(REQUEUE_WOULD_SHOW_S)
        side.final = job_info(side.job, env)
    else:
        watch.until(lambda: resumed_and_trained(side), "was requeued and trained again", poll=0.2,
                    timeout=2 * WAIT_S)
    print(f"  {side.name}: done", flush=True)
    watch.poll_slurm(force=True)
    side.final = side.final or job_info(side.job, env)
    end_job(side, env)
    side.ended = time.time()


def end_job(side: Side, env: dict[str, str]) -> None:
    """SIGKILL the training process, then cancel whatever is left of the job (a job of the template
    is only cancelled: it saves and stays cancelled)."""
    if side.helpers:
        run(["scancel", *side.helpers], env, check=False)
    if not side.job:
        return
    if side.template:
        run(["scancel", side.job], env, check=False)
    for pid in training_pids(side.folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = job_info(side.job, env).get("JobState", "")
        if state not in {"RUNNING", "COMPLETING"}:
            break
        time.sleep(0.2)
    run(["scancel", side.job], env, check=False)


# ----- analysis ------------------------------------------------------------------------
@dataclass
class RunInfo:
    index: int
    node: str
    slurm_start: float | None
    """slurmctld started the job for this run (its log, ms; else ``StartTime``, whole seconds)."""
    start: float
    """submitit's ``Starting with`` line: the training process is up."""
    kind: str
    """``fresh`` or ``resumed``."""
    from_step: int
    ready: float | None
    """The run's ``resumed`` / ``fresh_start`` event: checkpoint found and loaded (or none)."""
    first_step: float | None
    """The first metrics line: the first optimizer step is done."""
    last_step: int | None
    last_time: float | None
    """The last metrics line: where this run's training stopped."""
    stopped: dict[str, tp.Any] | None

    @property
    def to_first(self) -> float | None:
        return None if self.first_step is None else self.first_step - self.start


@dataclass
class Preemption:
    index: int
    target: int
    signal: float
    last_step: int
    """Last step the interrupted run trained (its last metrics line)."""
    committed: int | None
    """ours: the step the stop committed."""
    resumed_from: int
    resumed_kind: str
    stop_latency: float | None
    """ours: signal → ``stopped`` event (the step in flight finished, checkpoint committed)."""
    requeued: float | None
    """slurmctld's ``Requeuing`` of the job (ours: the job's own ``scontrol requeue``; baseline: the
    bench's, once the job had ended FAILED)."""
    restarted: float | None
    """slurmctld started the job again."""
    next_start: float
    """The next run's process start."""
    signal_to_start: float
    signal_to_back: float | None
    """Signal → the first step past ``last_step``: wall time the preemption cost in all."""
    gap: float | None
    """The interrupted run's last step → the next run's first step (the time no step was trained)."""

    @property
    def lost(self) -> int:
        return self.last_step - self.resumed_from


def analyse(side: Side) -> tuple[list[RunInfo], list[Preemption], dict[str, tp.Any]]:
    starts = run_starts(side.out_log)
    metrics = [m for m in read_jsonl(side.metrics) if m.get("stage") == "ldm"]
    events = [e for e in read_jsonl(side.folder / "events.jsonl") if e.get("stage") == "ldm"]
    bounds = [*starts, float("inf")]
    controller = controller_times(side.job, side.submitted - 1)
    runs: list[RunInfo] = []
    for r, start in enumerate(starts):
        lo, hi = start, bounds[r + 1]
        mine = [m for m in metrics if lo <= m["time"] < hi]
        evs = [e for e in events if lo <= e["time"] < hi]
        begin = next((e for e in evs if e["event"] in {"resumed", "fresh_start"}), None)
        slurm = side.slurm_starts.get(r)
        slurm_start = slurm[0] if slurm else None
        if controller is not None and r < len(controller[0]):
            slurm_start = controller[0][r]
        runs.append(RunInfo(
            index=r, node=slurm[1] if slurm else "?", slurm_start=slurm_start, start=start,
            kind="resumed" if begin and begin["event"] == "resumed" else "fresh",
            from_step=int(begin["step"]) if begin and begin["event"] == "resumed" else 0,
            ready=begin["time"] if begin else None,
            first_step=mine[0]["time"] if mine else None,
            last_step=mine[-1]["step"] if mine else None,
            last_time=mine[-1]["time"] if mine else None,
            stopped=next((e for e in evs if e["event"] == "stopped"), None),
        ))
    preemptions = []
    for i, sig in enumerate(side.signals):
        before, after = runs[i], runs[i + 1]
        last = before.last_step or 0
        back = next((m["time"] for m in metrics if m["time"] >= after.start and m["step"] > last), None)
        requeued = controller[1][i] if controller is not None and i < len(controller[1]) else None
        if requeued is None and side.name == "baseline":
            requeued = side.requeued[i]
        preemptions.append(Preemption(
            index=i + 1, target=side.targets[i], signal=sig, last_step=last,
            committed=int(before.stopped["step"]) if before.stopped else None,
            resumed_from=after.from_step, resumed_kind=after.kind,
            stop_latency=before.stopped["time"] - sig if before.stopped else None,
            requeued=requeued, restarted=after.slurm_start, next_start=after.start,
            signal_to_start=after.start - sig,
            signal_to_back=None if back is None else back - sig,
            gap=(None if after.first_step is None or before.last_time is None
                 else after.first_step - before.last_time),
        ))
    err = side.err_log.read_text(errors="replace") if side.err_log.exists() else ""
    budget = BUDGET_LINE.search(err)
    ledger_path = side.log_folder / "requeues.json"
    extra = {
        "stops": [e for e in events if e["event"] == "stopped"],
        "step_s": float(budget.group(1)) if budget else None,
        "save_s": float(budget.group(2)) if budget else None,
        "ledger": json.loads(ledger_path.read_text()) if ledger_path.exists() else None,
        "checkpoint_bytes": max((sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                                 for d in (side.folder / "checkpoints").glob("step-*")), default=0),
    }
    return runs, preemptions, extra


@dataclass
class EventRun:
    """One run of a job, from its files alone: it begins with its ``resumed`` / ``fresh_start`` event."""
    from_step: int
    ready: float
    first_step: float | None
    """Its first ``metrics.jsonl`` line (the first optimizer step done)."""
    last_step: int | None
    last_time: float | None
    """Its last ``metrics.jsonl`` line: where training stopped."""
    stopped: dict[str, tp.Any] | None


def event_runs(side: Side) -> list[EventRun]:
    """The job's runs, split by their ``resumed`` / ``fresh_start`` events (``trainer.log_freq=1``)."""
    events = [e for e in read_jsonl(side.folder / "events.jsonl") if e.get("stage") == "ldm"]
    metrics = [m for m in read_jsonl(side.metrics) if m.get("stage") == "ldm"]
    begins = [e for e in events if e["event"] in {"resumed", "fresh_start"}]
    runs = []
    for i, begin in enumerate(begins):
        hi = begins[i + 1]["time"] if i + 1 < len(begins) else float("inf")
        mine = [m for m in metrics if begin["time"] <= m["time"] < hi]
        runs.append(EventRun(
            from_step=int(begin["step"]) if begin["event"] == "resumed" else 0, ready=begin["time"],
            first_step=mine[0]["time"] if mine else None, last_step=mine[-1]["step"] if mine else None,
            last_time=mine[-1]["time"] if mine else None,
            stopped=next((e for e in events if e["event"] == "stopped" and begin["time"] <= e["time"] < hi),
                         None)))
    return runs


@dataclass
class StopResult:
    """One of STOPS, read back: the stop, what was lost, how long until the requeued run's first step."""
    side: Side
    reason: str
    last_step: int
    committed: int
    """The newest committed checkpoint after the stop (its ``manifest.json``)."""
    resumed_from: int | None
    """None: not requeued (no later run)."""
    stop_to_commit: float | None
    """Last step → the ``stopped`` event (checkpoint committed)."""
    gap: float | None
    """Last step → the requeued run's first step."""
    restarts: int
    state: str
    verdict: str
    """The template's own line: why it requeued or not."""

    @property
    def lost(self) -> int:
        """Steps trained and not kept: those after the checkpoint the next run resumed from (not
        requeued: after the newest committed checkpoint)."""
        return self.last_step - (self.committed if self.resumed_from is None else self.resumed_from)


def analyse_stop(side: Side) -> StopResult:
    runs = event_runs(side)
    first = runs[0] if runs else EventRun(0, 0.0, None, None, None, None)
    after = runs[1] if len(runs) > 1 else None
    saved = [int(d.name.split("-")[1]) for d in (side.folder / "checkpoints").glob("step-*")
             if (d / "manifest.json").exists()]
    log = side.err_log.read_text(errors="replace") if side.err_log.exists() else ""
    verdict = re.search(r"radiodiff_resume: stopped \((.*)", log)
    info = side.final or job_info(side.job, slurm_env())
    return StopResult(
        side=side, reason=str(first.stopped["reason"]) if first.stopped else "–",
        last_step=first.last_step or 0, committed=max(saved, default=0),
        resumed_from=None if after is None else after.from_step,
        stop_to_commit=(None if first.stopped is None or first.last_time is None
                        else first.stopped["time"] - first.last_time),
        gap=(None if after is None or after.first_step is None or first.last_time is None
             else after.first_step - first.last_time),
        restarts=int(info.get("Restarts", "0") or 0), state=info.get("JobState", "?"),
        verdict=verdict.group(1).strip() if verdict else "–")


# ----- report --------------------------------------------------------------------------
def _s(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


@dataclass
class SideResult:
    side: Side
    runs: list[RunInfo]
    pre: list[Preemption]
    extra: dict[str, tp.Any]

    def to_first(self, kind: str) -> list[float]:
        return [r.to_first for r in self.runs if r.kind == kind and r.to_first is not None]

    def ratio(self) -> float | None:
        fresh, resumed = _med(self.to_first("fresh")), _med(self.to_first("resumed"))
        return None if not fresh or resumed is None else resumed / fresh


WHAT = """\
## What each side does

Both sides: `radiodiff-resume submit --cfg configs/radio_tiny.yaml` (the LDM stage; a random
first stage written once by `write_untrained_first_stage`, shared by both) with
`{overrides}`, and `OMP_NUM_THREADS=1` in the job's environment; one task, one CPU.
`save_and_sample_every` = `train_num_steps` keeps DDIM sampling out of the measured part.
The preemption steps are drawn once from `--seed` (each {gap} + U[0, {every}) steps after the
previous one, so a preemption's place inside the {every}-step checkpoint interval is uniform) and
used for both sides; after the step is seen in `metrics.jsonl`, the bench waits a random
fraction of one step (also seeded) so that the interruption lands anywhere inside the running step.

- **ours** = `scancel --signal=USR2 <job>` (what a preemption with `preempt_send_user_signal`
  sends; no deadline follows it here): the job's handler sets the stop flag, the step in flight
  finishes, a verified checkpoint of that step is committed (event `stopped`), rank 0 runs
  `scontrol requeue`, the process exits 3; Slurm starts the job again ~11 s later (cred_expire +
  scheduler interval of this cluster) and the run resumes from that checkpoint.
- **baseline** = a job whose signal is not handled, i.e. killed: the training process
  (the `python -m submitit.core._submit` of this job, found with `pgrep -f` and its
  `/proc/<pid>/cmdline`) gets `SIGKILL` in the middle of its step, the job ends `FAILED`, the
  bench runs `scontrol requeue <job>` (what Slurm does itself after a node failure), and the run
  resumes from its last periodic checkpoint (`checkpoint.every={every}`), or from scratch when
  none was committed yet. `scancel --signal=KILL <job>` (with or without `--full`) is **not** a
  SIGKILL on Slurm: it ends the step with SIGTERM first (and SIGKILL only after `KillWait`), and
  our handler catches that SIGTERM and saves — tried while writing this bench.

Per preemption, from the files: **steps lost** = last step the interrupted run trained (its last
`metrics.jsonl` line; `trainer.log_freq=1`) − the step the next run resumed from (its `resumed`
event; 0 after a `fresh_start`). Per run: **process start** = submitit's `Starting with
JobEnvironment` line of that run in `<id>_0_log.out` (ms resolution; Python and submitit are
already imported), **checkpoint loaded** = the run's `resumed` / `fresh_start` event, **first
step** = the run's first `metrics.jsonl` line (written when the first optimizer step is done);
**Slurm start** and **requeued** = slurmctld's own log lines for the job (`sched: Allocate` /
`_start_job: Started`, `Requeuing`; ms resolution; without a readable log, `StartTime` of
`scontrol show job`, whole seconds). Every job runs at the same time (the bench waits for `squeue`
to stay empty for {quiet} s before it submits them): each has a CPU of the cluster, while the six
share this machine's two cores; its steps are paced, its start-ups compete. The ratios of this
table and the next are within one side (resumed runs against that side's own fresh start).
"""


def summary_rows(results: list[SideResult]) -> list[str]:
    rows = [
        "| side | preemptions | steps lost each | total | mean | process start → first step, fresh (s) | "
        "process start → first step, resumed (s) | resumed / fresh | signal → next process start (s) | "
        "wall time lost per preemption (s, mean) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        lost = [p.lost for p in res.pre]
        back = [p.signal_to_back for p in res.pre if p.signal_to_back is not None]
        ratio = res.ratio()
        rows.append(
            f"| {LABELS[res.side.name]} | {len(res.pre)} | {', '.join(map(str, lost)) or '–'} | "
            f"**{sum(lost)}** | {_s(statistics.mean(lost) if lost else None)} | "
            f"{_spread(res.to_first('fresh'))} | {_spread(res.to_first('resumed'))} | "
            f"{'–' if ratio is None else f'{ratio:.2f}×'} | "
            f"{_spread([p.signal_to_start for p in res.pre])} | "
            f"{_s(statistics.mean(back) if back else None)} |")
    return rows


SHORT = {"ours": "USR2 (a preemption's signal)", "limit_signal": "time limit with `--signal`",
         "limit_clock": "time limit, clock only (no `--signal`)",
         "preempted": "preemption with GraceTime 60 s", "cancelled": "cancel after USR1"}


@dataclass
class Compared:
    """One way of stopping, in the figures every way shares, beside the SIGKILL → requeue baseline."""
    name: str
    stops: int
    reasons: str
    lost: list[int]
    stop_to_commit: list[float]
    gaps: list[float]
    requeued: str


def compared(results: list[SideResult], stops: list[StopResult]) -> list[Compared]:
    out = []
    for res in results:
        reasons = ", ".join(sorted({str(e["reason"]) for e in res.extra["stops"]})) or "– (killed)"
        commit = [r.stopped["time"] - r.last_time for r in res.runs
                  if r.stopped is not None and r.last_time is not None]
        out.append(Compared(res.side.name, len(res.pre), reasons, [p.lost for p in res.pre], commit,
                            [p.gap for p in res.pre if p.gap is not None],
                            "by itself (`scontrol requeue`)" if res.side.name == "ours"
                            else "by the bench, once `FAILED` (`scontrol requeue`)"))
    for st in stops:
        requeued = (f"yes (Restarts {st.restarts})" if st.resumed_from is not None else
                    f"**no**: {st.state}, Restarts {st.restarts}, {REQUEUE_WOULD_SHOW_S:.0f} s after it ended"
                    if st.side.name == "cancelled" else f"no: {st.state}, Restarts {st.restarts}")
        out.append(Compared(st.side.name, 1, st.reason, [st.lost],
                            [] if st.stop_to_commit is None else [st.stop_to_commit],
                            [] if st.gap is None else [st.gap], requeued))
    return out


def baseline_of(rows: list[Compared]) -> tuple[float | None, float | None]:
    """The SIGKILL → requeue side's mean steps lost and median last step → first step after the requeue."""
    base = next((c for c in rows if c.name == "baseline"), None)
    if base is None:
        return None, None
    return (statistics.mean(base.lost) if base.lost else None), _med(base.gaps)


def compared_rows(rows: list[Compared]) -> list[str]:
    base_lost, base_gap = baseline_of(rows)
    out = [
        "| how the run was stopped | stops | stop reason (`stopped` event) | steps lost | mean, / SIGKILL → "
        "requeue | last step → checkpoint committed (s) | **last step → first step after the requeue (s)** | "
        "median / SIGKILL → requeue | requeued |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for c in rows:
        mean = statistics.mean(c.lost) if c.lost else None
        vs_lost = "–" if mean is None else f"{mean:.1f}" + ("" if base_lost is None or c.name == "baseline"
                                                            else f" / {base_lost:.1f}")
        gap = _med(c.gaps)
        vs_gap = ("–" if gap is None or not base_gap or c.name == "baseline"
                  else f"{gap:.1f} / {base_gap:.1f} = {gap / base_gap:.2f}×")
        lost = ", ".join(map(str, c.lost)) or "–"
        out.append(f"| {LABELS[c.name]} | {c.stops} | {c.reasons} | **{lost}** | "
                   f"{vs_lost} | {_spread(c.stop_to_commit) if c.stop_to_commit else '–'} | "
                   f"**{_spread(c.gaps)}** | {vs_gap} | {c.requeued} |")
    return out


def stops_reading(rows: list[Compared]) -> list[str]:
    """One sentence over the table: what the ways of stopping lost and cost, against the baseline."""
    base_lost, base_gap = baseline_of(rows)
    others = [c for c in rows if c.name != "baseline"]
    if base_lost is None or base_gap is None or not others:
        return []
    lost = sum(sum(c.lost) for c in others)
    gaps = [g for c in others for g in c.gaps]
    retrain = base_lost * STEP_S
    return [
        "",
        f"Reading: the {len(others)} other ways lost {_n(lost, 'step')} in all against {base_lost:.1f} per "
        f"SIGKILL on average; " + (f"their time without a step, {min(gaps):.1f}–{max(gaps):.1f} s, stands "
                                  f"against the baseline's {base_gap:.1f} s, to which the baseline adds "
                                  f"{base_lost:.1f} steps × {STEP_S} s ≈ {retrain:.0f} s of training again"
                                  if gaps else "none was requeued") + ".",
    ]


def headline(results: list[SideResult], stops: list[StopResult]) -> list[dict[str, tp.Any]]:
    """Rows for the headline table of ``python -m bench``: steps lost and the time until the first step
    after the requeue for every way a run is stopped, and resume latency, each against the SIGKILL →
    requeue side of this run."""
    by = {res.side.name: res for res in results}
    ours, base = by.get("ours"), by.get("baseline")
    if base is None:
        return []
    rows = compared(results, stops)
    base_lost, base_gap = baseline_of(rows)
    more = []
    for c in rows:
        if c.name == "baseline":
            continue
        mean = statistics.mean(c.lost) if c.lost else None
        if c.name == "cancelled":
            kept = c.requeued.startswith("**no**: CANCELLED")
            more.append(_row(f"steps lost by a {SHORT[c.name]}: after its last commit (SIGKILL → requeue: "
                             "since its last periodic checkpoint)", [mean, base_lost], "0 lost, not requeued",
                             None if mean is None else mean == 0 and kept,
                             ("not requeued" if kept else "REQUEUED") + f": {c.requeued.split(': ', 1)[-1]}",
                             "steps"))
            continue
        if c.name != "ours":
            more.append(_row(f"steps lost, {SHORT[c.name]} / SIGKILL → requeue", [mean, base_lost], "0 lost",
                             None if mean is None else mean == 0,
                             f"stop reason {c.reasons}; {mean if mean is not None else '–'} against "
                             f"{_s(base_lost)} steps", "steps"))
        gap = _med(c.gaps)
        more.append(_row(f"stop → first step after the requeue, {SHORT[c.name]} / SIGKILL → requeue",
                         [gap, base_gap], "–", None,
                         f"last step → first step of the requeued run: {_s(gap)} s against {_s(base_gap)} s"))
    if ours is None:
        return more
    lost = [statistics.mean([p.lost for p in res.pre]) if res.pre else None for res in (ours, base)]
    first = [_med(res.to_first("resumed")) for res in (ours, base)]
    back = [[p.signal_to_back for p in res.pre if p.signal_to_back is not None] for res in (ours, base)]
    wall = [statistics.mean(b) if b else None for b in back]

    row = _row
    return [
        row("steps lost per preemption, mean (USR2 → save → requeue / SIGKILL → requeue)", lost, "0 lost",
            lost[0] == 0 if lost[0] is not None else None,
            f"{lost[0]:.1f} against {lost[1]:.1f} steps" if None not in lost else "not measured", "steps"),
        row("resume latency: process start → first step of a resumed run", first, "–", None,
            f"{_s(first[0])} s against {_s(first[1])} s"),
        row("wall time lost per preemption (signal → back past the step reached)", wall, "–", None,
            f"{_s(wall[0])} s against {_s(wall[1])} s"),
        *more,
    ]


def _row(what: str, pair: list[float | None], aim: str, met: bool | None, note: str,
         unit: str = "s") -> dict[str, tp.Any]:
    a, b = pair
    return {"bench": SECTION, "what": what, "ours_s": a, "base_s": b, "unit": unit,
            "ratio": None if a is None or not b else a / b, "aim": aim, "met": met,
            "device": "cpu (local SLURM cluster)", "note": note}


def _diff(later: float | None, earlier: float | None, digits: int = 1) -> str:
    return "–" if later is None or earlier is None else f"{later - earlier:.{digits}f}"


def preemption_rows(results: list[SideResult]) -> list[str]:
    rows = [
        "| side | # | drawn step | last step trained | committed at the stop | resumed from | steps lost | "
        "signal → stopped | stopped → requeued | signal → requeued | requeued → job started again | "
        "→ process start | signal → back past the last step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in results:
        for p in res.pre:
            resumed = str(p.resumed_from) if p.resumed_kind == "resumed" else "0 (no checkpoint: fresh start)"
            stopped = None if p.stop_latency is None else p.signal + p.stop_latency
            rows.append(
                f"| {res.side.name} | {p.index} | {p.target} | {p.last_step} | "
                f"{'–' if p.committed is None else p.committed} | {resumed} | **{p.lost}** | "
                f"{_s(p.stop_latency, 2)} | {_diff(p.requeued, stopped, 2)} | "
                f"{_diff(p.requeued, p.signal, 2)} | "
                f"{_diff(p.restarted, p.requeued)} | {_diff(p.next_start, p.restarted)} | "
                f"{_s(p.signal_to_back)} |")
    return rows


def run_rows(results: list[SideResult]) -> list[str]:
    rows = [
        "| side | run | node | kind | Slurm start → process start (s) | "
        "process start → checkpoint loaded (s) | → first step (s) | **process start → first step (s)** | "
        "Slurm start → first step (s) | steps trained |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for res in results:
        for r in res.runs:
            kind = f"resumed from step {r.from_step}" if r.kind == "resumed" else "fresh"
            slurm_to_start = None if r.slurm_start is None else r.start - r.slurm_start
            ready = None if r.ready is None else r.ready - r.start
            ready_to_first = None if r.ready is None or r.first_step is None else r.first_step - r.ready
            slurm_first = (None if r.slurm_start is None or r.first_step is None
                           else r.first_step - r.slurm_start)
            first = r.from_step + 1 if r.last_step is not None else None
            steps = "–" if r.last_step is None else f"{first}–{r.last_step}"
            rows.append(
                f"| {res.side.name} | {r.index} | {r.node} | {kind} | {_s(slurm_to_start)} | "
                f"{_s(ready, 2)} | {_s(ready_to_first, 2)} | **{_s(r.to_first, 2)}** | {_s(slurm_first)} | "
                f"{steps} |")
    return rows


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _mean_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def reading(results: list[SideResult]) -> list[str]:
    by = {r.side.name: r for r in results}
    ours, base = by.get("ours"), by.get("baseline")
    out = ["## Reading", ""]
    if ours:
        lost = [p.lost for p in ours.pre]
        latency = [p.stop_latency for p in ours.pre if p.stop_latency is not None]
        step_s, save_s = ours.extra["step_s"], ours.extra["save_s"]
        budget = ""
        if step_s is not None and save_s is not None:
            budget = (f"; the job itself measured a step at {step_s:.2f} s and a save at {save_s:.2f} s "
                      f"(its `slurm.budget` log line), so a lead of {step_s + save_s:.1f} s covers one of "
                      "each")
        exact = sum(lost) == 0 and all(p.committed == p.last_step for p in ours.pre)
        out.append(
            f"- **ours**: {_n(sum(lost), 'step')} lost in {_n(len(lost), 'preemption')}"
            + (" — every stop committed the step the run had reached and the next run resumed exactly "
               "there" if exact else f" ({', '.join(map(str, lost))})")
            + f". From the signal to the committed checkpoint: {_spread(latency)} s (the step in flight "
            f"plus one save){budget}. With `slurm.signal_lead_s` (default 120 s) or a preemption's "
            "GraceTime longer than that, a preemption costs no training, only the requeue gap and the "
            "restart.")
    if base:
        lost = [p.lost for p in base.pre]
        mean = statistics.mean(lost) if lost else 0.0
        fresh = [p.index for p in base.pre if p.resumed_kind != "resumed"]
        out.append(
            f"- **baseline**: {_n(sum(lost), 'step')} lost in {_n(len(lost), 'preemption')} "
            f"(mean {mean:.1f}): each time the steps since its last periodic checkpoint "
            f"(`checkpoint.every={EVERY}`)"
            + (f"; preemption {', '.join(map(str, fresh))} came before the first checkpoint, so the run "
               "started over from step 0" if fresh else "")
            + f". For a kill at a uniform moment the expectation is half a checkpoint interval, "
            f"{EVERY / 2:.0f} steps; the lost steps are trained again after the restart.")
    if ours and base:
        back_o = _mean_of([p.signal_to_back for p in ours.pre])
        back_b = _mean_of([p.signal_to_back for p in base.pre])
        gap_o = _med([p.signal_to_start for p in ours.pre])
        gap_b = _med([p.signal_to_start for p in base.pre])
        if back_o is not None and back_b is not None and gap_o is not None and gap_b is not None:
            req_o = _mean_of([None if p.requeued is None else p.requeued - p.signal for p in ours.pre])
            req_b = _mean_of([None if p.requeued is None else p.requeued - p.signal for p in base.pre])
            wait_o = _mean_of([None if p.requeued is None or p.restarted is None else p.restarted - p.requeued
                               for p in ours.pre])
            wait_b = _mean_of([None if p.requeued is None or p.restarted is None else p.restarted - p.requeued
                               for p in base.pre])
            detail = ""
            if None not in (req_o, req_b, wait_o, wait_b):
                detail = (f": signal → requeued {req_o:.2f} s (ours) and {req_b:.2f} s (baseline), "
                          f"requeued → started again {wait_o:.1f} s and {wait_b:.1f} s (this cluster's "
                          "cred_expire + scheduler interval), then the process start")
            out.append(
                f"- Wall time from the interruption until training is past the step it had reached: "
                f"{back_o:.1f} s (ours) against {back_b:.1f} s (baseline) on average. Both include the "
                f"way back to a running process, {gap_o:.1f} s and {gap_b:.1f} s (median) from the "
                f"signal{detail}, and the start-up to the first step; the rest of the baseline's time is "
                "its retrained steps.")
    for res in (r for r in (ours, base) if r):
        ratio = res.ratio()
        if ratio is None:
            continue
        fresh = [r for r in res.runs if r.kind == "fresh"]
        resumed = [r for r in res.runs if r.kind == "resumed"]
        load_f = _mean_of([None if r.ready is None else r.ready - r.start for r in fresh])
        load_r = _mean_of([None if r.ready is None else r.ready - r.start for r in resumed])
        first_f = _mean_of([None if r.ready is None or r.first_step is None else r.first_step - r.ready
                            for r in fresh])
        first_r = _mean_of([None if r.ready is None or r.first_step is None else r.first_step - r.ready
                            for r in resumed])
        detail = ""
        if None not in (load_f, load_r, first_f, first_r):
            detail = (
                f" Means: process start → checkpoint loaded {load_r:.2f} s resumed against {load_f:.2f} s "
                "fresh (finding, verifying — hashes, keys, probe forward — and loading the checkpoint "
                f"against only looking for one); checkpoint loaded → first step done: {first_r:.2f} s "
                f"against {first_f:.2f} s (a fresh run first computes `scale_by_std` on a batch). The rest "
                "— Python and torch imports, data, building the model — is the same on both.")
        every_run = res.to_first("fresh") + res.to_first("resumed")
        verdict = ""
        if abs(ratio - 1) <= 0.1:
            verdict = (f" Less than 10% apart, while this side's {len(every_run)} start-ups range over "
                       f"{min(every_run):.1f}–{max(every_run):.1f} s: resuming costs no measurable start-up "
                       "time here.")
        out.append(
            f"- {res.side.name}: process start → first step {_spread(res.to_first('resumed'))} s resumed "
            f"against {_spread(res.to_first('fresh'))} s fresh: **{ratio:.2f}×**.{verdict}{detail}")
    step_s = (ours or base).extra["step_s"] if (ours or base) else None
    size = max((r.extra["checkpoint_bytes"] for r in results), default=0)
    if step_s is not None and base:
        out.append(
            f"- Scale: here a step takes {step_s:.2f} s and a checkpoint is {size / 1e6:.1f} MB, so the "
            f"baseline's half interval ({EVERY / 2:.0f} steps ≈ {EVERY / 2 * step_s:.0f} s) is of the order "
            "of the restart itself. On a real model, with minutes to hours between periodic checkpoints, the "
            "baseline loses half an interval per preemption and ours still nothing, as long as the lead "
            "covers one step and one save.")
    if ours:
        gaps = [p.requeued - p.signal - p.stop_latency for p in ours.pre
                if p.requeued is not None and p.stop_latency is not None]
        if gaps:
            out.append(
                f"- ours' `stopped` → slurmctld's `Requeuing`: {_spread(gaps)} s. The job's own `scontrol "
                "requeue` reaches slurmctld at once (slurmstepd logs `CANCELLED … DUE TO JOB REQUEUE` in the "
                "same second), but Slurm puts a running job back only once its processes have ended, and the "
                "training process spends 1–1.5 s in interpreter finalization after its last line of Python "
                "(see bench/README.md). The baseline's job had already ended FAILED when the bench requeued "
                "it.")
    return out


STOPS_WHAT = """\
## Every way a run is stopped

Six jobs of the same config, at the same time on the local cluster (each with its own CPU; every step
paced to {step_s} s by `tests.slurm.paced.PacedUNet`, so all train at the same pace; each job's figures
are its own). *ours* and *baseline* are those above. The other four go through `slurm/train.sbatch`
(`--cfg configs/radio_tiny.yaml` with the same overrides), each stopped once:

- **time limit with the signal**: `--time={limit}` and `--signal=B:USR1@{lead}`, with
  `slurm.stop_margin_s=null` so that the signal alone stops it; the template passes USR1 on to the trainer.
- **time limit, clock only**: `--time={limit}` and the template with its `#SBATCH --signal` line taken out
  (`template_without_signal` of `tests/slurm/test_clock_stop.py`): no signal comes; the job's own clock
  (`slurm.stop_margin_s`, 60 s by default) stops it.
- **preemption**: `-p preemptible --gres=slot:1` (GraceTime 60 s); once it has trained {later} steps past
  the first drawn step (and the same fraction of a step as the others: not at the moment the other
  jobs stop and start up again at that step), a job `-p urgent --gres=slot:1 --nodelist=<its node>`
  can start only by preempting it: Slurm sends SIGTERM to its step.
- **cancel**: at the first drawn step (and fraction), `scancel --batch --signal=USR1 <job>`, then
  `scancel <job>`. The job must stay cancelled: it is read back {would} s after it ended.

**Steps lost** = the last step the stopped run trained − the step the requeued run resumed from (the
cancelled job: − its newest committed checkpoint). **Last step → first step after the requeue** = the
stopped run's last `metrics.jsonl` line → the requeued run's first one: the time no step was trained
(the save, the requeue, Slurm's restart, the start-up). For the baseline the same span runs from its
last step before the SIGKILL; its lost steps are then trained again on top of it. The ratios divide by
the baseline of this same invocation.
"""


def write_results(path: Path, results: list[SideResult], args: argparse.Namespace,
                  meta: dict[str, tp.Any], stops: list[StopResult]) -> None:
    import torch

    rows = compared(results, stops)
    sides = [r.side for r in results] + [st.side for st in stops]
    head = [
        "# Requeue benchmark: steps lost per stop, time to the first step after a requeue",
        "",
        "Generated by `bench/bench_requeue.py`; this section is replaced on every run. Every job ran in",
        "the same invocation on the local SLURM cluster (`slurm/local_cluster.sh`), all at the same time,",
        "with the same config; ours and the baseline with the same seeded preemption steps.",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} CPU cores; cluster: "
        f"{meta['nodes']} (nodes are network namespaces of this one machine, sharing its cores and disk)",
        f"- 1-minute load average: {args.load_before:.2f} at the start (after waiting {meta['waited']:.0f} s "
        "for an empty queue), "
        + ", ".join(f"{side.load_after:.2f} when {side.name} was done" for side in sides)
        + " (six jobs share the two cores: paced steps keep their pace, start-ups compete)",
        "- other jobs (not this bench's) seen in the queue during the timed part: "
        + ("; ".join(f"while {side.name} ran: " + ", ".join(
            f"job {j} ({'/'.join(sorted(st))})" for j, st in sorted(side.other_jobs.items()))
            for side in sides if side.other_jobs) or "none"),
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, submitit "
        f"{meta['submitit']}, {meta['slurm']}",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}` ({args.preemptions} "
        f"preemptions per side at steps {results[0].side.targets if results else []}, seed {args.seed}, "
        f"`trainer.train_num_steps={args.steps}`; whole run {meta['total_s']:.0f} s)",
        "- jobs: " + ", ".join(f"{side.name} {side.job}" for side in sides)
        + "; requeue ledgers (`requeues.json`): "
        + ", ".join(f"{r.side.name} {json.dumps(r.extra['ledger'])}" for r in results),
        "- aim (from the issue): 0 steps lost per preemption when the lead time covers one step plus one "
        "save; every stop fits its window; a cancel stays cancelled",
        "",
        "## Steps lost and time to the first step after the requeue, every way a run is stopped",
        "",
        "Steps lost: each stop's, then their mean against the SIGKILL → requeue baseline's. Seconds: the "
        "median over stops, min–max in brackets.",
        "",
        *compared_rows(rows),
        "",
        *[f"- {st.side.name} (job {st.side.job}): the template's own line: `stopped ({st.verdict}`"
          for st in stops],
        *stops_reading(rows),
        "",
        "## Summary",
        "",
        "Times in seconds: the median over runs (or preemptions), min–max in brackets; resumed / fresh is "
        "the ratio of the medians; wall time lost = signal → back past the step reached before it (mean).",
        "",
        *summary_rows(results),
        "",
    ]
    shown = [o for o in overrides(Path("<results>"), Path("<ae>"), args.steps, None)
             if not o.startswith(("trainer.results_folder", "model.first_stage"))]
    what = WHAT.format(overrides=" ".join(shown), gap=GAP_MIN, every=EVERY, quiet=QUIET_S)
    body = [
        what,
        STOPS_WHAT.format(step_s=STEP_S, limit=LIMIT_MIN, lead=LEAD_S, would=REQUEUE_WOULD_SHOW_S,
                          later=PREEMPT_LATER),
        "## Per preemption",
        "",
        "Seconds. The signal is the bench's `scancel --signal=USR2` (ours) or `SIGKILL` (baseline); "
        "*stopped* is the `stopped` event (checkpoint committed), *requeued* and *job started again* are "
        "slurmctld's, *process start* is submitit's line in the next run, *back past the last step* is "
        "the first step after the restart beyond the last step trained before the interruption.",
        "",
        *preemption_rows(results),
        "",
        "## Per run",
        "",
        "Run 0 of each side is its fresh start; every later run was started by a requeue.",
        "",
        *run_rows(results),
        "",
        *reading(results),
    ]
    write_section(path, SECTION, "\n".join(head + body))



# ----- main ----------------------------------------------------------------------------
def draw_schedule(preemptions: int, seed: int) -> tuple[list[int], list[float]]:
    """Steps after which each preemption comes, and the fraction of a step waited then."""
    rng = random.Random(seed)
    targets, step = [], 0
    for _ in range(preemptions):
        step += GAP_MIN + rng.randrange(EVERY)
        targets.append(step)
    return targets, [rng.random() for _ in range(preemptions)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preemptions", type=int, default=3, help="preemptions per side (default 3)")
    parser.add_argument("--steps", type=int, default=600,
                        help="trainer.train_num_steps of the jobs (default 600); it must leave room for "
                             f"every preemption ({GAP_MIN}–{GAP_MIN + EVERY - 1} steps apart) and {AFTER} "
                             "steps after the last one; the jobs are ended there, not run to the end")
    parser.add_argument("--seed", type=int, default=0, help="seed of the preemption steps (default 0)")
    parser.add_argument("--sides", nargs="+", choices=SIDES + STOPS, default=list(SIDES + STOPS),
                        help="which jobs to run, all at once (default: all six)")
    parser.add_argument("--idle-timeout", type=float, default=900,
                        help="longest wait for other jobs to leave the queue, in seconds (default 900)")
    parser.add_argument("--cache-dir", default=None,
                        help="synthetic data cache (default: the config's, ~/.cache/radiodiff_resume)")
    parser.add_argument("--workdir", default=None,
                        help="where the jobs' temp folder goes (default: the system temp; the cluster's "
                             "nodes must see it at the same path)")
    parser.add_argument("--keep", action="store_true", help="keep the jobs' folders (always kept on failure)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                        help="results file; only its bench_requeue section is replaced "
                             "(default bench/RESULTS.md)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="also write the headline rows as JSON here (for `python -m bench`)")
    args = parser.parse_args(argv)
    if args.preemptions < 1:
        parser.error("--preemptions must be >= 1")
    targets, offsets = draw_schedule(args.preemptions, args.seed)
    if targets[-1] + AFTER + 5 > args.steps:
        parser.error(f"--steps {args.steps} leaves no room: the preemptions drawn come after steps "
                     f"{targets}; use --steps {targets[-1] + AFTER + 20} or more")

    env = slurm_env()
    status = ensure_cluster(env)
    nodes = ", ".join(f"{n} ({c} CPUs)" for n, c in
                      (line.split() for line in run(["sinfo", "-h", "-N", "-o", "%N %c"], env).splitlines()
                       if line.strip()))
    nodes = nodes or status.strip().splitlines()[0]
    waited = wait_idle(env, args.idle_timeout)
    args.load_before = os.getloadavg()[0]

    import submitit

    from radiodiff_resume.build import write_untrained_first_stage
    from radiodiff_resume.config import load_config

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="radiodiff-bench-requeue-", dir=args.workdir))
    ae = root / "ae.safetensors"
    cfg = load_config(CONFIG, overrides(root / "check", ae, args.steps, args.cache_dir))
    write_untrained_first_stage(cfg)
    sides = [Side(name, root / name) for name in args.sides]
    errors: list[BaseException] = []

    def drive(side: Side) -> None:
        try:
            if side.template:
                later = PREEMPT_LATER if side.name == "preempted" else 0
                run_stop(side, args, env, ae, targets[0] + later, offsets[0])
            else:
                run_side(side, args, env, ae, targets, offsets)
            side.load_after = os.getloadavg()[0]
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread below
            errors.append(exc)

    failed = True
    try:
        # All at once: the template's quick sbatch submissions first, then the two `submit`s (torch imports).
        threads = [threading.Thread(target=drive, args=(side,), name=side.name, daemon=True)
                   for side in sorted(sides, key=lambda side: not side.template)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        failed = False
    finally:
        for side in sides:
            try:
                end_job(side, env)
            except Exception as exc:  # noqa: BLE001 - keep the first error visible
                print(f"{side.name}: could not end job {side.job}: {exc!r}", file=sys.stderr)
        if failed or args.keep:
            print(f"job folders kept in {root}", file=sys.stderr)
    results = [SideResult(side, *analyse(side)) for side in sides if not side.template]
    stops = [analyse_stop(side) for side in sides if side.template]
    meta = {
        "nodes": nodes, "waited": waited, "submitit": submitit.__version__,
        "slurm": run(["scontrol", "--version"], env).strip(), "total_s": time.perf_counter() - start,
    }
    write_results(args.out, results, args, meta, stops)
    if args.summary:
        args.summary.write_text(json.dumps(headline(results, stops), indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    for res in results:
        lost = [p.lost for p in res.pre]
        ratio = res.ratio()
        print(f"{res.side.name}: steps lost {lost} (total {sum(lost)}); process start → first step fresh "
              f"{_spread(res.to_first('fresh'))} s, resumed {_spread(res.to_first('resumed'))} s"
              + ("" if ratio is None else f" ({ratio:.2f}x)"))
    for st in stops:
        print(f"{st.side.name}: stop reason {st.reason}, steps lost {st.lost}, last step → first step after "
              f"the requeue {_s(st.gap)} s, {st.state} after {st.restarts} restart(s)")
    print(f"wrote the {SECTION} section of {args.out} ({meta['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
