"""The data model of ``radiodiff-resume report``: a run's logs read into stages, progress points,
restarts, rollbacks and halts, and the summary and its text (drawn by
:mod:`radiodiff_resume.tools.report_plot`, printed by :mod:`radiodiff_resume.tools.report`).

Steps go back when a run resumes from a checkpoint older than where it was (a preemption between
saves, a quarantined newest checkpoint) or rolls back; what was logged for those steps before is
drawn as discarded, and the wall time and steps redone are counted as lost. The time between a
process that finished (reached ``train_num_steps``) and the next one, a run extended later, is idle,
not lost.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import textwrap
import typing as tp
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from radiodiff_resume.errors import UserError
from radiodiff_resume.io import MAX_LOG_BYTES, json_lines, read_regular

Record = dict[str, tp.Any]

METRICS, EVENTS, CONFIG = "metrics.jsonl", "events.jsonl", "config.yaml"
REQUEUES = "requeues.json"
"""Per SLURM job in the log folder (``radiodiff_resume.slurm.submit.LEDGER``): requeues by cause."""
RESTARTS = "restarts.json"
"""Per stage folder (``radiodiff_resume.checkpoint.restarts.LEDGER``): runs that died after a resume."""
STAGE_ORDER = ("first_stage", "ldm")
STEPS_KEY = {"first_stage": ("model", "first_stage", "trainer"), "ldm": ("trainer",)}
"""Where each stage's loop settings sit in ``config.yaml``."""
VAL_BOOKKEEPING = ("val/evaluated", "val/total", "val/valid")
DONE_AT_STEP = frozenset({"checkpoint_saved", "stopped", "halted", "save_refused", "bn_repaired", "resumed",
                          "finished"})
"""Events whose ``step`` is a step the run stood at (``fresh_start``: step 0)."""
ATTEMPTING_STEP = frozenset({"step_skipped", "batch_skipped", "grads_scrubbed", "grad_clipped"})
"""Events whose ``step`` is the optimizer step being attempted, one past the last completed."""
STEP_FOLDER = re.compile(r"step-(\d+)")
LISTED = 5
"""Incidents (restarts, rollbacks, quarantines, halts) listed one by one in the text (the latest);
the rest are counted."""
TEXT_WIDTH = 110


# ----- reading ---------------------------------------------------------------------------------


@dataclass
class Lines:
    records: list[Record]
    unreadable: int
    """Lines that are not a JSON object: the last line of a process killed mid-write, a torn write."""


def read_jsonl(path: Path) -> Lines:
    """The JSON objects of ``path``, one a line; a bad line is skipped and counted, never fatal.
    ``NaN``/``Infinity`` tokens are read as None, so a non-finite value never passes for a number."""
    if not (path.is_symlink() or path.exists()):
        return Lines([], 0)
    try:
        data = read_regular(path, MAX_LOG_BYTES)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    objects, bad = json_lines(data, parse_constant=lambda _: None)
    records = [r for r in objects if finite_number(r.get("time")) is not None]
    bad += len(objects) - len(records)
    return Lines(records, bad)


@dataclass
class Stage:
    """One stage's records, each list in the order written."""

    name: str
    train: list[Record]
    """Training log records (those with a ``loss`` key, null when it was not finite)."""
    val: list[Record]
    events: list[Record]


@dataclass
class Run:
    """What the report reads from a results folder."""

    folder: Path
    stages: dict[str, Stage]
    unreadable: dict[str, int]
    config: dict[str, tp.Any]
    requeues: dict[str, int] | None
    crash_loops: dict[str, dict[str, int]]


def first_stage_folder(run_dir: Path) -> Path:
    """Where the first stage of a run in ``run_dir`` logs (the config is the one place that says)."""
    from radiodiff_resume.config import Config

    cfg = Config()
    cfg.trainer.results_folder = str(run_dir)
    return cfg.first_stage_folder()


def load_run(run_dir: Path) -> Run:
    """Everything the report draws from ``run_dir`` (a results folder, or one stage's folder)."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder (pass a run's results folder, trainer.results_folder)")
    folders = [f for f in (run_dir, first_stage_folder(run_dir))
               if (f / METRICS).is_file() or (f / EVENTS).is_file()]
    if not folders:
        raise UserError(f"{run_dir} holds neither {METRICS} nor {EVENTS} (nor a first_stage/ folder with "
                        "them): pass a run's results folder (trainer.results_folder)")
    grouped: dict[str, dict[str, list[Record]]] = {}
    unreadable = {}
    for folder in folders:
        for name in (METRICS, EVENTS):
            lines = read_jsonl(folder / name)
            if lines.unreadable:
                unreadable[str((folder / name).relative_to(run_dir))] = lines.unreadable
            for r in lines.records:
                kinds = grouped.setdefault(str(r.get("stage", "unknown")),
                                           {"train": [], "val": [], "events": []})
                if name == EVENTS:
                    kinds["events"].append(r)
                elif "loss" in r:
                    kinds["train"].append(r)
                elif any(k.startswith("val/") for k in r):
                    kinds["val"].append(r)
    order = [s for s in STAGE_ORDER if s in grouped] + sorted(set(grouped) - set(STAGE_ORDER))
    config = _read_config(run_dir / CONFIG)
    return Run(run_dir, {s: Stage(s, **grouped[s]) for s in order}, unreadable, config,
               _requeues(run_dir, config), _crash_loops(run_dir, folders))


def _read_config(path: Path) -> dict[str, tp.Any]:
    import yaml

    try:
        data = yaml.safe_load(read_regular(path))
    except (OSError, yaml.YAMLError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> tp.Any:
    try:
        return json.loads(read_regular(path))
    except (OSError, ValueError, RecursionError):
        return None


def _requeues(run_dir: Path, config: dict[str, tp.Any]) -> dict[str, int] | None:
    """Requeues summed over the SLURM jobs whose ledgers lie in the log folder; None without any."""
    log_folder = dig(config, "slurm", "log_folder")
    folder = Path(log_folder) if isinstance(log_folder, str) else run_dir / "slurm"
    ledgers = [d for p in sorted(folder.glob(f"*/{REQUEUES}")) if isinstance(d := _read_json(p), dict)]
    if not ledgers:
        return None
    def total(key: str) -> int:
        return sum(int(finite_number(d.get(key)) or 0) for d in ledgers)

    return {"jobs": len(ledgers), "timeouts": total("timeouts"), "other": total("other")}


def _crash_loops(run_dir: Path, folders: list[Path]) -> dict[str, dict[str, int]]:
    """Non-empty crash-loop ledgers: checkpoint → runs in a row that died after resuming from it."""
    found = {}
    for folder in folders:
        counts = _read_json(folder / RESTARTS)
        if isinstance(counts, dict) and counts:
            found[str(folder.relative_to(run_dir)) if folder != run_dir else "."] = counts
    return found


# ----- the summary -----------------------------------------------------------------------------


@dataclass
class Point:
    """A moment the run's step is known: (wall time, last completed step)."""

    time: float
    step: int


def progress(stage: Stage) -> list[Point]:
    """Every record that tells the completed step, by time."""
    points = [Point(r["time"], r["step"]) for r in stage.train + stage.val if step_of(r) is not None]
    for e in stage.events:
        step, kind = step_of(e), e.get("event")
        if kind == "fresh_start":
            points.append(Point(e["time"], 0))
        elif kind == "rolled_back" and step_of(e, "to_step") is not None:
            points.append(Point(e["time"], e["to_step"]))
        elif step is not None and kind in DONE_AT_STEP:
            points.append(Point(e["time"], step))
        elif step is not None and kind in ATTEMPTING_STEP:
            points.append(Point(e["time"], max(step - 1, 0)))
    return sorted(points, key=lambda p: p.time)


def timeline(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(kept, discarded): a record at or before the last kept step means the run went back (a resume
    from an older checkpoint, a rollback), so what was logged from that step on was redone."""
    kept: list[Record] = []
    discarded: list[Record] = []
    for r in records:
        if step_of(r) is None:
            continue
        while kept and kept[-1]["step"] >= r["step"]:
            discarded.append(kept.pop())
        kept.append(r)
    return kept, discarded


def restarts(stage: Stage, points: list[Point], target: int | None) -> list[dict[str, tp.Any]]:
    """Each new process of the stage after earlier progress: a ``resumed`` that is not a rollback's
    reload (a rollback emits ``rolled_back`` right after it), or a ``fresh_start``."""
    found = []
    events = stage.events
    for i, e in enumerate(events):
        kind = e.get("event")
        reload = i + 1 < len(events) and events[i + 1].get("event") == "rolled_back"
        if not (kind == "fresh_start" or (kind == "resumed" and not reload)):
            continue
        before = _before(points, e["time"])
        if not before:
            continue  # the stage's first process
        to_step = (step_of(e) or 0) if kind == "resumed" else 0
        last = before[-1]
        cause, finished = _previous_end(events[:i], last, target, stage.name)
        gap = round(e["time"] - last.time, 3)
        found.append({
            "time": e["time"], "to_step": to_step, "from_step": last.step, "fresh": kind == "fresh_start",
            "cause": cause, "steps_redone": max(0, last.step - to_step),
            "down_s": 0.0 if finished else gap, "idle_s": gap if finished else 0.0,
            "redone_s": _redone_s(before, to_step, last.time),
        })
    return found


def _previous_end(earlier: list[Record], last: Point, target: int | None, stage: str) -> tuple[str, bool]:
    """How the previous process ended, as far as the files say, and whether it had finished (then the
    time until the next process is idle, not lost)."""
    ends = [e for e in earlier
            if e.get("event") in ("stopped", "halted", "finished") and e["time"] >= last.time]
    if ends and ends[-1]["event"] == "stopped":
        return f"stopped: {ends[-1].get('reason', '?')}", False
    if ends and ends[-1]["event"] == "finished":
        of = step_of(ends[-1], "train_num_steps")
        return f"had finished at step {last.step}" + (f" of {of}" if of is not None else ""), True
    if ends:
        return "halted", False
    # Runs older than the ``finished`` event: the resume's config diff shows the old step target.
    key = ".".join((*STEPS_KEY.get(stage, ("-",)), "train_num_steps"))
    for e in earlier:
        changes = e.get("changes") if e.get("event") == "config_changed" and e["time"] >= last.time else None
        for change in changes if isinstance(changes, list) else []:
            was = step_of(change, "was") if isinstance(change, dict) and change.get("key") == key else None
            if was is not None and last.step >= was:
                return f"had finished: train_num_steps was {was}, now {change.get('now')}", True
    if target is not None and last.step >= target:
        return "had finished", True
    return "no stop recorded: killed or crashed", False


def _before(points: list[Point], time: float) -> list[Point]:
    return points[:bisect.bisect_left([p.time for p in points], time)]


def _redone_s(before: list[Point], to_step: int, until: float) -> float:
    """Wall time from the latest moment the run stood at ``to_step`` or earlier until ``until``: the
    work that going back to ``to_step`` throws away."""
    start = next((p.time for p in reversed(before) if p.step <= to_step), before[0].time)
    return round(max(0.0, until - start), 3)


def rollbacks(stage: Stage, points: list[Point]) -> list[dict[str, tp.Any]]:
    found = []
    for i, e in enumerate(stage.events):
        step, to_step = step_of(e), step_of(e, "to_step")
        if e.get("event") != "rolled_back" or step is None or to_step is None:
            continue
        reload = stage.events[i - 1] if i and stage.events[i - 1].get("event") == "resumed" else e
        before = _before(points, reload["time"])
        found.append({"time": e["time"], "step": step, "to_step": to_step, "reason": e.get("reason"),
                      "steps_redone": max(0, step - to_step),
                      "redone_s": _redone_s(before, to_step, e["time"]) if before else 0.0})
    return found


def set_aside(stage: Stage) -> list[dict[str, tp.Any]]:
    """Checkpoints moved out of the way: quarantined (damaged) or set aside (crash loop, a named resume,
    a deliberate fresh start), with the first line that says why."""
    found = []
    for e in stage.events:
        kind = e.get("event")
        if kind not in ("checkpoint_quarantined", "checkpoint_set_aside", "checkpoints_set_aside"):
            continue
        what = Path(str(e["path"])).name if e.get("path") else str(e.get("folders") or "all checkpoints")
        found.append({"time": e["time"], "kind": kind, "checkpoint": what, "to": e.get("to"),
                      "why": _first_failure(e.get("reason"))})
    return found


def halts(stage: Stage) -> list[dict[str, tp.Any]]:
    """Halts, and saves or resumes refused (the run stopped to protect its state)."""
    found = []
    for e in stage.events:
        kind = e.get("event")
        if kind not in ("halted", "save_refused", "resume_refused"):
            continue
        why = e.get("reason")
        if why is None and isinstance(e.get("nonfinite"), list):
            why = f"non-finite {', '.join(map(str, e['nonfinite'][:3]))}"
        elif why is None and e.get("probe"):
            why = f"non-finite probe {e['probe']}"
        found.append({"time": e["time"], "kind": kind, "step": step_of(e), "why": _first_failure(why)})
    return found


def _first_failure(reason: tp.Any) -> str | None:
    """The line of a verification report that failed (or the reason's first line)."""
    if not isinstance(reason, str):
        return None
    lines = [" ".join(line.split()) for line in reason.splitlines() if line.strip()]
    failed = [line for line in lines if "FAILED" in line]
    return (failed or lines or [None])[0]


def stage_summary(stage: Stage, config: dict[str, tp.Any]) -> dict[str, tp.Any]:
    points = progress(stage)
    kinds = Counter(str(e.get("event")) for e in stage.events)
    target = dig(config, *STEPS_KEY.get(stage.name, ("-",)), "train_num_steps")
    target = target if isinstance(target, int) else None
    back = restarts(stage, points, target)
    rolled = rollbacks(stage, points)
    redone = sum(r["steps_redone"] for r in back + rolled)
    step = points[-1].step if points else 0
    times = [r["time"] for r in stage.train + stage.val + stage.events]
    train, _ = timeline(stage.train)
    val, _ = timeline(stage.val)
    last = train[-1] if train else {}
    down = round(sum(r["down_s"] for r in back), 3)
    idle = round(sum(r["idle_s"] for r in back), 3)
    redone_s = round(sum(r["redone_s"] for r in back + rolled), 3)
    skipped_batches = sum(int(finite_number(e.get("micro_batches")) or 0)
                          for e in stage.events if e.get("event") == "batch_skipped")
    stops = Counter(str(e.get("reason")) for e in stage.events if e.get("event") == "stopped")
    return {
        "step": step,
        "train_num_steps": target,
        "steps_run": step + redone,
        "steps_redone": redone,
        "wall_s": round(max(times) - min(times), 3) if times else 0.0,
        "time_lost_s": {"down": down, "redone": redone_s, "total": round(down + redone_s, 3)},
        "time_idle_s": idle,
        "counts": {
            "saves": kinds["checkpoint_saved"],
            "resumes": sum(not r["fresh"] for r in back),
            "restarts": len(back),
            "stops": kinds["stopped"],
            "quarantines": kinds["checkpoint_quarantined"],
            "set_aside": kinds["checkpoint_set_aside"] + kinds["checkpoints_set_aside"],
            "rollbacks": kinds["rolled_back"],
            "halts": kinds["halted"],
            "refusals": kinds["save_refused"] + kinds["resume_refused"],
            "skipped_steps": kinds["step_skipped"],
            "skipped_micro_batches": skipped_batches,
        },
        "stop_reasons": dict(stops),
        "events": dict(sorted(kinds.items())),
        "restarts": back,
        "rollbacks": rolled,
        "set_aside": set_aside(stage),
        "halts": halts(stage),
        "last_train": {k: last.get(k) for k in ("step", "loss", "lr", "grad_norm") if k in last},
        "guard": {k.removeprefix("guard/"): v for k, v in last.items() if k.startswith("guard/") and v},
        "last_validation": _validation(val[-1]) if val else None,
    }


def _validation(r: Record) -> dict[str, tp.Any]:
    return {"step": r["step"], "valid": r.get("val/valid", True) is not False,
            "evaluated": r.get("val/evaluated"), "total": r.get("val/total"),
            "metrics": {k.removeprefix("val/"): v for k, v in r.items()
                        if k.startswith("val/") and k not in VAL_BOOKKEEPING}}


def summarize(run: Run) -> dict[str, tp.Any]:
    """The report's numbers as plain JSON data."""
    stages = {name: stage_summary(stage, run.config) for name, stage in run.stages.items()}
    return {
        "run_dir": str(run.folder),
        "stages": stages,
        "time_lost_s": round(sum(s["time_lost_s"]["total"] for s in stages.values()), 3),
        "time_idle_s": round(sum(s["time_idle_s"] for s in stages.values()), 3),
        "unreadable_lines": run.unreadable,
        "slurm_requeues": run.requeues,
        "crash_loop_counts": run.crash_loops,
    }


# ----- text ------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _g(value: tp.Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _times(counts: dict[str, int]) -> str:
    return ", ".join(k if n == 1 else f"{k} x{n}" for k, n in counts.items())


def stage_lines(name: str, s: dict[str, tp.Any]) -> list[str]:
    """A stage's summary as a few lines (the text output and the PNG's text panel)."""
    c, target, lost = s["counts"], s["train_num_steps"], s["time_lost_s"]
    of = (f" of {target}" + (" (done)" if s["step"] >= target else "")) if target else ""
    redone = f" ({s['steps_redone']} redone)" if s["steps_redone"] else ""
    lines = [f"{name}: step {s['step']}{of}, {s['steps_run']} steps run{redone}, "
             f"wall {duration(s['wall_s'])}"]
    lines.append(
        f"  saves {c['saves']} | resumes {c['resumes']}"
        + (f" (+{c['rollbacks']} reloads by rollbacks)" if c["rollbacks"] else "")
        + f" | stops {c['stops']}" + (f" ({_times(s['stop_reasons'])})" if c["stops"] else "")
        + f" | quarantined {c['quarantines']} | set aside {c['set_aside']}")
    lines.append(
        f"  rollbacks {c['rollbacks']} | halts {c['halts']}"
        + (f" | refused saves/resumes {c['refusals']}" if c["refusals"] else "")
        + f" | skipped steps {c['skipped_steps']} | skipped micro-batches {c['skipped_micro_batches']}")
    if lost["total"] or s["steps_redone"]:
        lines.append(f"  time lost {duration(lost['total'])}: {duration(lost['down'])} down between "
                     f"processes, {duration(lost['redone'])} of work redone ({s['steps_redone']} steps)")
    else:
        lines.append("  time lost: none recorded")
    if s["time_idle_s"]:
        lines.append(f"  idle {duration(s['time_idle_s'])}: finished, then extended or rerun (not lost)")
    incidents = sorted(
        [(r["time"], f"restart after step {r['from_step']} ({r['cause']}), "
                     + ("started afresh" if r["fresh"] else f"resumed at step {r['to_step']}")
                     + (f": {duration(r['idle_s'])} idle" if r["idle_s"]
                        else f": {duration(r['down_s'])} down")
                     + f", {r['steps_redone']} steps redone ({duration(r['redone_s'])})")
          for r in s["restarts"]]
        + [(r["time"], f"rollback at step {r['step']} to step {r['to_step']} ({r['reason']}): "
                       f"{r['steps_redone']} steps redone ({duration(r['redone_s'])})")
           for r in s["rollbacks"]]
        + [(r["time"], f"{r['kind'].replace('_', ' ')}: {r['checkpoint']}"
                       + (f": {r['why']}" if r["why"] else "")) for r in s["set_aside"]]
        + [(r["time"], f"{r['kind'].replace('_', ' ')}"
                       + (f" at step {r['step']}" if r["step"] is not None else "")
                       + (f": {r['why']}" if r["why"] else "")) for r in s["halts"]],
        key=lambda pair: pair[0])
    if len(incidents) > LISTED:
        lines.append(f"    ... {len(incidents) - LISTED} earlier incidents")
    lines += [f"    {text}" for _, text in incidents[-LISTED:]]
    t = s["last_train"]
    if t:
        extra = ", ".join(f"{k.replace('_', ' ')} {_g(t[k])}" for k in ("lr", "grad_norm")
                          if t.get(k) is not None)
        loss = "non-finite" if t.get("loss") is None else _g(t["loss"])
        lines.append(f"  last loss {loss} at step {t.get('step')}"
                     + (f" ({extra})" if extra else ""))
    if s["guard"]:
        lines.append("  guard counters: " + ", ".join(f"{k}={v}" for k, v in s["guard"].items()))
    v = s["last_validation"]
    if v and v["valid"]:
        metrics = ", ".join(f"{k} {_g(x)}" for k, x in v["metrics"].items())
        lines.append(f"  last validation (step {v['step']}, {v['evaluated']}/{v['total']} samples): "
                     f"{metrics}")
    elif v:
        lines.append(f"  last validation (step {v['step']}): INVALID, 0/{v['total']} samples finite")
    lines.append("  events: " + (", ".join(f"{k}={n}" for k, n in s["events"].items()) or "none"))
    return lines


def wrap(lines: list[str], width: int) -> list[str]:
    """``lines`` folded at ``width``, continuations indented under their line."""
    return [w for line in lines for w in textwrap.wrap(
        line, width, subsequent_indent=" " * (len(line) - len(line.lstrip()) + 2)) or [""]]


def format_text(summary: dict[str, tp.Any]) -> str:
    stages = summary["stages"]
    lines = [f"run {summary['run_dir']}: stages {', '.join(stages)}; "
             f"time lost {duration(summary['time_lost_s'])}"
             + (f", idle {duration(summary['time_idle_s'])} (finished, then extended)"
                if summary["time_idle_s"] else "")]
    for name, s in stages.items():
        lines += wrap(stage_lines(name, s), TEXT_WIDTH)
    if summary["slurm_requeues"]:
        q = summary["slurm_requeues"]
        lines.append(f"SLURM: {q['jobs']} job(s), requeued {q['timeouts']} times at a time limit, "
                     f"{q['other']} times otherwise (preemption, operator)")
    for folder, counts in summary["crash_loop_counts"].items():
        lines.append(f"crash-loop counts in {folder}: " + ", ".join(f"{k} {n}" for k, n in counts.items())
                     + " (runs that died after resuming from it, before their next save)")
    for path, n in summary["unreadable_lines"].items():
        lines.append(f"{path}: {n} unreadable line(s) skipped (e.g. the last line of a killed process)")
    if summary.get("png"):
        lines.append(f"report drawn to {summary['png']}")
    return "\n".join(lines)


# ----- small helpers ---------------------------------------------------------------------------


def finite_number(value: tp.Any) -> float | None:
    """A finite number, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def step_of(record: Record, key: str = "step") -> int | None:
    value = record.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def dig(mapping: tp.Any, *keys: str) -> tp.Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping
