"""Every bench in one command, and a headline table at the top of ``bench/RESULTS.md``.

    python -m bench              # every bench (~20 min on 2 cores; requeue needs the local SLURM cluster)
    python -m bench --quick      # a try: checkpoint and guard on the tiny model, a few rounds (~2 min),
                                 # written to a temp file unless --out is given
    python -m bench --gpu-only   # the GPU rows only (scripts/gpu_check.sh); refuses without CUDA

Each bench runs as its own process (its memory and threads are its own) and replaces its own section
of the results file; it also hands back its headline rows (``--summary``), each a ratio against a
baseline measured side by side in the same invocation. A bench that fails or cannot run here (no
SLURM cluster) is named in the headline with its reason; the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from results import cpu_model, write_section  # noqa: E402

SECTION = "headline"
GPU_ROWS = "device → host snapshot of the state, guard overhead and host syncs per step on a GPU"


@dataclass
class Run:
    name: str
    script: str
    argv: list[str]
    summary: bool = True
    rc: int | None = None
    seconds: float = 0.0
    rows: list[dict[str, tp.Any]] = field(default_factory=list)
    why: str = ""


def plan(mode: str) -> list[Run]:
    """What each mode runs: the full run has 3 checkpoint sizes up to ~1.5 GB of state."""
    if mode == "quick":
        return [Run("hash", "bench_hash.py", ["--mib", "256", "--repeats", "1"]),
                Run("checkpoint", "bench_checkpoint.py", ["--size", "tiny", "--repeats", "2"]),
                Run("guard", "bench_guard.py", ["--size", "tiny", "--repeats", "2", "--steps", "2",
                                                "--breakdown-passes", "1"])]
    if mode == "gpu":
        return [Run("checkpoint", "bench_checkpoint.py", ["--size", "tiny", "medium", "--repeats", "3"]),
                Run("guard", "bench_guard.py", ["--size", "tiny", "medium", "--repeats", "6"])]
    return [Run("hash", "bench_hash.py", []),
            Run("checkpoint", "bench_checkpoint.py", ["--size", "tiny", "medium", "large", "--repeats", "5",
                                                      "--repeats-large", "3"]),
            Run("guard", "bench_guard.py", ["--repeats", "6"]),
            Run("requeue", "bench_requeue.py", ["--idle-timeout", "300"]),
            Run("network", "bench_network.py", ["--repeats", "1"], summary=False)]


def skipped(mode: str) -> list[str]:
    if mode == "quick":
        return ["requeue (needs the SLURM cluster; minutes)", "network (minutes)",
                "checkpoint sizes medium and large", "guard size medium"]
    if mode == "gpu":
        return ["hash (CPU)", "requeue (CPU, SLURM)", "network (CPU only)", "checkpoint size large"]
    return []


def execute(run: Run, out: Path, scratch: Path) -> None:
    summary = scratch / f"{run.name}.json"
    cmd = [sys.executable, str(HERE / run.script), *run.argv, "--out", str(out)]
    if run.summary:
        cmd += ["--summary", str(summary)]
    print(f"== {run.name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.seconds, run.rc = time.perf_counter() - start, proc.returncode
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode:
        last = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        run.why = f"exit status {proc.returncode}: {last[0][:200]}"
    elif run.summary:
        run.rows = json.loads(summary.read_text())


def device_line() -> tuple[str, bool]:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})", True
    return "cpu (no CUDA device)", False


def _ratio(row: dict[str, tp.Any]) -> str:
    r = row["ratio"]
    if r is None:
        return "–"
    if row["aim"].startswith("≥"):
        return f"{r:.0%}"
    return f"{r:.2f}×" if row.get("unit", "s") == "s" else f"{r:g}"


def _value(value: float | None, unit: str) -> str:
    """Seconds as ms below 10 s; a count (steps, syncs) as it is."""
    if value is None:
        return "–"
    if unit != "s":
        return f"{value:.3g} {unit}"
    return f"{value * 1e3:.1f} ms" if value < 10 else f"{value:.1f} s"


def _verdict(row: dict[str, tp.Any]) -> str:
    return {True: "met", False: "**missed**", None: "–"}[row["met"]]


def headline(runs: list[Run], mode: str, command: str, started: dt.datetime, total_s: float,
             loads: tuple[float, float]) -> str:
    device, gpu = device_line()
    lines = [
        "# Benchmarks: headline",
        "",
        "Generated by `python -m bench`; this section is replaced on every run. Every ratio is ours "
        "against a baseline measured side by side in the same invocation (the sections below say what "
        "each side does and where the time goes).",
        "",
        f"- started: {started.isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} CPU cores; device: {device}",
        f"- 1-minute load average: {loads[0]:.2f} at the start, {loads[1]:.2f} at the end ({os.cpu_count()} "
        "cores; a load above that means other processes competed; each section gives its own figures and "
        "ratios of minimums)",
        f"- command: `{command}` ({mode} run, {total_s:.0f} s)",
        f"- GPU rows ({GPU_ROWS}): " + ("measured, the rows whose device is cuda" if gpu else
                                      "not measured (no CUDA device on this machine; `scripts/gpu_check.sh` "
                                      "measures them on one)"),
    ]
    missing = [f"{r.name}: {r.why}" for r in runs if r.why]
    missing += [f"not run in this mode: {s}" for s in skipped(mode)]
    if missing:
        lines.append("- not measured: " + "; ".join(missing))
    lines += ["", "| measure | ours | baseline | ratio | aim | verdict | device | where the time goes |",
              "| --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for run in runs:
        for row in run.rows:
            unit = row.get("unit", "s")
            cells = [row["what"], _value(row["ours_s"], unit), _value(row["base_s"], unit), _ratio(row),
                     row["aim"], _verdict(row), row["device"], row["note"]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a try: the tiny model, a few rounds (~2 min)")
    mode.add_argument("--gpu-only", action="store_true", help="only the GPU rows (needs CUDA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: bench/RESULTS.md; a temp file for --quick/--gpu-only)")
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "gpu" if args.gpu_only else "full"
    if name == "gpu" and not device_line()[1]:
        print("python -m bench --gpu-only: no CUDA device here, nothing measured", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="radiodiff-bench-"))
    out = args.out or (HERE / "RESULTS.md" if name == "full" else scratch / "RESULTS.md")
    runs = plan(name)
    load_before, started = os.getloadavg()[0], dt.datetime.now().astimezone()
    start = time.perf_counter()
    for run in runs:
        execute(run, out, scratch)
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    body = headline(runs, name, command, started, time.perf_counter() - start,
                    (load_before, os.getloadavg()[0]))
    write_section(out, SECTION, body)
    print(body)
    print(f"\nwrote {out}")
    return 1 if any(r.rc for r in runs if r.name != "requeue") else 0


if __name__ == "__main__":
    sys.exit(main())
