"""Cost of the numerical guards: a guarded training step against guards off and a plain accelerate loop.

Three variants run on one real LDM trainer (same model, optimizer, EMA, noise generator and the
same pre-fetched real batches), interleaved round by round in one process; every figure in the
``bench_guard`` section of ``bench/RESULTS.md`` is a ratio between variants measured in the same
invocation (speed is measured, never asserted). Host syncs per step are counted with an
instrumented ``torch.Tensor``, as in ``tests/guard/test_syncs.py``.

    python bench/bench_guard.py                       # tiny and medium (under 2 min on 2 cores)
    python bench/bench_guard.py --size medium --repeats 15 --steps 10

See ``bench/README.md`` for what each variant does and how to read the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import itertools
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import typing as tp
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import accelerate
import diffusers
import torch
from results import cpu_model, write_section

import radiodiff_resume.guard.policy as policy_mod
from radiodiff_resume.build import write_untrained_first_stage
from radiodiff_resume.config import load_config
from radiodiff_resume.run import build_ldm_trainer, make_accelerator
from radiodiff_resume.trainer.base import Batch
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "radio_tiny.yaml"
SECTION = "bench_guard"
AIM_CPU, AIM_GPU = 1.03, 1.01
"""From the issue: a guarded step costs at most this much more than the plain loop's."""

SIZES: dict[str, list[str]] = {
    # configs/radio_tiny.yaml as shipped (UNet [32, 64], 64 px maps, 16x16 latents, batch 16).
    "tiny": [],
    # bench_checkpoint's medium: a wider, deeper UNet (about 10 M trainable parameters).
    "medium": [
        "model.unet.params.block_out_channels=[64,128,256]",
        "model.unet.params.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
        "model.unet.params.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]",
        "data.image_size=64",
    ],
}
GUARDS_LIVE = ["guard.clip.mode=zscore", "guard.clip.warmup=2", "guard.loss.warmup=2"]
"""Default guards, with warm-ups short enough that adaptive clipping and spike tests really run."""
FIT_STEPS = 2
"""Real ``fit()`` steps before measuring: scale_by_std, optimizer and EMA state, guard statistics
past their warm-up (2)."""

VARIANTS = ("guarded", "off", "plain")
LABELS = {
    "guarded": "guarded `train_step()`",
    "off": "`train_step()`, guards off",
    "plain": "plain accelerate loop",
}

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
OPTIMIZER_COUNTERS = str(Path(torch.optim.__file__).parent)


# ----- the trainer ---------------------------------------------------------------------
def build_trainer(size: str, work: Path, cache_dir: str | None) -> LatentDiffusionTrainer:
    overrides = [
        f"trainer.results_folder={work / 'run'}",
        f"model.first_stage.ckpt_path={work / 'ae.safetensors'}",
        "trainer.val_batches=0",
        f"trainer.train_num_steps={FIT_STEPS}",
        f"trainer.save_and_sample_every={FIT_STEPS}",
        f"trainer.log_freq={FIT_STEPS}",
        "trainer.lr_warmup_steps=0",
        "trainer.ema_update_after_step=0",
        "trainer.num_sample_images=1",
        "model.sampling_timesteps=2",
        *GUARDS_LIVE,
        *SIZES[size],
    ]
    if cache_dir:
        overrides.append(f"data.synthetic.cache_dir={cache_dir}")
    cfg = load_config(CONFIG, overrides)
    write_untrained_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
    trainer.fit()
    trainer.model.train()
    return trainer


# ----- the three variants --------------------------------------------------------------
class Variants:
    """One block of ``len(batches)`` optimizer steps per variant; each returns the steps taken."""

    def __init__(self, trainer: LatentDiffusionTrainer, batches: list[Batch]) -> None:
        self.trainer = trainer
        self.batches = batches

    def trainer_steps(self, guards: bool) -> int:
        """``trainer.train_step()`` over the batches; guards toggled on the same trainer (between
        optimizer steps, where the guard's per-step accumulators are freshly reset)."""
        t = self.trainer
        t.guard.enabled = guards
        t.train_stream = iter(self.batches)  # type: ignore[assignment]
        return sum(t.train_step().stepped for _ in self.batches)

    def guarded(self) -> int:
        return self.trainer_steps(True)

    def off(self) -> int:
        return self.trainer_steps(False)

    def plain(self) -> int:
        """The loop a user writes with accelerate alone, on the trainer's prepared objects."""
        t = self.trainer
        accelerator, model, optimizer, params = t.accelerator, t.model, t.optimizer, t.params
        max_norm = t.loop.max_grad_norm or 1.0
        for batch in self.batches:
            with accelerator.accumulate(model):
                loss = model(batch["image"], batch["cond"], generator=t.noise)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, max_norm)
                optimizer.step()
                optimizer.zero_grad()
            t.lr_schedule.step()
            if t.ema is not None:
                t.ema.step(params)
        return len(self.batches)

    def run(self, name: str) -> int:
        return tp.cast(tp.Callable[[], int], getattr(self, name))()


def device_sync() -> None:
    """On a GPU, wait for queued work: a block is timed until its last kernel finished (the unguarded
    variants never read the device, so without this their time would stop early)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Block:
    wall: float
    """Wall seconds per optimizer step."""
    cpu: float
    """CPU seconds of this process per optimizer step."""
    faults: float
    """Minor page faults per optimizer step (memory the allocator got fresh from the kernel)."""
    taken: int
    """Optimizer steps really taken."""


def timed(fn: tp.Callable[[], int], steps: int) -> Block:
    gc.collect()
    device_sync()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, start = time.process_time(), time.perf_counter()
    taken = fn()
    device_sync()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return Block(wall / steps, cpu / steps, faults / steps, taken)


# ----- host syncs ----------------------------------------------------------------------
class SyncCounter:
    """Every read of a tensor value by Python, except torch.optim's reads of its CPU step counters."""

    def __init__(self) -> None:
        self.where: list[str] = []

    def __enter__(self) -> SyncCounter:
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name: str, original: tp.Callable[..., tp.Any]) -> tp.Callable[..., tp.Any]:
        counter = self

        def read(tensor: torch.Tensor, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            frame = sys._getframe(1)
            if not frame.f_code.co_filename.startswith(OPTIMIZER_COUNTERS):
                counter.where.append(f"`{name}` in {_short(frame.f_code.co_filename)}:{frame.f_lineno}")
            return original(tensor, *args, **kwargs)

        return read


def _short(filename: str) -> str:
    for root in (str(REPO) + os.sep, "site-packages" + os.sep):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


# ----- breakdown (a separate, instrumented pass) ---------------------------------------
class Profile:
    """Exclusive seconds per label: a wrapped call nested in another one is not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._children: list[float] = []

    def wrap(self, fn: tp.Callable[..., tp.Any], label: str) -> tp.Callable[..., tp.Any]:
        def wrapper(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self._children.pop()
                self.seconds[label] = self.seconds.get(label, 0.0) + elapsed - nested
                if self._children:
                    self._children[-1] += elapsed

        return wrapper


@contextlib.contextmanager
def instrumented(targets: list[tuple[object, str, str]], profile: Profile) -> tp.Iterator[None]:
    """Each ``obj.attr`` replaced by a timed wrapper for the duration, then put back."""
    saved = []
    for obj, attr, label in targets:
        own = attr in vars(obj)  # modules, classes, patched instances: restore; else drop the override
        saved.append((obj, attr, vars(obj).get(attr), own))
        setattr(obj, attr, profile.wrap(getattr(obj, attr), label))
    try:
        yield
    finally:
        for obj, attr, original, own in reversed(saved):
            if own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)


STEP_OTHER = "train_step: rest (to_device, StepOutcome, counters, loop)"
PLAIN_OTHER = "plain loop: rest (accumulate context, loop)"
CLIP = "accelerate `clip_grad_norm_` (total norm + foreach mul)"
COMMON = ("forward (loss)", "backward", "AdamW step", "accelerate optimizer wrapper", CLIP, "zero_grad",
          "LR schedule", "EMA update")
"""Work every variant (or both unguarded ones) does; listed first in the table, in this order."""


def breakdown_targets(t: LatentDiffusionTrainer, variant: str) -> list[tuple[object, str, str]]:
    """What to wrap, per variant; a label shared by variants names the same work. Parts only the
    guarded variant has are the guards' own cost."""
    g = t.guard
    inner = tp.cast(torch.optim.Optimizer, t.optimizer.optimizer)  # type: ignore[attr-defined]
    targets: list[tuple[object, str, str]] = [
        (t.accelerator, "backward", "backward"),
        (t.accelerator, "clip_grad_norm_", CLIP),
        (t.optimizer, "step", "accelerate optimizer wrapper"),
        (inner, "step", "AdamW step"),
        (t.optimizer, "zero_grad", "zero_grad"),
        (t.lr_schedule, "step", "LR schedule"),
    ]
    if t.ema is not None:
        targets.append((t.ema, "step", "EMA update"))
    if variant == "plain":
        return [(Variants, "plain", PLAIN_OTHER), (t.model, "forward", "forward (loss)"), *targets]
    targets += [
        (Variants, "trainer_steps", STEP_OTHER),
        (t, "training_loss", "forward (loss)"),
        (g, "_begin", "guard: per-step accumulators reset (runs with guards off too)"),
    ]
    if variant == "off":
        return [
            *targets,
            (g, "check_batch", "guard hooks when off (`check_batch`, `check_loss` return early)"),
            (g, "check_loss", "guard hooks when off (`check_batch`, `check_loss` return early)"),
            (g, "optimizer_step", "guards off: `_plain_step` rest (loss mean, StepOutcome)"),
        ]
    return [
        *targets,
        (g, "check_batch", "check_batch: rest (mask `.all()`, put-back check, bookkeeping)"),
        (g.norm_stats, "snapshot", "BN snapshot (copy of the running statistics)"),
        (policy_mod, "checked_batch", "batch check (isfinite, magnitude bound + where per tensor)"),
        (g, "check_loss", "loss check (isfinite, masked sums, where)"),
        (g, "optimizer_step", "decision: stack + the one read (`tolist`) + bookkeeping"),
        (policy_mod, "grads_of", "gradient list + total norm"),
        (policy_mod, "total_norm", "gradient list + total norm"),
        (g.clipper, "threshold", "clip threshold (z-score) + coefficient"),
        (g.clipper, "coefficient", "clip threshold (z-score) + coefficient"),
        (g.losses, "is_spike", "spike test (loss window)"),
        (policy_mod, "scale_grads", "gradient scaling (foreach mul)"),
        (g.clipper, "observe", "statistics update (norm + loss windows)"),
        (g.losses, "accept", "statistics update (norm + loss windows)"),
    ]


def _profile_variant(variants: Variants, name: str, steps: int) -> dict[str, float]:
    profile = Profile()
    with instrumented(breakdown_targets(variants.trainer, name), profile):
        gc.collect()
        start = time.perf_counter()
        variants.run(name)
        total = time.perf_counter() - start
    parts = {k: v / steps for k, v in profile.seconds.items() if v > 0}
    parts["total"] = total / steps
    return parts


def guard_only(parts: dict[str, dict[str, float]]) -> dict[str, float]:
    """Parts of the guarded step that neither unguarded variant has."""
    return {k: v for k, v in parts["guarded"].items()
            if k != "total" and k not in parts["off"] and k not in parts["plain"]}


def breakdown(variants: Variants, steps: int, passes: int) -> dict[str, dict[str, float]]:
    """Median ms per part and step, per variant, over ``passes`` instrumented blocks."""
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for i in range(passes):
        for name in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
            runs[name].append(_profile_variant(variants, name, steps))
    out: dict[str, dict[str, float]] = {}
    for name, per_pass in runs.items():
        labels = dict.fromkeys(k for p in per_pass for k in p)
        out[name] = {k: statistics.median(p.get(k, 0.0) for p in per_pass) for k in labels}
    return out


# ----- one size ------------------------------------------------------------------------
@dataclass
class SizeResult:
    size: str
    params: int
    bn_buffers: int
    device: str
    times: dict[str, list[float]]
    """Wall seconds per step, one value per round."""
    cpu_times: dict[str, list[float]]
    """CPU seconds of this process per step, one value per round (not inflated while another
    process holds the core; still inflated by shared caches and memory bandwidth)."""
    faults: dict[str, list[float]]
    """Minor page faults per step, one value per round."""
    syncs: dict[str, list[str]]
    sync_steps: int
    parts: dict[str, dict[str, float]]
    guard_actions: dict[str, int]
    taken: dict[str, int]
    offered: int

    def med(self, v: str) -> float:
        return statistics.median(self.times[v])

    def ratio(self, a: str, b: str) -> float:
        return self.med(a) / self.med(b)

    def ratio_min(self, a: str, b: str) -> float:
        return min(self.times[a]) / min(self.times[b])

    def ratio_paired(self, a: str, b: str) -> float:
        """Median of the per-round ratios (both measured within seconds of each other)."""
        return statistics.median(x / y for x, y in zip(self.times[a], self.times[b], strict=True))

    def faults_med(self, v: str) -> float:
        return statistics.median(self.faults[v])

    def ratio_cpu(self, a: str, b: str) -> float:
        return statistics.median(self.cpu_times[a]) / statistics.median(self.cpu_times[b])


def run_size(size: str, root: Path, args: argparse.Namespace) -> SizeResult:
    work = root / size
    trainer = build_trainer(size, work, args.cache_dir)
    steps = args.steps
    batches = [trainer.to_device(next(trainer.train_stream)) for _ in range(steps)]
    variants = Variants(trainer, batches)
    counts_before = dict(trainer.guard.counts)
    for _ in range(args.warmup):  # untimed: allocator growth, lazy inits, on every variant
        for name in VARIANTS:
            variants.run(name)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    faults: dict[str, list[float]] = {v: [] for v in VARIANTS}
    taken = dict.fromkeys(VARIANTS, 0)
    orders = list(itertools.permutations(VARIANTS))
    guard = trainer.guard
    if not (guard.clipper.adaptive and guard.losses.active):
        raise RuntimeError("the z-score clipping or the spike test is still in its warm-up: the guarded "
                           "variant would not measure them (raise FIT_STEPS or lower the warm-ups)")
    timed_counts = dict(guard.counts)
    for r in range(args.repeats):
        order = orders[r % len(orders)]  # every variant goes first, second and last equally often
        for name in order:
            block = timed(functools.partial(variants.run, name), steps)
            times[name].append(block.wall)
            cpu_times[name].append(block.cpu)
            faults[name].append(block.faults)
            taken[name] += block.taken
        print(f"  {size} round {r + 1}/{args.repeats}: " + ", ".join(
            f"{v} {times[v][-1] * 1e3:.1f}" for v in VARIANTS) + " ms/step", flush=True)
    actions = {k: trainer.guard.counts[k] - timed_counts[k] for k in trainer.guard.counts}
    actions["adaptive_clips_before_timing"] = timed_counts["adaptive_clips"] - counts_before["adaptive_clips"]
    syncs: dict[str, list[str]] = {}
    for name in VARIANTS:
        with SyncCounter() as counter:
            variants.run(name)
        syncs[name] = counter.where
    parts = breakdown(variants, steps, passes=args.breakdown_passes)
    result = SizeResult(
        size=size,
        params=sum(p.numel() for p in trainer.params),
        bn_buffers=len(trainer.guard.norm_stats.buffers),
        device=str(trainer.accelerator.device),
        times=times,
        cpu_times=cpu_times,
        faults=faults,
        syncs=syncs,
        sync_steps=steps,
        parts=parts,
        guard_actions=actions,
        taken=taken,
        offered=steps * args.repeats,
    )
    return result


# ----- report --------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _spread(values: list[float]) -> str:
    return f"{min(values) * 1e3:.1f}–{max(values) * 1e3:.1f}"


def _aim(device: str) -> float:
    return AIM_GPU if device.startswith("cuda") else AIM_CPU


def _syncs_per_step(r: SizeResult, v: str) -> str:
    n = len(r.syncs[v]) / r.sync_steps
    return f"{n:g}"


def _sync_places(r: SizeResult, v: str) -> str:
    if not r.syncs[v]:
        return "none"
    counts = Counter(r.syncs[v])
    return "; ".join(f"{w} ×{c / r.sync_steps:g}/step" for w, c in counts.most_common())


def size_section(r: SizeResult) -> str:
    aim = _aim(r.device)
    n = len(r.times["guarded"])
    g_p, g_o, o_p = r.ratio("guarded", "plain"), r.ratio("guarded", "off"), r.ratio("off", "plain")
    lines = [
        f"### {r.size}: {r.params / 1e6:.2f} M trainable parameters, {r.bn_buffers} BatchNorm buffers "
        f"snapshotted per step, device {r.device}",
        "",
        f"Milliseconds per optimizer step: median of {n} interleaved rounds of {r.sync_steps} steps each "
        "(min–max in brackets).",
        "",
        "| variant | ms / step | host syncs / step | minor page faults / step | steps taken |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for v in VARIANTS:
        lines.append(f"| {LABELS[v]} | {_ms(r.med(v))} ({_spread(r.times[v])}) | {_syncs_per_step(r, v)} | "
                     f"{r.faults_med(v):.0f} | "
                     f"{r.taken[v]} / {r.offered} |")
    lines += [
        "",
        "| ratio (wall time unless said) | of medians | of minimums | median of per-round ratios | "
        "CPU time, of medians | aim |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| guarded / plain | **{g_p:.3f}×** | {r.ratio_min('guarded', 'plain'):.3f}× | "
        f"{r.ratio_paired('guarded', 'plain'):.3f}× | {r.ratio_cpu('guarded', 'plain'):.3f}× | ≤ {aim}× |",
        f"| guarded / off | {g_o:.3f}× | {r.ratio_min('guarded', 'off'):.3f}× | "
        f"{r.ratio_paired('guarded', 'off'):.3f}× | {r.ratio_cpu('guarded', 'off'):.3f}× | – |",
        f"| off / plain | {o_p:.3f}× | {r.ratio_min('off', 'plain'):.3f}× | "
        f"{r.ratio_paired('off', 'plain'):.3f}× | {r.ratio_cpu('off', 'plain'):.3f}× | – |",
        "",
        "Host syncs (counted over one extra block of "
        f"{r.sync_steps} steps per variant, outside the timed rounds): "
        + "; ".join(f"{v}: {_sync_places(r, v)}" for v in VARIANTS) + ".",
        "",
        "The z-score threshold and the spike test were past their warm-up, so they ran in every guarded "
        f"step. Guard actions during the timed rounds: {r.guard_actions['steps_skipped']} steps skipped, "
        f"{r.guard_actions['grads_clipped']} clipped ({r.guard_actions['adaptive_clips']} of them by the "
        f"adaptive z-score threshold), {r.guard_actions['batches_skipped']} batches left out; "
        f"{r.guard_actions['adaptive_clips_before_timing']} adaptive clips in the warm-up rounds.",
        "",
        "Where the time goes (ms per step; exclusive time from separate instrumented blocks, median of "
        "the blocks; the wrappers add a few µs per call; `–` = not part of that variant):",
        "",
        "| part | guarded | guards off | plain | guard-only |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    labels: list[str] = []
    for v in VARIANTS:
        for k in r.parts[v]:
            if k != "total" and k not in labels:
                labels.append(k)
    only = guard_only(r.parts)
    labels.sort(key=lambda k: (k not in COMMON, k in only, COMMON.index(k) if k in COMMON else 0))
    for k in labels:
        cells = [_ms(r.parts[v][k]) if k in r.parts[v] else "–" for v in VARIANTS]
        lines.append(f"| {k} | {' | '.join(cells)} | {'yes' if k in only else ''} |")
    lines.append(f"| total (instrumented) | {' | '.join(_ms(r.parts[v]['total']) for v in VARIANTS)} | |")
    lines += ["", reading(r), ""]
    return "\n".join(lines)


def derived_cost(r: SizeResult) -> float:
    """Seconds per step the guards add, from the parts (not the end-to-end timings): what only the
    guarded step does, minus what only the guards-off step does in its place (the accelerate clip,
    the optimizer wrapper, the early-returning hooks). Less noisy than a difference of medians."""
    g, o = r.parts["guarded"], r.parts["off"]
    return (sum(v for k, v in g.items() if k != "total" and k not in o)
            - sum(v for k, v in o.items() if k != "total" and k not in g))


def reading(r: SizeResult) -> str:
    aim = _aim(r.device)
    g_p = r.ratio("guarded", "plain")
    extra_ms = (r.med("guarded") - r.med("plain")) * 1e3
    guard_parts = guard_only(r.parts)
    guard_sum = sum(guard_parts.values())
    clip_off = r.parts["off"].get(CLIP, 0.0)
    top = sorted(guard_parts.items(), key=lambda kv: -kv[1])[:4]
    top_s = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in top)
    derived = derived_cost(r)
    verdict = (f"meets the aim of ≤ {aim}×" if g_p <= aim else
               f"misses the aim of ≤ {aim}× by {(g_p - aim) * 100:.1f} percentage points")
    text = (
        f"Reading: a guarded step takes {g_p:.3f}× the plain loop's ({extra_ms:+.2f} ms per step), which "
        f"{verdict}; against the same `train_step()` with guards off it is "
        f"{r.ratio('guarded', 'off'):.3f}× (off / plain {r.ratio('off', 'plain'):.3f}×: the trainer's own "
        f"loop without guards). In the instrumented blocks the guard-only parts add up to "
        f"{guard_sum * 1e3:.2f} ms per step (largest: {top_s}); they replace the unguarded step's "
        f"accelerate `clip_grad_norm_` ({clip_off * 1e3:.2f} ms), whose norm and multiply are the same ops "
        f"as the guard's total norm and gradient scaling. Net, from the parts: the guards add "
        f"{derived * 1e3:+.2f} ms per step, {derived / r.med('off') * 100:+.1f}% of the guards-off step "
        f"({_ms(r.med('off'))} ms)."
    )
    faults = {v: r.faults_med(v) for v in VARIANTS}
    if max(faults.values()) - min(faults.values()) > 500:
        text += (
            " Minor page faults differ between the variants ("
            + ", ".join(f"{v} {faults[v]:.0f}" for v in VARIANTS)
            + " per step): glibc malloc hands freed activation memory back to the kernel and faults "
            "it in again (zeroed) on the next step, depending on the order of allocations, not on the "
            "work done. Off and plain do the same work, so off / plain "
            f"({r.ratio('off', 'plain'):.3f}×) shows how much this alone moves a ratio in this run; "
            "with the `MALLOC_*` settings of bench/README.md the faults vanish.")
    spread = max(_rel_spread(r.times[v]) for v in VARIANTS)
    if spread > abs(g_p - 1):
        text += (f" The rounds of one variant spread by up to {spread * 100:.0f}% (min to max over median), "
                 "more than the difference measured end to end: read the end-to-end ratios as ± that "
                 "noise, and the derived figure as the better estimate of the guards' own cost.")
    return text


def _rel_spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


WHAT = """\
## What each variant does

All three run on one LDM trainer built in-process from `configs/radio_tiny.yaml` (random first
stage, results in a temp folder), after `trainer.fit()` ran {fit} real steps; same prepared
model, AdamW, LR schedule, EMA and noise generator, and the same `--steps` real batches, taken
from the trainer's own data stream once and moved to the device before any timing (the same
list in every block: no data loading is timed). Config: the defaults plus
`{guards}`, so the z-score clipping and the loss-spike test are past their warm-up and really
run; `trainer.max_grad_norm` is 1.0, EMA updates every step, `gradient_accumulate_every` 1.

- **guarded** = `trainer.train_step()` with every guard on: batch check (NaN/Inf mask and
  zero-fill), BatchNorm running-statistics snapshot, loss check, one gradient norm, z-score
  threshold, spike test, the one `tolist()` read of the verdict vector, gradient scaling,
  AdamW, LR schedule, EMA.
- **guards off** = the same `trainer.train_step()` on the same trainer with
  `trainer.guard.enabled = False` set between blocks (what `guard.enabled=false` gives: no
  second trainer, so no second copy of the model competing for the cache); its optimizer step
  is `accelerator.clip_grad_norm_(params, 1.0)` + `optimizer.step()`.
- **plain** = the loop written with accelerate alone on the same objects:
  `with accelerator.accumulate(model): loss = model(batch["image"], batch["cond"],
  generator=trainer.noise); accelerator.backward(loss); accelerator.clip_grad_norm_(params,
  1.0); optimizer.step(); optimizer.zero_grad()`, then `lr_schedule.step()` and
  `ema.step(params)`. Its per-step clip uses the same norm ops as the guard
  (`torch.nn.utils.get_total_norm` over the gradients, then one `_foreach_mul_` by the clamped
  coefficient), so the guard adds no second norm.

Rounds: `--warmup` untimed rounds of every variant, then `--repeats` timed rounds; each round
times one block of `--steps` optimizer steps per variant with `time.perf_counter` (after
`gc.collect()`; the process's CPU time is taken too, as a check that ignores time spent
waiting for a core), the order of the variants going through all six permutations so each goes
first, second and last equally often. The figure per variant is the median over rounds.
Host syncs: one more block per variant with every way a tensor value reaches Python
(`item`, `__bool__`, `__float__`, `__int__`, `__index__`, `tolist`, `cpu`, `numpy`) counted,
except torch.optim's reads of its own CPU step counters (as `tests/guard/test_syncs.py`). On a
CPU a "sync" waits for nothing (ops run eagerly); its cost shows on a GPU, where the guarded
step's one read waits for the backward to finish.
"""


def write_results(path: Path, results: list[SizeResult], args: argparse.Namespace, total_s: float) -> None:
    device = results[0].device if results else "cpu"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    head = [
        "# Guard benchmark: guarded training step against guards off and a plain accelerate loop",
        "",
        "Generated by `bench/bench_guard.py`; this section is replaced on every run. Every figure is a",
        "ratio between variants measured side by side in the same invocation.",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} CPU cores, torch threads "
        f"{torch.get_num_threads()}, device {device}"
        + (f" ({gpu})" if gpu else " (no GPU on this machine: the GPU aim is not measured here)"),
        f"- 1-minute load average: {args.load_before:.2f} at the start, {args.load_after:.2f} at the end "
        "(above ~0.5, other processes competed for the cores; small differences drown first)",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, accelerate "
        f"{accelerate.__version__}, diffusers {diffusers.__version__}",
        f"- memory allocator: {_malloc_settings()}",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}` "
        f"(sizes {', '.join(args.size)}, {args.warmup} warm-up + {args.repeats} timed rounds of "
        f"{args.steps} steps per variant; whole run {total_s:.0f} s)",
        f"- aims (from the issue): a guarded step ≤ {AIM_CPU}× the plain loop's on a CPU, ≤ {AIM_GPU}× on "
        "a GPU; one host sync per optimizer step",
        "",
        "## Summary",
        "",
        "| size | ms / step guarded · off · plain | guarded / plain | guarded / off | off / plain | "
        "guards' cost from the parts | host syncs / step guarded · off · plain | aim (guarded / plain) |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        aim = _aim(r.device)
        g_p = r.ratio("guarded", "plain")
        head.append(
            f"| {r.size} | {' · '.join(_ms(r.med(v)) for v in VARIANTS)} | **{g_p:.3f}×** "
            f"(min {r.ratio_min('guarded', 'plain'):.3f}×) | {r.ratio('guarded', 'off'):.3f}× "
            f"(min {r.ratio_min('guarded', 'off'):.3f}×) | {r.ratio('off', 'plain'):.3f}× "
            f"(min {r.ratio_min('off', 'plain'):.3f}×) | {derived_cost(r) / r.med('off') * 100:+.1f}% | "
            f"{' · '.join(_syncs_per_step(r, v) for v in VARIANTS)} "
            f"| ≤ {aim}×: {'met' if g_p <= aim else 'missed'} |")
    what = WHAT.format(fit=FIT_STEPS, guards=" ".join(GUARDS_LIVE))
    body = ["", what, "## Results per size", ""] + [size_section(r) for r in results]
    write_section(path, SECTION, "\n".join(head + body))


def headline(results: list[SizeResult]) -> list[dict[str, tp.Any]]:
    """Rows for the headline table of ``python -m bench``: guard overhead and host syncs per step."""
    rows = []
    for r in results:
        aim = _aim(r.device)
        g_p = r.ratio("guarded", "plain")
        syncs = len(r.syncs["guarded"]) / r.sync_steps
        rows.append({"bench": SECTION, "what": f"guarded step / plain accelerate step ({r.size})",
                     "ours_s": r.med("guarded"), "base_s": r.med("plain"), "ratio": g_p, "aim": f"≤ {aim}×",
                     "met": g_p <= aim, "device": r.device,
                     "note": f"min-of-rounds ratio {r.ratio_min('guarded', 'plain'):.3f}×, guards' cost from "
                             f"the parts {derived_cost(r) / r.med('off') * 100:+.1f}%"})
        rows.append({"bench": SECTION, "what": f"host syncs per step, guarded / plain loop ({r.size})",
                     "ours_s": syncs, "base_s": len(r.syncs["plain"]) / r.sync_steps, "unit": "syncs",
                     "ratio": None, "aim": "1 per guarded step", "met": syncs == 1, "device": r.device,
                     "note": "counted with an instrumented torch.Tensor, as tests/guard/test_syncs.py does"})
    return rows


def _malloc_settings() -> str:
    env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD", "GLIBC_TUNABLES"))}
    if not env:
        return "glibc malloc defaults (no `MALLOC_*`, `GLIBC_TUNABLES` or `LD_PRELOAD` set)"
    return ", ".join(f"`{k}={v}`" for k, v in sorted(env.items()))



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["tiny", "medium"],
                        help="model size(s) to measure (default: tiny medium)")
    parser.add_argument("--repeats", type=int, default=12,
                        help="timed interleaved rounds per size (default 12; a multiple of 6 gives every "
                             "order of the three variants equally often)")
    parser.add_argument("--steps", type=int, default=4,
                        help="optimizer steps per block, i.e. per variant and round (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--breakdown-passes", type=int, default=3,
                        help="instrumented blocks per variant for the breakdown table; the median per "
                             "part is shown (default 3)")
    parser.add_argument("--cache-dir", default=None,
                        help="synthetic data cache (default: the config's, ~/.cache/radiodiff_resume)")
    parser.add_argument("--workdir", default=None, help="where temp folders go (default: the system temp)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for the whole run (default 1: stable when other "
                             "processes share the cores; 0 keeps torch's own choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                        help="results file; only its bench_guard section is replaced "
                             "(default bench/RESULTS.md)")
    parser.add_argument("--summary", type=Path, default=None,
                        help="also write the headline rows as JSON here (for `python -m bench`)")
    args = parser.parse_args(argv)
    for name in ("repeats", "steps", "breakdown_passes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()[0]

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="radiodiff-bench-guard-", dir=args.workdir))
    results = []
    try:
        for size in args.size:
            print(f"{size}: building the trainer and training {FIT_STEPS} steps ...", flush=True)
            results.append(run_size(size, root, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - start
    args.load_after = os.getloadavg()[0]
    write_results(args.out, results, args, total)
    if args.summary:
        args.summary.write_text(json.dumps(headline(results), indent=1))
    for r in results:
        print(f"{r.size}: guarded/plain {r.ratio('guarded', 'plain'):.3f}x, guarded/off "
              f"{r.ratio('guarded', 'off'):.3f}x, off/plain {r.ratio('off', 'plain'):.3f}x; syncs/step "
              + ", ".join(f"{v} {_syncs_per_step(r, v)}" for v in VARIANTS))
    print(f"wrote the {SECTION} section of {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
