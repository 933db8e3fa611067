"""Hostile files in a results folder: links, FIFOs, devices and garbage where a run keeps its own files.

Each trial takes its own copy of a real trained run, puts one hostile thing in place and runs the real
CLI command (``python -m radiodiff_resume.cli``) in a subprocess, under a timeout and a memory limit.
Handled means: the exit code promised; a user error is one ``error:`` line naming the file, with no
traceback; what a link points to is left untouched, byte for byte; no hang.

Adding a trial: write ``def my_trial(s: Setup) -> list[str]`` that prepares ``s.results``, runs
``s.run(...)`` and returns the problems found (none: handled), then add ``Trial("what", my_trial)`` to
``TRIALS``. ``Outcome.problems`` checks exit code, message and traceback; ``Setup.outside`` holds
link targets, ``Setup.fingerprint`` tells whether they changed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.checkpoint.helpers import STEP2, STEP4, read_manifest, reseal, rewrite_tensors, write_manifest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180.0
"""A command that has not ended by then hangs (the slowest here, a 4-step train, takes about 10 s)."""
MEMORY_LIMIT = 4 << 30
"""Address space of a command (one takes about 1.1 GiB): reading ``/dev/zero`` fails instead of
exhausting the machine."""


@dataclass
class Outcome:
    """How one command ended; ``code`` None: killed after the timeout."""

    command: str
    code: int | None
    stdout: str
    stderr: str

    def problems(self, code: int, mentions: str | None = None) -> list[str]:
        """What is wrong for a command that should exit with ``code``; with ``mentions``, the
        ``error:`` line (exit 2) or the log must name it."""
        if self.code is None:
            return [f"{self.command}: hung (killed after {TIMEOUT_S:.0f} s)"]
        found = []
        if self.code != code:
            found.append(f"{self.command}: exit {self.code}, expected {code}: {self.tail()}")
        if "Traceback (most recent call last)" in self.stderr + self.stdout:
            found.append(f"{self.command}: traceback: {self.tail()}")
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        if code == 2 and len(errors) != 1:
            found.append(f"{self.command}: {len(errors)} error lines, expected one: {self.tail()}")
        text = errors[0] if code == 2 and errors else self.stderr + self.stdout
        if mentions is not None and mentions not in text:
            found.append(f"{self.command}: does not name {mentions}: {self.tail()}")
        return found

    def tail(self) -> str:
        lines = (self.stderr or self.stdout).strip().splitlines()
        return " | ".join(lines[-3:])[-600:]


@dataclass
class Setup:
    """One trial's private copy of the golden run."""

    results: Path
    """The copy: its config's ``trainer.results_folder``."""
    cfg: Path
    outside: Path
    """A folder outside the results folder, for what links point at."""

    def run(self, command: str, *extra: str, env: tp.Mapping[str, str] | None = None) -> Outcome:
        """``train`` / ``dry-run`` with this run's config, ``report`` of this results folder (its PNG
        outside), with ``extra`` arguments."""
        if command == "report":
            args = ["report", str(self.results), "--out", str(self.outside / "report.png"), *extra]
        else:
            args = [command, "--cfg", str(self.cfg), *extra]
        return cli(args, env)

    def fingerprint(self) -> dict[str, str]:
        """sha256 of every regular file under ``outside`` (never opening anything else)."""
        found = {}
        for p in sorted(self.outside.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name != "report.png":
                found[str(p.relative_to(self.outside))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return found


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def cli(args: list[str], env: tp.Mapping[str, str] | None = None) -> Outcome:
    """``python -m radiodiff_resume.cli *args`` in its own session, killed (with its children) after
    the timeout; SLURM's variables only where ``env`` gives them."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "radiodiff_resume.cli", *args], cwd=REPO, env=full,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=_limits)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return Outcome(" ".join(args[:1]), code, out, err)


# ----- hostile things ------------------------------------------------------------------------------


def devzero_link(path: Path, s: Setup) -> tp.Callable[[], list[str]]:
    """``path`` → ``/dev/zero`` (endless bytes); the check says whether the link is still there."""
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")
    return lambda: [] if path.is_symlink() and os.readlink(path) == "/dev/zero" else [f"{path} was replaced"]


def fifo(path: Path, s: Setup) -> tp.Callable[[], list[str]]:
    """``path`` a FIFO nobody writes to (a reader blocks forever)."""
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return lambda: [] if stat.S_ISFIFO(os.lstat(path).st_mode) else [f"{path} was replaced"]


def file_link(path: Path, s: Setup) -> tp.Callable[[], list[str]]:
    """``path`` → a regular file outside the run, whose bytes must not change."""
    target = s.outside / f"target-of-{path.name.lstrip('.')}"
    target.write_bytes((path.read_bytes() if path.is_file() else b"") or b"precious, not the run's\n")
    path.unlink(missing_ok=True)
    path.symlink_to(target)
    before = s.fingerprint()
    return lambda: [] if s.fingerprint() == before and path.is_symlink() else [f"{target} was changed"]


def deep_json(path: Path, s: Setup) -> tp.Callable[[], list[str]]:
    """A line nested 100000 deep appended (parsing it recursively overflows the stack)."""
    with path.open("ab") as f:
        f.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    return lambda: []


@dataclass(frozen=True)
class Hostile:
    """A way to make a path hostile: ``make(path, setup)`` returns the check that it is still as made."""

    label: str
    make: tp.Callable[[Path, Setup], tp.Callable[[], list[str]]]


DEV_ZERO = Hostile("a link to /dev/zero", devzero_link)
FIFO = Hostile("a FIFO", fifo)
FILE_LINK = Hostile("a link to a file outside", file_link)
DEEP = Hostile("with a line nested too deep", deep_json)


# ----- trials --------------------------------------------------------------------------------------


def lock_trial(s: Setup, make: Hostile, command: str) -> list[str]:
    """A ``.lock`` that is not a regular file: refused with one line naming it, never followed or read."""
    lock = s.results / ".lock"
    check = make.make(lock, s)
    return s.run(command).problems(2, ".lock") + check()


def file_trial(s: Setup, name: str, make: Hostile, command: str, code: int, slurm: bool = False) -> list[str]:
    """``name`` in the results folder made hostile; ``command`` exits ``code`` (not 0: naming the file;
    dry-run reports what a real resume would refuse as a failed check, exit 1). ``slurm``: as a SLURM
    job, where the crash-loop ledger ``restarts.json`` is read."""
    path = s.results / name
    check = make.make(path, s)
    # a job id no controller has (scontrol's ids are 32-bit): never a real interactive job on a
    # shared cluster, where the crash-loop brake would stay inert; unknown to it → counted as batch
    env = {"SLURM_JOB_ID": "4294967290"} if slurm else None
    return s.run(command, env=env).problems(code, name if code else None) + check()


def deep_line_trial(s: Setup, name: str) -> list[str]:
    """A line nested too deep to parse in a log: the report skips and counts it (exit 0)."""
    deep_json(s.results / name, s)
    outcome = s.run("report")
    problems = outcome.problems(0)
    if not re.search(rf"{re.escape(name)}: 1 unreadable line", outcome.stdout):
        problems.append(f"report does not count the unreadable line of {name}: {outcome.tail()}")
    return problems


def results_folder_trial(s: Setup, folder: str) -> list[str]:
    """``trainer.results_folder`` that cannot be a folder: one line, exit 2, the file untouched."""
    blocker = s.outside / "a-file"
    blocker.write_text("not a results folder\n")
    before = s.fingerprint()
    where = folder.replace("{file}", str(blocker))
    problems = s.run("train", f"trainer.results_folder={where}").problems(2, where)
    return problems + ([] if s.fingerprint() == before else [f"{blocker} was changed"])


def step_link_trial(s: Setup, name: str) -> list[str]:
    """Checkpoint folder ``name`` replaced by a link to its copy outside: skipped with a warning, never
    followed for writing or deletion; training on past it (saves, retention) and every later start
    work."""
    folder = s.results / "checkpoints" / name
    copy = s.outside / name
    shutil.move(folder, copy)
    folder.symlink_to(copy, target_is_directory=True)
    before = s.fingerprint()
    more = ("trainer.train_num_steps=8", "checkpoint.every=2", "checkpoint.keep_last=2")
    problems = s.run("train", *more).problems(0, f"{folder} is a symbolic link")
    problems += s.run("train", *more).problems(0)
    if s.fingerprint() != before:
        problems.append(f"the link's target {copy} was changed")
    links = [p for p in (s.results / "checkpoints").rglob("*") if p.is_symlink()]
    if not any(os.readlink(p) == str(copy) for p in links):
        problems.append(f"the link {folder} is gone")
    return problems


def stored_target_trial(s: Setup) -> list[str]:
    """The newest checkpoint's ``config.yaml`` resealed (file record, ``config_hash``, checksum) to plug
    in ``os.system`` as the datasets, with a running statistic to repair: ``doctor --fix`` refuses in one
    line naming the key and the target (exit 2), and the command never runs."""
    ckpt = s.results / "checkpoints" / STEP4
    marker = s.outside / "os-system-ran"
    rewrite_tensors(ckpt, "model", lambda t: next(v for k, v in sorted(t.items())
                                                  if k.endswith("running_var")).fill_(float("inf")))
    raw = yaml.safe_load((ckpt / "config.yaml").read_text())
    for split in ("train", "validation"):
        raw["data"][split] = {"target": "os.system", "params": {"command": f"touch {marker}"}}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(raw))
    reseal(ckpt, "config.yaml")
    config_hash = hashlib.sha256((ckpt / "config.yaml").read_bytes()).hexdigest()[:16]
    write_manifest(ckpt, {**read_manifest(ckpt), "config_hash": config_hash})
    problems = cli(["doctor", str(ckpt), "--fix"]).problems(2, "data.train.target: 'os.system'")
    return problems + ([f"os.system ran: {marker} exists"] if marker.exists() else [])


def negative_moment_trial(s: Setup) -> list[str]:
    """A negative Adam ``exp_avg_sq`` resealed into the newest checkpoint: ``train`` quarantines it as
    damage and goes on from the previous one to the end (exit 0), instead of rolling back to it until it
    halts naming it good."""
    ckpt = s.results / "checkpoints" / STEP4
    rewrite_tensors(ckpt, "optimizer", lambda t: t["state/0/exp_avg_sq"].view(-1).__setitem__(0, -1.0))
    problems = s.run("train", "trainer.train_num_steps=6", "checkpoint.every=2").problems(
        0, "negative second moments in 1 tensor(s): optimizer.state.0.exp_avg_sq")
    moved = list((s.results / "checkpoints" / "quarantine").glob(f"{STEP4}-*/"))
    if len(moved) != 1:
        problems.append(f"{STEP4} was not quarantined (found {moved})")
    for step in (4, 6):
        if not (s.results / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file():
            problems.append(f"step {step} was not committed")
    return problems


@dataclass(frozen=True)
class Trial:
    name: str
    run: tp.Callable[[Setup], list[str]]


def files(name: str, make: Hostile, command: str, code: int, slurm: bool = False) -> Trial:
    """The trial of ``name`` made hostile by ``make`` under ``command`` (see :func:`file_trial`)."""
    return Trial(f"{command}{' (SLURM)' if slurm else ''}: {name} {make.label}",
                 functools.partial(file_trial, name=name, make=make, command=command, code=code, slurm=slurm))


P = functools.partial
LOGS = ("config.yaml", "events.jsonl", "restarts.json")
TRIALS: list[Trial] = [
    *(Trial(f"{command}: .lock {make.label}", P(lock_trial, make=make, command=command))
      for make in (FILE_LINK, FIFO) for command in ("train", "dry-run")),
    *(files(name, make, "report", 2) for make in (DEV_ZERO, FIFO) for name in LOGS),
    # dry-run reads none of the three unless it runs as a SLURM job, which reads the crash-loop ledger
    files("restarts.json", DEV_ZERO, "dry-run", 1, slurm=True),
    files("restarts.json", FIFO, "dry-run", 1, slurm=True),
    files("restarts.json", DEEP, "dry-run", 0, slurm=True),
    files("restarts.json", DEEP, "report", 0),
    files("events.jsonl", FIFO, "train", 2),
    files("events.jsonl", FILE_LINK, "train", 2),
    Trial("report: events.jsonl with a line nested too deep, counted",
          P(deep_line_trial, name="events.jsonl")),
    Trial("train: trainer.results_folder a regular file", P(results_folder_trial, folder="{file}")),
    Trial("train: trainer.results_folder under /proc",
          P(results_folder_trial, folder="/proc/radiodiff-hostile")),
    Trial(f"train: {STEP2} (oldest) a link, then retention", P(step_link_trial, name=STEP2)),
    Trial(f"train: {STEP4} (newest) a link, then a save of its step", P(step_link_trial, name=STEP4)),
    Trial(f"doctor --fix: {STEP4}/config.yaml resealed to plug in os.system", stored_target_trial),
    Trial(f"train: a negative Adam second moment resealed into {STEP4}", negative_moment_trial),
]


@dataclass
class HostileSummary:
    trials: int = 0
    handled: int = 0
    failures: list[str] = field(default_factory=list)


def setup(golden_run: Path, where: Path) -> Setup:
    """A private copy of ``golden_run`` in ``where`` with its config pointing at it."""
    results, outside = where / "run", where / "outside"
    shutil.copytree(golden_run, results, symlinks=True)
    outside.mkdir()
    raw = yaml.safe_load((golden_run / "config.yaml").read_text())
    raw["trainer"]["results_folder"] = str(results)
    raw["model"]["first_stage"]["ckpt_path"] = str(results / "ae.safetensors")
    cfg = where / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return Setup(results, cfg, outside)


def run_hostile(golden_run: Path, workdir: Path, trials: tp.Sequence[Trial] | None = None) -> HostileSummary:
    """Every trial (or those given) on its own copy of ``golden_run`` (a finished run with checkpoints at
    steps 2 and 4)."""
    summary = HostileSummary()
    for i, trial in enumerate(TRIALS if trials is None else trials):
        try:
            problems = trial.run(setup(golden_run, workdir / f"trial-{i}"))
        except Exception as exc:  # a broken trial is a failure of the set, not a crash of the harness
            problems = [f"the trial itself failed: {type(exc).__name__}: {exc}"]
        summary.trials += 1
        if problems:
            summary.failures += [f"hostile: {trial.name}: {p}" for p in problems]
        else:
            summary.handled += 1
    return summary
