"""The picture of ``radiodiff-resume report``: one PNG, per stage a row of progress, loss, gradient
norm, skipped steps, validation and the summary, with the run's events marked (matplotlib is imported
only here, so reading and summarising a run stays cheap)."""

from __future__ import annotations

import os
import secrets
import typing as tp
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from radiodiff_resume.errors import UserError
from radiodiff_resume.tools.report import (
    STEP_FOLDER,
    STEPS_KEY,
    VAL_BOOKKEEPING,
    Point,
    Record,
    Run,
    Stage,
    dig,
    finite_number,
    progress,
    stage_lines,
    step_of,
    timeline,
    wrap,
)

MARKS = {
    "stopped": ("stop (preemption, signal)", "tab:orange", "-", 1.4),
    "restart": ("restart (new process)", "tab:blue", "--", 1.4),
    "rolled_back": ("rollback (arrow: steps redone)", "tab:red", "-.", 1.4),
    "quarantine": ("checkpoint quarantined / set aside", "tab:purple", ":", 2.6),
    "halted": ("halt, refused save / resume", "black", "-", 1.4),
}
"""Event kind → legend label, colour, line style and width of its vertical line."""
SAVE_STYLE = {"marker": "^", "color": "tab:green", "markersize": 6, "linestyle": "none"}
SAVE_LABEL = "checkpoint saved"
DISCARDED_STYLE = {"marker": "x", "color": "0.6", "linestyle": "none", "markersize": 4}
DISCARDED_LABEL = "logged, then redone"
DPI = 72


@dataclass
class Mark:
    kind: str
    time: float
    step: int


def marks(stage: Stage, summary: dict[str, tp.Any]) -> list[Mark]:
    """The events drawn as vertical lines, each at the step (and time) it concerns."""
    found = [Mark("restart", r["time"], r["to_step"]) for r in summary["restarts"]]
    found += [Mark("rolled_back", r["time"], r["step"]) for r in summary["rollbacks"]]
    last = 0
    for e in stage.events:
        kind, step = e.get("event"), step_of(e)
        folder = STEP_FOLDER.fullmatch(Path(str(e.get("path", ""))).name)
        if step is None and folder:
            step = int(folder.group(1))
        last = step if step is not None else last
        if kind == "stopped":
            found.append(Mark("stopped", e["time"], last))
        elif kind in ("checkpoint_quarantined", "checkpoint_set_aside", "checkpoints_set_aside"):
            found.append(Mark("quarantine", e["time"], last))
        elif kind in ("halted", "save_refused", "resume_refused"):
            found.append(Mark("halted", e["time"], last))
    return found


def draw(run: Run, summary: dict[str, tp.Any], out: Path) -> None:
    """One PNG: per stage a row of progress, loss, gradient norm, skipped steps, validation and the
    stage's summary; written atomically to ``out``."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names = list(run.stages)
    fig = Figure(figsize=(18, 7.4 * len(names) + 0.9), layout="constrained")
    fig.suptitle(f"radiodiff-resume report: {run.folder}", fontsize=13)
    times = [r["time"] for st in run.stages.values() for r in st.train + st.val + st.events]
    origin = min(times)
    span = max(times) - origin
    unit, scale = ("h", 3600.0) if span > 7200 else ("min", 60.0) if span > 120 else ("s", 1.0)

    def clock(t: float) -> float:
        return (t - origin) / scale

    present = set()
    subfigs = fig.subfigures(len(names), 1, squeeze=False)[:, 0]
    for sf, name in zip(subfigs, names, strict=True):
        stage, s = run.stages[name], summary["stages"][name]
        sf.set_facecolor("0.97")
        sf.suptitle(f"stage {name}", fontsize=12, fontweight="bold")
        axes = sf.subplots(2, 3)
        stage_marks = marks(stage, s)
        present |= {m.kind for m in stage_marks}
        present |= {"saved" for e in stage.events if e.get("event") == "checkpoint_saved"}
        _draw_progress(axes[0][0], stage, s, stage_marks, clock, unit)
        loss_ax = axes[0][1]
        for ax in (axes[0][2], axes[1][0], axes[1][1]):
            ax.sharex(loss_ax)
        _draw_loss(loss_ax, stage, s)
        _draw_grad_norm(axes[0][2], stage, name, run.config)
        _draw_skipped(axes[1][0], stage)
        _draw_validation(axes[1][1], stage)
        for ax in (loss_ax, axes[0][2], axes[1][0], axes[1][1]):
            _draw_marks(ax, stage_marks, lambda m: m.step)
            _draw_saves(ax, stage, lambda e: e["step"])
        _draw_text(axes[1][2], stage_lines(name, s))
        for axis in (loss_ax.xaxis, axes[0][0].yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], label=SAVE_LABEL, **SAVE_STYLE)] * ("saved" in present) + [
        Line2D([], [], color=color, linestyle=ls, linewidth=width, label=label)
        for kind, (label, color, ls, width) in MARKS.items() if kind in present]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10,
               title="event markers: vertical lines at the step (progress: the time) of the event; "
                     "saves as triangles on the step axis", title_fontsize=10)
    _save_atomic(fig, out)


def _draw_progress(ax: tp.Any, stage: Stage, s: dict[str, tp.Any], stage_marks: list[Mark],
                   clock: tp.Callable[[float], float], unit: str) -> None:
    points = progress(stage)
    cuts = sorted(r["time"] for r in s["restarts"])
    segment: list[Point] = []
    segments = [segment]
    for p in points:
        if cuts and p.time >= cuts[0]:
            cuts.pop(0)
            segment = []
            segments.append(segment)
        segment.append(p)
    for i, seg in enumerate(x for x in segments if x):
        ax.plot([clock(p.time) for p in seg], [p.step for p in seg], color="tab:gray", marker=".",
                markersize=3, label="completed step" if i == 0 else None)
    for i, r in enumerate(s["restarts"]):
        ax.axvspan(clock(r["time"] - r["down_s"]), clock(r["time"]), color="tab:blue", alpha=0.12,
                   label="down between processes" if i == 0 else None)
    _draw_marks(ax, stage_marks, lambda m: clock(m.time))
    _draw_saves(ax, stage, lambda e: clock(e["time"]))
    ax.set(title="progress: step over wall time", xlabel=f"wall time since the run's first record ({unit})",
           ylabel="step")
    ax.legend(fontsize=8, loc="best")


def _series(records: list[Record], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], v) for r in records if (v := finite_number(r.get(key))) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _draw_loss(ax: tp.Any, stage: Stage, s: dict[str, tp.Any]) -> None:
    kept, discarded = timeline(stage.train)
    ax.plot(*_series(kept, "loss"), marker=".", markersize=4, color="tab:blue", label="training loss")
    if _series(discarded, "loss")[0]:
        ax.plot(*_series(discarded, "loss"), label=DISCARDED_LABEL, **DISCARDED_STYLE)
    bad = [r["step"] for r in kept if r.get("loss") is None]
    if bad:
        ax.plot(bad, [0.03] * len(bad), "X", color="tab:red", transform=ax.get_xaxis_transform(),
                linestyle="none", label="non-finite loss")
    log = _log_scale(ax, _series(kept + discarded, "loss")[1])
    if s["rollbacks"]:
        _headroom(ax, 0.15)
    for r in s["rollbacks"]:
        ax.annotate("", xy=(r["to_step"], 0.93), xytext=(r["step"], 0.93), xycoords=ax.get_xaxis_transform(),
                    arrowprops={"arrowstyle": "->", "color": "tab:red", "linewidth": 1.4})
    ax.set(title="training loss (mean over each log interval)", xlabel="step",
           ylabel="loss (log scale)" if log else "loss")
    ax.legend(fontsize=8, loc="best")


def _draw_grad_norm(ax: tp.Any, stage: Stage, name: str, config: dict[str, tp.Any]) -> None:
    kept, discarded = timeline(stage.train)
    steps, norms = _series(kept, "grad_norm")
    ax.set(title="gradient norm before clipping (mean over each log interval)", xlabel="step",
           ylabel="norm")
    if not steps:
        ax.text(0.5, 0.5, "no grad_norm logged", ha="center", va="center", transform=ax.transAxes)
        return
    ax.plot(steps, norms, marker=".", markersize=4, color="tab:blue", label="gradient norm")
    if _series(discarded, "grad_norm")[0]:
        ax.plot(*_series(discarded, "grad_norm"), label=DISCARDED_LABEL, **DISCARDED_STYLE)
    ceiling = dig(config, *STEPS_KEY.get(name, ("-",)), "max_grad_norm")
    if dig(config, "guard", "clip", "mode") in ("zscore", "fixed") and finite_number(ceiling):
        ax.axhline(ceiling, color="tab:red", linestyle="--", linewidth=1.2,
                   label=f"clip ceiling (max_grad_norm {ceiling:g})")
    adaptive = [(e["step"], t) for e in stage.events if e.get("event") == "grad_clipped"
                and step_of(e) is not None and (t := finite_number(e.get("threshold"))) is not None]
    if adaptive:
        ax.plot(*zip(*adaptive, strict=True), "v", color="tab:orange", linestyle="none", markersize=4,
                label="adaptive clip threshold")
    if _log_scale(ax, norms):
        ax.set_ylabel("norm (log scale)")
    ax.legend(fontsize=8, loc="best")


def _draw_skipped(ax: tp.Any, stage: Stage) -> None:
    skips = Counter((e["step"], str(e.get("reason"))) for e in stage.events
                    if e.get("event") == "step_skipped" and step_of(e) is not None)
    batches = Counter()
    for e in stage.events:
        if e.get("event") == "batch_skipped" and step_of(e) is not None:
            batches[e["step"]] += int(finite_number(e.get("micro_batches")) or 0)
    ax.set(title="skipped optimizer steps and micro-batches", xlabel="step (attempted)", ylabel="count")
    if not skips and not batches:
        ax.text(0.5, 0.5, "nothing skipped", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return
    bottom: Counter[int] = Counter()
    for reason in sorted({r for _, r in skips}):
        steps = sorted(st for st, r in skips if r == reason)
        heights = [skips[(st, reason)] for st in steps]
        ax.bar(steps, heights, bottom=[bottom[st] for st in steps], width=0.8,
               label=f"step skipped: {reason}")
        for st, h in zip(steps, heights, strict=True):
            bottom[st] += h
    if batches:
        steps = sorted(batches)
        ax.bar(steps, [batches[st] for st in steps], bottom=[bottom[st] for st in steps], width=0.8,
               color="none", edgecolor="tab:brown", hatch="//", label="micro-batches left out")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left")


def _draw_validation(ax: tp.Any, stage: Stage) -> None:
    kept, discarded = timeline(stage.val)
    ax.set(title="validation metrics", xlabel="step", ylabel="rmse, nmse, ssim (symlog)")
    keys = sorted({k for r in kept for k in r if k.startswith("val/") and k not in VAL_BOOKKEEPING})
    if not kept:
        ax.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=ax.transAxes)
        return
    handles = []
    right = None
    for k in keys:
        steps, values = _series(kept, k)
        if k == "val/psnr":
            right = right or ax.twinx()
            handles += right.plot(steps, values, marker="o", markersize=3, color="black",
                                  label="psnr (dB, right)")
            right.set_ylabel("psnr (dB)")
        else:
            handles += ax.plot(steps, values, marker="o", markersize=3, label=k.removeprefix("val/"))
    for i, k in enumerate(k for k in keys if k != "val/psnr" and _series(discarded, k)[0]):
        line = ax.plot(*_series(discarded, k), label=DISCARDED_LABEL, **DISCARDED_STYLE)
        handles += line if i == 0 else []
    invalid = [r["step"] for r in kept if r.get("val/valid") is False]
    if invalid:
        handles += ax.plot(invalid, [0.03] * len(invalid), "X", color="tab:red", linestyle="none",
                           transform=ax.get_xaxis_transform(), label="invalid (no finite sample)")
    ax.set_yscale("symlog", linthresh=1e-2)
    for axis in (ax, right):
        _headroom(axis, 0.45)
    ax.legend(handles=handles, fontsize=8, loc="upper center", ncol=3)


def _draw_text(ax: tp.Any, lines: list[str]) -> None:
    ax.axis("off")
    ax.text(0, 1, "\n".join(wrap(lines, 64)), va="top", ha="left", family="monospace", fontsize=8,
            transform=ax.transAxes)


def _draw_marks(ax: tp.Any, stage_marks: list[Mark], where: tp.Callable[[Mark], float]) -> None:
    for m in stage_marks:
        _, color, ls, width = MARKS[m.kind]
        ax.axvline(where(m), color=color, linestyle=ls, linewidth=width, alpha=0.8)


def _draw_saves(ax: tp.Any, stage: Stage, where: tp.Callable[[Record], float]) -> None:
    saves = [where(e) for e in stage.events
             if e.get("event") == "checkpoint_saved" and step_of(e) is not None]
    if saves:
        ax.plot(saves, [0.0] * len(saves), transform=ax.get_xaxis_transform(), clip_on=False, **SAVE_STYLE)


def _log_scale(ax: tp.Any, values: list[float]) -> bool:
    """A log y axis when every value is positive (whether it became one)."""
    if values and min(values) > 0:
        ax.set_yscale("log")
        return True
    return False


def _headroom(ax: tp.Any | None, fraction: float) -> None:
    """Extend the y range upwards by ``fraction`` of its height (in the axis' scale), so that a legend
    or arrows at the top cover no data."""
    if ax is None:
        return
    ax.autoscale_view()
    scale = ax.yaxis.get_transform()
    lo, hi = scale.transform(list(ax.get_ylim()))
    ax.set_ylim(*scale.inverted().transform([lo, hi + fraction * (hi - lo)]))


def _save_atomic(fig: tp.Any, out: Path) -> None:
    """Write aside in the same folder, then rename: a reader never sees a half-written PNG."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with tmp.open("xb") as f:  # "x": a new file, with the umask's permissions
            fig.savefig(f, format="png", dpi=DPI)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {out}: {exc.strerror} (choose another --out)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
