"""The picture of ``radiodiff-resume report``: one PNG, per stage a block of progress, loss, gradient
norm, skipped steps, one axis per validation metric and the summary, with the run's events marked
(matplotlib is imported only here, so reading and summarising a run stays cheap).

A long gap between two processes (a finished run extended later, a job waiting in the queue) is cut
short on the progress panel's time axis, its length written on the cut, so that it does not squeeze
the rest of the run into a sliver.
"""

from __future__ import annotations

import os
import secrets
import typing as tp
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from radiodiff_resume.errors import UserError
from radiodiff_resume.tools.report_data import (
    STEP_FOLDER,
    STEPS_KEY,
    VAL_BOOKKEEPING,
    Point,
    Record,
    Run,
    Stage,
    dig,
    duration,
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
    "rebaselined": ("loss spikes taken as the new level", "tab:olive", "--", 1.4),
    "halted": ("halt, refused save / resume", "black", "-", 1.4),
    "finished": ("finished (reached train_num_steps)", "tab:green", "-", 1.4),
}
"""Event kind → legend label, colour, line style and width of its vertical line."""
SAVE_STYLE = {"marker": "^", "color": "tab:green", "markersize": 6, "linestyle": "none"}
SAVE_LABEL = "checkpoint saved"
DISCARDED_STYLE = {"marker": "x", "color": "0.6", "linestyle": "none", "markersize": 4}
DISCARDED_LABEL = "logged, then redone"
SKIP_LINE = 3.0
"""Width in points of a skipped-steps stack: a step is far narrower than a pixel on a long run."""
VALIDATION_ORDER = ("rmse", "nmse", "psnr", "ssim")
UNITS = {"psnr": "psnr (dB)"}
CUT_OVER = 0.25
"""A gap between processes longer than this share of the stage's active time is cut short..."""
CUT_WIDTH = 0.04
"""...to this share of the active time."""
TICKS = 6
"""Tick labels along the progress panel's time axis, shared among the stretches between cuts."""
TEXT_WRAP = 64
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
        elif kind == "loss_rebaselined":
            found.append(Mark("rebaselined", e["time"], last))
        elif kind in ("halted", "save_refused", "resume_refused"):
            found.append(Mark("halted", e["time"], last))
        elif kind == "finished":
            found.append(Mark("finished", e["time"], last))
    return found


@dataclass
class Cut:
    """A gap between two processes drawn narrower on the time axis (seconds since the first record)."""

    start: float
    end: float
    width: float
    label: str


def time_cuts(stage: Stage, s: dict[str, tp.Any]) -> list[Cut]:
    """The gaps worth cutting: in each restart's window (the previous process's last progress to the
    resume) its longest stretch without a record, when longer than ``CUT_OVER`` of the active time."""
    times = sorted(r["time"] for r in stage.train + stage.val + stage.events)
    gaps = []
    for r in s["restarts"]:
        lo, hi = r["time"] - r["down_s"] - r["idle_s"], r["time"]
        inside = [lo, *(t for t in times if lo < t < hi), hi]
        a, b = max(pairwise(inside), key=lambda pair: pair[1] - pair[0])
        gaps.append((a, b, "idle" if r["idle_s"] else "down"))
    active = max(times[-1] - times[0] - sum(b - a for a, b, _ in gaps), 0.0) if times else 0.0
    width = CUT_WIDTH * max(active, 0.01 * (times[-1] - times[0] if times else 0.0))
    return [Cut(a, b, width, f"{duration(b - a)} {kind}") for a, b, kind in gaps
            if b - a > max(CUT_OVER * active, width)]


@dataclass
class Squeeze:
    """The progress panel's time axis with ``cuts`` (in axis units) drawn narrower: piecewise linear,
    slope 1 outside the cuts, so every time keeps its true value as a tick label."""

    cuts: list[Cut]

    def forward(self, x: tp.Any) -> tp.Any:
        x = np.asarray(x, dtype=float)
        y = x.copy()
        for c in self.cuts:
            y -= np.clip(x - c.start, 0, c.end - c.start) * (1 - c.width / (c.end - c.start))
        return y

    def inverse(self, y: tp.Any) -> tp.Any:
        y = np.asarray(y, dtype=float)
        x, removed = y.copy(), 0.0
        for c in self.cuts:
            x += np.clip(y - (c.start - removed), 0, c.width) * ((c.end - c.start) / c.width - 1)
            removed += c.end - c.start - c.width
        return x


def draw(run: Run, summary: dict[str, tp.Any], out: Path) -> None:
    """The report's PNG, written atomically to ``out``."""
    _save_atomic(build_figure(run, summary), out)


def build_figure(run: Run, summary: dict[str, tp.Any]) -> tp.Any:
    """Per stage a block: progress, loss and gradient norm above; skipped steps and validation metrics
    below; the stage's summary in a column of its own, as tall as the block (it can run long)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names = list(run.stages)
    fig = Figure(figsize=(18, 7.4 * len(names) + 0.9), layout="constrained", dpi=DPI)
    fig.suptitle(f"radiodiff-resume report: {run.folder}", fontsize=13)
    origin = min(r["time"] for st in run.stages.values() for r in st.train + st.val + st.events)
    present = set()
    subfigs = fig.subfigures(len(names), 1, squeeze=False)[:, 0]
    for sf, name in zip(subfigs, names, strict=True):
        stage, s = run.stages[name], summary["stages"][name]
        sf.set_facecolor("0.97")
        sf.suptitle(f"stage {name}", fontsize=12, fontweight="bold")
        grid = sf.add_gridspec(2, 4, width_ratios=(1, 1, 1, 0.95))
        stage_marks = marks(stage, s)
        present |= {m.kind for m in stage_marks}
        present |= {"saved" for e in stage.events if e.get("event") == "checkpoint_saved"}
        progress_ax = sf.add_subplot(grid[0, 0])
        _draw_progress(progress_ax, stage, s, stage_marks, origin)
        loss_ax = sf.add_subplot(grid[0, 1])
        grad_ax = sf.add_subplot(grid[0, 2], sharex=loss_ax)
        skip_ax = sf.add_subplot(grid[1, 0], sharex=loss_ax)
        _draw_loss(loss_ax, stage, s)
        _draw_grad_norm(grad_ax, stage, name, run.config)
        _draw_skipped(skip_ax, stage)
        val_axes = _draw_validation(sf, grid[1, 1:3], loss_ax, stage)
        for ax in (loss_ax, grad_ax, skip_ax, *val_axes):
            _draw_marks(ax, stage_marks, lambda m: m.step)
            _draw_saves(ax, stage, lambda e: e["step"])
        _draw_text(sf.add_subplot(grid[:, 3]), stage_lines(name, s))
        for axis in (loss_ax.xaxis, progress_ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], label=SAVE_LABEL, **SAVE_STYLE)] * ("saved" in present) + [
        Line2D([], [], color=color, linestyle=ls, linewidth=width, label=label)
        for kind, (label, color, ls, width) in MARKS.items() if kind in present]
    if handles:  # a run without events.jsonl has no markers to explain
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=10,
                   title="event markers: vertical lines at the step (progress: the time) of the event; "
                         "saves as triangles on the step axis", title_fontsize=10)
    return fig


def _draw_progress(ax: tp.Any, stage: Stage, s: dict[str, tp.Any], stage_marks: list[Mark],
                   origin: float) -> None:
    stage_cuts = time_cuts(stage, s)
    times = [r["time"] for r in stage.train + stage.val + stage.events]
    shown = max(times) - min(times) - sum(c.end - c.start - c.width for c in stage_cuts)
    unit, scale = ("h", 3600.0) if shown > 7200 else ("min", 60.0) if shown > 120 else ("s", 1.0)

    def clock(t: float) -> float:
        return (t - origin) / scale

    points = progress(stage)
    starts = sorted(r["time"] for r in s["restarts"])
    segment: list[Point] = []
    segments = [segment]
    for p in points:
        if starts and p.time >= starts[0]:
            starts.pop(0)
            segment = []
            segments.append(segment)
        segment.append(p)
    for i, seg in enumerate(x for x in segments if x):
        ax.plot([clock(p.time) for p in seg], [p.step for p in seg], color="tab:gray", marker=".",
                markersize=3, label="completed step" if i == 0 else None)
    labelled = set()
    for r in s["restarts"]:
        label = "idle (had finished)" if r["idle_s"] else "down between processes"
        ax.axvspan(clock(r["time"] - r["down_s"] - r["idle_s"]), clock(r["time"]),
                   color="tab:green" if r["idle_s"] else "tab:blue", alpha=0.12,
                   label=None if label in labelled else label)
        labelled.add(label)
    _draw_marks(ax, stage_marks, lambda m: clock(m.time))
    _draw_saves(ax, stage, lambda e: clock(e["time"]))
    xlabel = f"wall time since the run's first record ({unit})"
    if stage_cuts:
        _cut_axis(ax, [Cut(clock(c.start), clock(c.end), c.width / scale, c.label) for c in stage_cuts])
        xlabel += ", long gaps cut short"
    ax.set(title="progress: step over wall time", xlabel=xlabel, ylabel="step")
    ax.legend(fontsize=8, loc="best")


def _cut_axis(ax: tp.Any, axis_cuts: list[Cut]) -> None:
    """Draw ``axis_cuts`` narrow, each marked as a break of the axis with its length written on it;
    ticks are shared among the stretches between cuts and kept off the breaks."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    squeeze = Squeeze(axis_cuts)
    ax.set_xscale("function", functions=(squeeze.forward, squeeze.inverse))
    ax.autoscale_view()
    lo, hi = ax.get_xlim()
    total = float(squeeze.forward(hi) - squeeze.forward(lo))
    edges = [lo, *(x for c in axis_cuts for x in (c.start, c.end)), hi]
    ticks = []
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        n = max(1, round(TICKS * float(squeeze.forward(b) - squeeze.forward(a)) / total))
        ticks += [t for t in MaxNLocator(n).tick_values(a, b) if a <= t <= b and all(
            abs(float(squeeze.forward(t) - squeeze.forward(x))) > 0.1 * total
            for c in axis_cuts for x in (c.start, c.end))]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xlim(lo, hi)
    slash = {"marker": [(-1, -1.5), (1, 1.5)], "markersize": 10, "linestyle": "none", "color": "black",
             "mew": 1.2, "clip_on": False, "transform": ax.get_xaxis_transform()}
    for c in axis_cuts:
        ax.plot([c.start, c.end, c.start, c.end], [0, 0, 1, 1], **slash)
        middle = float(squeeze.inverse(squeeze.forward(c.start) + c.width / 2))
        ax.text(middle, 0.5, f"axis cut: {c.label}", rotation=90, ha="center", va="center", fontsize=8,
                transform=ax.get_xaxis_transform(), bbox={"facecolor": "white", "edgecolor": "0.6"})


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
    ax.set(title="training loss (mean per log interval)", xlabel="step",
           ylabel="loss (log scale)" if log else "loss")
    ax.legend(fontsize=8, loc="lower left" if s["rollbacks"] else "best")  # never over the arrows on top


def _draw_grad_norm(ax: tp.Any, stage: Stage, name: str, config: dict[str, tp.Any]) -> None:
    kept, discarded = timeline(stage.train)
    steps, norms = _series(kept, "grad_norm")
    ax.set(title="gradient norm before clipping (per log interval)", xlabel="step",
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
    stacks = [(f"step skipped: {reason}", f"C{i}", "o",
               Counter({st: n for (st, r), n in skips.items() if r == reason}))
              for i, reason in enumerate(sorted({r for _, r in skips}))]
    if batches:
        stacks.append(("micro-batches left out", "tab:brown", "s", batches))
    for label, color, marker, counts in stacks:
        steps = sorted(counts)
        tops = [bottom[st] + counts[st] for st in steps]
        ax.vlines(steps, [bottom[st] for st in steps], tops, color=color, linewidth=SKIP_LINE)
        ax.plot(steps, tops, marker, color=color, markersize=6, linestyle="none", label=label)
        bottom.update(counts)
    step, most = bottom.most_common(1)[0]
    left = step > sum(ax.get_xlim()) / 2  # the label stays inside the panel
    ax.annotate(f"{most} at step {step}", (step, most), xytext=(-4 if left else 4, 4),
                textcoords="offset points", ha="right" if left else "left", fontsize=8)
    ax.set_ylim(0, most * 1.25 + 0.5)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left")


def _draw_validation(sf: tp.Any, cell: tp.Any, loss_ax: tp.Any, stage: Stage) -> list[tp.Any]:
    """One small axis per metric in ``cell``, each on its own linear scale (rmse and ssim differ by
    orders of magnitude and move by little), all sharing the step axis; the axes drawn."""
    from matplotlib.ticker import MaxNLocator

    kept, discarded = timeline(stage.val)
    found = {k.removeprefix("val/") for r in kept for k in r
             if k.startswith("val/") and k not in VAL_BOOKKEEPING}
    names = [k for k in VALIDATION_ORDER if k in found] + sorted(found - set(VALIDATION_ORDER))
    if not names:
        ax = sf.add_subplot(cell, sharex=loss_ax)
        ax.set(title="validation metrics", xlabel="step")
        ax.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
        return [ax]
    columns = min(len(names), 2)
    rows = -(-len(names) // columns)
    grid = cell.subgridspec(rows, columns)
    invalid = [r["step"] for r in kept if r.get("val/valid") is False]
    axes: list[tp.Any] = []
    for i, name in enumerate(names):
        ax = sf.add_subplot(grid[i // columns, i % columns], sharex=loss_ax)
        key = f"val/{name}"
        ax.plot(*_series(kept, key), marker="o", markersize=3, color=f"C{i}")
        redone = _series(discarded, key)
        if redone[0]:
            ax.plot(*redone, label=DISCARDED_LABEL, **DISCARDED_STYLE)
        if invalid:
            ax.plot(invalid, [0.03] * len(invalid), "X", color="tab:red", linestyle="none",
                    transform=ax.get_xaxis_transform(), label="invalid (no finite sample)")
        ax.set_title(f"validation {name}", fontsize=9, pad=3)
        ax.set_ylabel(UNITS.get(name, name))
        ax.yaxis.set_major_locator(MaxNLocator(4))
        ax.ticklabel_format(axis="y", useOffset=False)
        if i + columns < len(names):
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("step")
        if (invalid or redone[0]) and not any(a.get_legend() for a in axes):
            ax.legend(fontsize=7, loc="best")  # once: the same markers on every metric
        axes.append(ax)
    return axes


def _draw_text(ax: tp.Any, lines: list[str]) -> None:
    ax.axis("off")
    ax.set_title("summary", fontsize=10)
    ax.text(0, 1, "\n".join(wrap(lines, TEXT_WRAP)), va="top", ha="left", family="monospace", fontsize=8,
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
