"""Every SLURM job of a test session submitted at once, so that the cluster runs them side by side.

A job on the cluster takes minutes (a time limit, requeues about 12 s apart): one after the other,
the jobs of ``tests/slurm`` took 25-40 minutes. So a test module registers each job it needs as a
*scenario* (:func:`scenario`): how to submit it and, where the test needs one, what to do while it
runs (a preemption signal once a checkpoint exists, a SIGKILL during a save, a requeue after each
death). Each test names the scenarios it checks with ``@pytest.mark.scenario("name")`` (also on a
``pytest.param``). The session fixture ``cluster_jobs`` (``conftest.py``) submits the scenarios of
every selected test before the first of those tests runs — two submissions at a time, highest
``priority`` first — and runs each one's action in its own thread; a test then waits for its own
job and asserts what it checks.
"""

from __future__ import annotations

import subprocess
import threading
import time
import typing as tp
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

T = tp.TypeVar("T")
Submit = Callable[["Job"], str]
Act = Callable[["Job"], tp.Any]


@dataclass(frozen=True)
class Scenario:
    name: str
    submit: Submit
    """Submits the job; returns its id."""
    act: Act | None = None
    """Runs once the job is submitted, in the scenario's own thread, while other tests run; what it
    returns is what :meth:`Job.acted` gives the test."""
    nodes: int = 1
    """Cluster nodes the job needs."""
    priority: int = 0
    """Higher: submitted earlier. Submissions are slow where they import torch (several CPU seconds
    while the other jobs start on the same cores): the quick ones and the longest jobs go first."""


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, *, act: Act | None = None, nodes: int = 1, priority: int = 0
             ) -> Callable[[Submit], Submit]:
    """Register the decorated function as the submission of scenario ``name``."""

    def register(submit: Submit) -> Submit:
        SCENARIOS[name] = Scenario(name, submit, act, nodes, priority)
        return submit

    return register


def selected(items: Iterable[pytest.Item]) -> list[str]:
    """The scenarios the given tests check (``@pytest.mark.scenario``), in test order, each once."""
    names: dict[str, None] = {}
    for item in items:
        for mark in item.iter_markers("scenario"):
            names.update(dict.fromkeys(mark.args))
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise KeyError(f"no scenario registered as {unknown} (known: {sorted(SCENARIOS)})")
    return list(names)


class Job:
    """One scenario's job(s) on the cluster, and its action's outcome."""

    def __init__(self, jobs: ClusterJobs, scenario: Scenario) -> None:
        self.jobs, self.scenario, self.name = jobs, scenario, scenario.name
        self.env = jobs.env
        self.folder = jobs.tmp.mktemp(scenario.name)
        """A fresh folder of this scenario."""
        self.id: str | None = None
        self.ids: list[str] = []
        """Every job the scenario submitted (an action may submit more): cancelled at the end."""
        self._submitted = threading.Event()
        self._done = threading.Event()
        self._result: tp.Any = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._act, name=f"scenario-{self.name}", daemon=True)

    def submit(self) -> None:
        """Submit the job (in a submitter thread), then start the action in the job's own thread."""
        try:
            self.id = self.scenario.submit(self)
            self.ids.append(self.id)
        except BaseException as exc:  # pytest.fail's exception is no Exception: keep it for the test
            self._error = exc
            self._done.set()
        else:
            self.thread.start()
        finally:
            self._submitted.set()

    def _act(self) -> None:
        try:
            if self.scenario.act is not None:
                self._result = self.scenario.act(self)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def submitted(self, timeout: float = 600) -> str:
        """The job's id once it is submitted (a failed submission raised here)."""
        if not self._submitted.wait(timeout):
            pytest.fail(f"scenario {self.name}: not submitted after {timeout:.0f} s")
        if self.id is None:
            assert self._error is not None
            raise self._error
        return self.id

    def acted(self, timeout: float = 900) -> tp.Any:
        """What the scenario's action returned, once it is done (its failure raised here)."""
        if not self._done.wait(timeout):
            pytest.fail(f"scenario {self.name}: its action still runs after {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self._result

    def also(self, job_id: str) -> str:
        """Record another job the action submitted; returns its id."""
        self.ids.append(job_id)
        return job_id

    def wait_until(self, ready: Callable[[], bool], timeout: float = 300, poll: float = 0.02) -> None:
        """Poll ``ready()`` until it is true; fail with the job's state and output after ``timeout``."""
        from tests.slurm.cluster import job_info, output_tail

        deadline = time.monotonic() + timeout
        while not ready():
            if self.jobs.stopping.is_set():
                pytest.fail(f"scenario {self.name}: the session ended while waiting")
            if time.monotonic() > deadline:
                info = job_info(self.submitted(), self.env)
                pytest.fail(f"scenario {self.name}: never ready: {info}\n{output_tail(info)}")
            time.sleep(poll)


class ClusterJobs:
    """The scenarios' jobs of this session, by scenario name (``cluster_jobs["preempted"]``)."""

    def __init__(self, env: Mapping[str, str], tmp: pytest.TempPathFactory, synth_cache: Path) -> None:
        self.env = dict(env)
        """Environment of SLURM clients (``SLURM_CONF``)."""
        self.tmp, self.synth_cache = tmp, synth_cache
        self.jobs: dict[str, Job] = {}
        self.stopping = threading.Event()
        self._made: dict[str, tp.Any] = {}
        self._lock = threading.RLock()
        self._submitters: list[threading.Thread] = []

    def start(self, names: Iterable[str], at_once: int = 2) -> None:
        """Submit these scenarios, highest priority first, ``at_once`` at a time (a dozen
        submissions that import torch at once on 2 cores would make every job start late)."""
        order = sorted(names, key=lambda name: -SCENARIOS[name].priority)
        for name in order:
            self.jobs[name] = Job(self, SCENARIOS[name])
        queue = [self.jobs[name] for name in order]
        lock = threading.Lock()

        def submitter() -> None:
            while not self.stopping.is_set():
                with lock:
                    if not queue:
                        return
                    job = queue.pop(0)
                job.submit()

        self._submitters = [threading.Thread(target=submitter, name=f"submitter-{i}", daemon=True)
                            for i in range(at_once)]
        for thread in self._submitters:
            thread.start()

    def wait_submitted(self, timeout: float = 900) -> None:
        """Until every scenario is submitted (or failed to): work on this host waits for it, so that
        the submissions get the CPU first."""
        deadline = time.monotonic() + timeout
        for job in self.jobs.values():
            job._submitted.wait(max(0.0, deadline - time.monotonic()))

    def __getitem__(self, name: str) -> Job:
        if name not in self.jobs:
            raise KeyError(f"scenario {name!r} was not submitted: mark the test that checks it with "
                           f"@pytest.mark.scenario({name!r})")
        return self.jobs[name]

    def once(self, key: str, make: Callable[[], T]) -> T:
        """``make()``, called once per session for ``key`` (what several scenarios share)."""
        with self._lock:  # scenarios start in threads
            if key not in self._made:
                self._made[key] = make()
            return tp.cast(T, self._made[key])

    def close(self) -> None:
        """Cancel what is left of this session's jobs (a failed test's), let the actions end."""
        self.stopping.set()
        ids = {job_id for job in self.jobs.values() for job_id in job.ids}
        # Also those of a submission that failed after sbatch: every job of this session was
        # submitted from a folder of its temporary tree.
        base = str(self.tmp.getbasetemp())
        queue = subprocess.run(["squeue", "-h", "-o", "%A %Z"], env=self.env, capture_output=True,
                               text=True, timeout=60, check=False).stdout
        ids.update(job_id for job_id, _, folder in (line.partition(" ") for line in queue.splitlines())
                   if folder == base or folder.startswith(base + "/"))
        if ids:  # finished jobs: scancel only complains
            subprocess.run(["scancel", *sorted(ids)], env=self.env, capture_output=True, timeout=60,
                           check=False)
        for thread in [*self._submitters, *(job.thread for job in self.jobs.values())]:
            if thread.is_alive():
                thread.join(timeout=5)
