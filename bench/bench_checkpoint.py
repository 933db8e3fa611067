"""Verified checkpoint save / load+verify against ``accelerator.save_state`` / ``load_state``.

Both sides handle the same objects of one real LDM trainer, in the same process, interleaved
round by round; every figure in ``bench/RESULTS.md`` is a ratio against the baseline measured
in the same invocation (speed is measured, never asserted).

    python bench/bench_checkpoint.py                      # tiny and medium, 5 rounds each
    python bench/bench_checkpoint.py --size medium --repeats 9
    python bench/bench_checkpoint.py --size tiny medium large --summary s.json   # what `python -m bench` runs

See ``bench/README.md`` for what each side does.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import accelerate
import safetensors
import torch
from results import write_section

import radiodiff_resume.checkpoint.checkpointer as checkpointer_mod
import radiodiff_resume.checkpoint.files as files_mod
import radiodiff_resume.checkpoint.verify as verify_mod
from radiodiff_resume.build import write_untrained_first_stage
from radiodiff_resume.config import load_config
from radiodiff_resume.run import build_ldm_trainer, make_accelerator
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "radio_tiny.yaml"
AIM_SAVE, AIM_LOAD, AIM_THROUGHPUT = 1.1, 1.3, 0.7
"""Issue 20's aims: a save blocks training ≤ 1.1× save_state, load + verify ≤ 1.3× load_state, and the
save writes at ≥ 70 % of this disk's plain write + fsync of the same bytes."""

SIZES: dict[str, list[str]] = {
    # configs/radio_tiny.yaml as shipped (UNet [32, 64], 64 px maps, 16x16 latents).
    "tiny": [],
    # A wider, deeper UNet: the checkpoint is tens of MB, so I/O weighs more than Python overhead.
    "medium": [
        "model.unet.params.block_out_channels=[64,128,256]",
        "model.unet.params.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
        "model.unet.params.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]",
        "data.image_size=64",
    ],
    # The medium layout three times as wide: about 90 M parameters, ~1.5 GB of state (weights, EMA,
    # AdamW moments, first stage).
    "large": [
        "model.unet.params.block_out_channels=[192,384,768]",
        "model.unet.params.down_block_types=[DownBlock2D,DownBlock2D,DownBlock2D]",
        "model.unet.params.up_block_types=[UpBlock2D,UpBlock2D,UpBlock2D]",
        "data.image_size=64",
    ],
}


# ----- the trainer ---------------------------------------------------------------------
def build_trainer(size: str, work: Path, steps: int, cache_dir: str | None) -> LatentDiffusionTrainer:
    overrides = [
        f"trainer.results_folder={work / 'run'}",
        f"model.first_stage.ckpt_path={work / 'ae.safetensors'}",
        "trainer.val_batches=0",
        f"trainer.train_num_steps={steps}",
        f"trainer.save_and_sample_every={steps}",
        f"trainer.log_freq={steps}",
        "trainer.lr_warmup_steps=0",
        "trainer.ema_update_after_step=0",
        "trainer.num_sample_images=1",
        "model.sampling_timesteps=2",
        *SIZES[size],
    ]
    if cache_dir:
        overrides.append(f"data.synthetic.cache_dir={cache_dir}")
    cfg = load_config(CONFIG, overrides)
    write_untrained_first_stage(cfg)
    trainer = build_ldm_trainer(cfg, make_accelerator(cfg))
    trainer.fit()  # a few real steps: the optimizer and the EMA hold state; ends with one save
    return trainer


class GeneratorState:
    """Adapter so accelerate checkpoints the trainer's noise generator, as our rank state does."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: tp.Mapping[str, torch.Tensor]) -> None:
        self.generator.set_state(state["state"])


# ----- the operations timed ------------------------------------------------------------
def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` and its parent (per file; no os.sync())."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)
    _fsync_dir(root.parent)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def file_listing(root: Path) -> str:
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.name)
    return ", ".join(f"`{p.relative_to(root)}` {_fmt_bytes(p.stat().st_size)}" for p in files)


class Bench:
    """The operations of one size; each ``op_*`` prepares untimed and returns its timed seconds."""

    def __init__(self, trainer: LatentDiffusionTrainer, work: Path) -> None:
        self.trainer = trainer
        self.acc = trainer.accelerator
        self.ours = trainer.checkpointer.store.folder / f"step-{trainer.state.step:08d}"
        self.base = work / "accelerate"
        self.base_fsync = work / "accelerate_fsync"
        self.disk = work / "plain.bin"
        self._disk_data = memoryview(b"")
        self.async_total = 0.0
        """Seconds from the start of the last background save to its commit."""
        self.write_s = 0.0
        """Seconds the last synchronous save spent writing: inside ``store.save``."""
        # prepare() registered the model and the optimizer (and would have a scheduler / dataloaders,
        # but the trainer prepares neither). Register the rest so that both sides hold the same state.
        self.acc.register_for_checkpointing(
            trainer.ema, trainer.lr_schedule, trainer.state, trainer.train_stream,
            GeneratorState(trainer.noise),
        )

    def op_ours_save(self) -> float:
        """A synchronous save; the part of it inside ``store.save`` (every file serialised, hashed,
        written and fsynced, the manifest, the rename, the folders' fsyncs, retention) goes to
        ``write_s``: the writing whose speed the save-throughput aim compares with the disk's."""
        shutil.rmtree(self.ours, ignore_errors=True)
        store = self.trainer.checkpointer.store
        wrapped = vars(store).get("save")  # the breakdown's timing wrapper, when it runs
        save = store.save

        def writing(*args: tp.Any, **kwargs: tp.Any) -> Path:
            start = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                self.write_s = time.perf_counter() - start

        store.save = writing  # type: ignore[method-assign]
        try:
            return _timed(self.trainer.checkpointer.save)
        finally:
            if wrapped is None:
                del store.save
            else:
                store.save = wrapped

    def op_ours_async(self) -> float:
        """Training blocked by a background save (what the trainer does with ``checkpoint.async_save``):
        until ``save(background=True)`` returns; the time to the commit goes to ``async_total``."""
        shutil.rmtree(self.ours, ignore_errors=True)
        checkpointer = self.trainer.checkpointer
        start = time.perf_counter()
        checkpointer.save(background=True)
        blocked = time.perf_counter() - start
        checkpointer.settle()
        self.async_total = time.perf_counter() - start
        return blocked

    def op_base_save(self) -> float:
        shutil.rmtree(self.base, ignore_errors=True)
        return _timed(lambda: self.acc.save_state(str(self.base)))

    def op_base_save_fsync(self) -> float:
        shutil.rmtree(self.base_fsync, ignore_errors=True)

        def run() -> None:
            self.acc.save_state(str(self.base_fsync))
            fsync_tree(self.base_fsync)

        return _timed(run)

    def op_disk(self) -> float:
        """This disk's plain speed for our checkpoint's bytes: one file written from memory, fsynced."""
        size = dir_bytes(self.ours)[0]
        if len(self._disk_data) != size:
            block = os.urandom(1 << 20)
            self._disk_data = memoryview((block * (size // len(block) + 1))[:size])
        data = self._disk_data
        self.disk.unlink(missing_ok=True)

        def run() -> None:
            with self.disk.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        seconds = _timed(run)
        self.disk.unlink()
        return seconds

    def op_snapshot(self) -> float:
        """Device → host copy of the state a save holds (GPU only): what training must wait for at the
        least before a save can go on in the background."""
        state = self.trainer.state_dict()

        def run() -> None:
            copies = [t.to("cpu", non_blocking=True) for t in _tensors(state) if t.device.type != "cpu"]
            torch.cuda.synchronize()
            del copies

        return _timed(run)

    def ours_load(self) -> None:
        """What ``Checkpointer.resume`` does on rank 0 for a chosen checkpoint."""
        ckpt = self.trainer.checkpointer
        report = ckpt.verify_and_load(self.ours)
        if not report.ok or report.checkpoint is None:
            raise RuntimeError(f"our checkpoint does not verify:\n{report.describe()}")
        self.trainer.load_rank_state_dict(report.checkpoint.ranks[0])

    def op_ours_load(self) -> float:
        return _timed(self.ours_load)

    def op_base_load(self) -> float:
        return _timed(lambda: self.acc.load_state(str(self.base)))

    def op_probe(self) -> float:
        inputs = self.trainer.probe_inputs()
        return _timed(lambda: self.trainer.probe_value(inputs))


def _tensors(tree: tp.Any) -> tp.Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def read_hash_split(folder: Path) -> dict[str, float]:
    """Seconds to read every file of ``folder`` into memory (no hash), to hash those bytes in memory (one
    thread, the manifest's hash), and to do both as a load does (``read_files``: threads, the files of
    ``verify.MAPPED`` mapped and hashed through the mapping)."""
    manifest = files_mod.read_manifest(folder)
    names = list(manifest.files)
    blobs: dict[str, bytes] = {}

    def read() -> None:
        for n in names:
            blobs[n] = (folder / n).read_bytes()

    def hash_() -> None:
        for n in names:
            h = files_mod.hasher(manifest.files[n].algorithm)
            h.update(blobs[n])
            h.hexdigest()

    return {"read": _timed(read), "hash": _timed(hash_),
            "both": _timed(lambda: files_mod.read_files(folder, manifest.files, names,
                                                        mapped=verify_mod.MAPPED))}


def _timed(fn: tp.Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----- breakdown of our save / load (a separate, instrumented pass) --------------------
class Profile:
    """Exclusive time per label: a wrapped call nested in another is not counted twice.

    Only calls on the main thread are timed; calls from worker threads (parallel hashing)
    count inside whichever main-thread call waits for them.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._children: list[float] = []

    def wrap(self, fn: tp.Callable[..., tp.Any], label: str) -> tp.Callable[..., tp.Any]:
        def wrapper(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            if threading.current_thread() is not threading.main_thread():
                return fn(*args, **kwargs)
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
    """Replace each ``obj.attr`` by a timed wrapper for the duration, then put the original back.

    Targets the library does not have (it changes) are skipped; their rows just do not appear.
    """
    saved = []
    for obj, attr, label in targets:
        if not hasattr(obj, attr):
            continue
        own = attr in vars(obj)  # modules and classes: restore; instances: drop the override
        original = getattr(obj, attr)
        saved.append((obj, attr, vars(obj).get(attr), own))
        setattr(obj, attr, profile.wrap(original, label))
    try:
        yield
    finally:
        for obj, attr, original, own in reversed(saved):
            if own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)


SAVE_OTHER = "other (events line, bookkeeping)"
LOAD_OTHER = "other (report, scale_factor, bookkeeping)"
NONFINITE = "non-finite scan (model, EMA, optimizer)"


def breakdown(bench: Bench, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per part of our save and our load (instrumented runs, not the timed ones).

    The targets name library functions by the module that calls them; older and newer library
    versions differ, so several are alternatives and only those present are timed.
    """
    t = bench.trainer
    save_targets = [
        (t, "state_dict", "state_dict()"),
        (checkpointer_mod, "nonfinite_names", NONFINITE),
        (t, "probe_value", "probe forward"),
        (files_mod, "encode", "encode (tree → tensors + JSON tree)"),
        (os, "fsync", "fsync (files + folders)"),
        (files_mod, "write_safetensors", "rank file written + hashed (main thread)"),
        (files_mod, "write_durable", "JSON files written (main thread)"),
        (t.checkpointer.store, "save", "shared files written + hashed in threads, staging, manifest, rename"),
    ]
    load_targets = [
        (verify_mod, "read_manifest", "manifest parse + checksum"),
        (verify_mod, "listing_problems", "folder listing (stat)"),
        (verify_mod, "read_files", "read or map once + hash as read (threads)"),
        (files_mod, "read_safetensors", "safetensors decode (views of the bytes read or mapped)"),
        (verify_mod, "decode_component", "JSON parse + tree decode"),
        (checkpointer_mod, "check_keys", "keys check"),
        (checkpointer_mod, "check_finite", NONFINITE),
        (t, "load_state_dict", "load_state_dict"),
        (t, "probe_value", "probe forward"),
        (t, "load_rank_state_dict", "rank state restore"),
    ]
    saves: list[dict[str, float]] = []
    loads: list[dict[str, float]] = []
    for _ in range(repeats):
        for targets, op, out in ((save_targets, bench.op_ours_save, saves),
                                 (load_targets, bench.op_ours_load, loads)):
            profile = Profile()
            with instrumented(targets, profile):
                total = op()
            profile.seconds["total"] = total
            out.append(profile.seconds)

    def med(runs: list[dict[str, float]], targets: list[tuple[object, str, str]],
            other: str) -> dict[str, float]:
        seen = {k for r in runs for k in r}
        labels = [k for k in dict.fromkeys(label for _, _, label in targets) if k in seen]
        result = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in labels}
        result[other] = max(0.0, statistics.median(r["total"] - sum(r.get(k, 0.0) for k in labels)
                                                   for r in runs))
        result["total"] = statistics.median(r["total"] for r in runs)
        return result

    return med(saves, save_targets, SAVE_OTHER), med(loads, load_targets, LOAD_OTHER)


# ----- one size ------------------------------------------------------------------------
@dataclass
class SizeResult:
    size: str
    params: int
    model_tensors: int
    times: dict[str, list[float]]
    ours_bytes: tuple[int, int]
    base_bytes: tuple[int, int]
    ours_files: str
    base_files: str
    save_parts: dict[str, float]
    load_parts: dict[str, float]
    split: dict[str, float]
    """:func:`read_hash_split` of our checkpoint (medians)."""
    build_s: float
    device: str

    def med(self, op: str) -> float:
        return statistics.median(self.times[op])


def run_size(size: str, root: Path, repeats: int, steps: int, cache_dir: str | None) -> SizeResult:
    work = root / size
    start = time.perf_counter()
    trainer = build_trainer(size, work, steps, cache_dir)
    build_s = time.perf_counter() - start
    bench = Bench(trainer, work)
    # Warm-up, untimed: first calls pay lazy imports and allocator growth on both sides.
    gpu = trainer.accelerator.device.type == "cuda"
    extra = [("probe", bench.op_probe), ("disk", bench.op_disk)] + ([("snapshot", bench.op_snapshot)]
                                                                   if gpu else [])
    for op in (bench.op_ours_save, bench.op_ours_async, bench.op_base_save, bench.op_base_save_fsync,
               bench.op_ours_load, bench.op_base_load, *(op for _, op in extra)):
        op()
    saves = [("ours_save", bench.op_ours_save), ("ours_async", bench.op_ours_async),
             ("base_save", bench.op_base_save), ("base_save_fsync", bench.op_base_save_fsync)]
    loads = [("ours_load", bench.op_ours_load), ("base_load", bench.op_base_load)]
    times: dict[str, list[float]] = {k: [] for k, _ in (*saves, *loads, *extra)}
    times["ours_async_total"] = []
    times["ours_write"] = []
    for r in range(repeats):
        # A B A B ..., with the order flipped every other round so neither side always goes first.
        order = saves + loads if r % 2 == 0 else saves[::-1] + loads[::-1]
        for name, op in [*order, *extra]:
            times[name].append(op())
            if name == "ours_async":
                times["ours_async_total"].append(bench.async_total)
            if name == "ours_save":
                times["ours_write"].append(bench.write_s)
        print(f"  {size} round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)
    save_parts, load_parts = breakdown(bench, repeats=3)
    splits = [read_hash_split(bench.ours) for _ in range(3)]
    split = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
    result = SizeResult(
        size=size,
        params=sum(p.numel() for p in trainer.params),
        model_tensors=len(trainer.unwrapped.state_dict()),
        times=times,
        ours_bytes=dir_bytes(bench.ours),
        base_bytes=dir_bytes(bench.base),
        ours_files=file_listing(bench.ours),
        base_files=file_listing(bench.base),
        save_parts=save_parts,
        load_parts=load_parts,
        split=split,
        build_s=build_s,
        device=str(trainer.accelerator.device),
    )
    # Leave the disk as we found it (the temp root is removed at the end as well).
    for folder in (bench.ours, bench.base, bench.base_fsync):
        shutil.rmtree(folder, ignore_errors=True)
    del bench, trainer
    gc.collect()
    return result


# ----- report --------------------------------------------------------------------------
def _fmt_bytes(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _spread(values: list[float]) -> str:
    return f"{min(values) * 1e3:.0f}–{max(values) * 1e3:.0f}"


def _ratio_or_na(ratio: float) -> str:
    return f"{ratio:.2f}×" if ratio > 0 else "n/a (the timings are too noisy to subtract)"


def _verdict(ratio: float, aim: float) -> str:
    return f"meets the aim of ≤ {aim}×" if ratio <= aim else f"misses the aim of ≤ {aim}×"


def _top(parts: dict[str, float], n: int = 3) -> str:
    total = parts["total"]
    items = sorted(((k, v) for k, v in parts.items() if k != "total"), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k} {v * 1e3:.0f} ms ({100 * v / total:.0f}%)" for k, v in items)


def _row(label: str, r: SizeResult, ours: str, base: str, aim: str, bold: bool = False) -> str:
    ratio = r.med(ours) / r.med(base)
    ratio_min = min(r.times[ours]) / min(r.times[base])
    mark = "**" if bold else ""
    return (f"| {label} | {_ms(r.med(ours))} ({_spread(r.times[ours])}) | {_ms(r.med(base))} "
            f"({_spread(r.times[base])}) | {mark}{ratio:.2f}×{mark} | {ratio_min:.2f}× | {aim} |")


def size_section(r: SizeResult) -> str:
    save_ratio = r.med("ours_save") / r.med("base_save")
    blocked_ratio = r.med("ours_async") / r.med("base_save")
    blocked_of_sync = r.med("ours_async") / r.med("ours_save")
    save_ratio_fs = r.med("ours_save") / r.med("base_save_fsync")
    load_ratio = r.med("ours_load") / r.med("base_load")
    probe = r.med("probe")
    save_np = (r.med("ours_save") - probe) / r.med("base_save")
    load_np = (r.med("ours_load") - probe) / r.med("base_load")
    throughput = r.med("disk") / r.med("ours_write")
    n = len(r.times["ours_save"])
    lines = [
        f"### {r.size}: {r.params / 1e6:.2f} M trainable parameters, {r.model_tensors} model tensors",
        "",
        f"Median of {n} interleaved rounds (min–max in brackets); ratio = ours / baseline.",
        "",
        "| operation | ours ms | baseline ms | ratio | ratio of minimums | aim |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        _row("training blocked by a verified save (background, the default)", r, "ours_async", "base_save",
             f"≤ {AIM_SAVE}×", bold=True),
        _row("background save, from its start to the commit", r, "ours_async_total", "base_save", "–"),
        _row("synchronous save (`async_save: false`: blocks training for all of it)", r, "ours_save",
             "base_save", "–"),
        _row("save vs baseline + fsync of its files (labelled variant)", r, "ours_save", "base_save_fsync",
             "–"),
        _row("load + verify (probe forward included)", r, "ours_load", "base_load", f"≤ {AIM_LOAD}×",
             bold=True),
        f"| bytes on disk | {_fmt_bytes(r.ours_bytes[0])} in {r.ours_bytes[1]} files | "
        f"{_fmt_bytes(r.base_bytes[0])} in {r.base_bytes[1]} files | "
        f"{r.ours_bytes[0] / r.base_bytes[0]:.2f}× | | – |",
        f"| save throughput: plain write + fsync of the same bytes / writing our checkpoint (`store.save`) | "
        f"{_ms(r.med('ours_write'))} | {_ms(r.med('disk'))} | {throughput:.0%} of the disk's speed | | "
        f"≥ {AIM_THROUGHPUT:.0%} |",
        f"| the same against our whole synchronous save (state_dict, non-finite scan, probe forward) | "
        f"{_ms(r.med('ours_save'))} | {_ms(r.med('disk'))} | {r.med('disk') / r.med('ours_save'):.0%} of the "
        f"disk's speed | | – |",
        *([f"| device → host snapshot of the state / our save | {_ms(r.med('ours_save'))} | "
           f"{_ms(r.med('snapshot'))} (snapshot) | {r.med('snapshot') / r.med('ours_save'):.1%} | | – |"]
          if "snapshot" in r.times else []),
        "",
        f"Reading and hashing apart (median of 3): reading every file into memory takes "
        f"{_ms(r.split['read'])} ms, hashing those bytes in memory on one thread {_ms(r.split['hash'])} ms, "
        f"and the load's read-and-hash-as-read (threads; {', '.join(sorted(verify_mod.MAPPED))} mapped, "
        f"not copied) {_ms(r.split['both'])} ms.",
        "",
        f"One probe forward, timed on its own: {_ms(probe)} ms ({_spread(r.times['probe'])}). "
        f"Without it (derived, not measured) the ratios would be {_ratio_or_na(save_np)} (save) and "
        f"{_ratio_or_na(load_np)} (load).",
        "",
        "Where our time goes (median of 3 separate instrumented runs; the wrappers add a little):",
        "",
        "| our save | ms | | our load + verify | ms |",
        "| --- | ---: | --- | --- | ---: |",
    ]
    save_rows = [(k, v) for k, v in r.save_parts.items() if k != "total"] + [("total", r.save_parts["total"])]
    load_rows = [(k, v) for k, v in r.load_parts.items() if k != "total"] + [("total", r.load_parts["total"])]
    for i in range(max(len(save_rows), len(load_rows))):
        s = save_rows[i] if i < len(save_rows) else ("", None)
        ld = load_rows[i] if i < len(load_rows) else ("", None)
        lines.append(f"| {s[0]} | {_ms(s[1]) if s[1] is not None else ''} | | {ld[0]} | "
                     f"{_ms(ld[1]) if ld[1] is not None else ''} |")
    lines += [
        "",
        f"Files, ours: {r.ours_files}.",
        "",
        f"Files, accelerate: {r.base_files}.",
        "",
        f"Reading: a background save blocks training {blocked_ratio:.2f}× as long as accelerate's save, "
        f"which {_verdict(blocked_ratio, AIM_SAVE)}, and {blocked_of_sync:.1%} of a synchronous verified "
        f"save. A synchronous save is {save_ratio:.2f}× accelerate's "
        f"({save_ratio_fs:.2f}× against accelerate followed by the same fsyncs); our save's largest parts "
        f"are {_top(r.save_parts)}. Load + verify is {load_ratio:.2f}× accelerate's load_state, which "
        f"{_verdict(load_ratio, AIM_LOAD)}; its largest parts are {_top(r.load_parts)}. The probe forward "
        f"alone ({_ms(probe)} ms) takes {probe / r.med('base_save'):.1f}× accelerate's whole save and "
        f"{probe / r.med('base_load'):.1f}× its whole load.",
        "",
    ]
    return "\n".join(lines)


FAIRNESS = """\
## What each side does

Both sides checkpoint the same objects of one LDM trainer, in the same process, to the same
disk: model (full `state_dict`, the frozen first stage included), AdamW state, EMA shadow
weights, LR schedule, train counters, data position, RNG states and the trainer's noise
generator. For accelerate, `prepare()` registered the model and optimizer; the bench adds
`register_for_checkpointing(ema, lr_schedule, state, train_stream, noise generator)` so that
the content matches (they become `custom_checkpoint_0..4.pkl`, in that order).

- **ours, save** = `trainer.checkpointer.save()`: `state_dict()`, non-finite scan of model /
  EMA / optimizer, probe forward on stored inputs, safetensors + JSON per component (no
  pickle) serialised to bytes, XXH3-128 of those bytes, written to a staging folder with an
  fsync per file, `manifest.json` (with its checksum), atomic rename, fsync of the folders,
  retention, an `events.jsonl` line: what `checkpoint.async_save: false` does, all of it on the
  training thread.
- **ours, training blocked by a background save** = `trainer.checkpointer.save(background=True)`
  until it returns (what training waits for with `checkpoint.async_save: true`, the default):
  `state_dict()`, probe forward, the copy of every tensor into reusable host buffers. The rest of
  the save above runs in the writer thread; **from its start to the commit** times it until
  `checkpointer.settle()` returns.
- **ours, load + verify** = `checkpointer.verify_and_load(path)` (manifest and its checksum,
  listing, each file read once and its XXH3-128 taken from the bytes read (the model's and
  the EMA's mapped instead and hashed through the mapping), decode from those bytes, component shape
  checks, non-finite scan, scale_factor, strict keys / shapes / dtypes, `load_state_dict`, probe
  forward recomputed and compared) followed by the rank state restore, i.e. what `resume()` does on
  rank 0.
- **baseline, save** = `accelerator.save_state(dir)`: model as safetensors, optimizer,
  registered objects (`torch.save`, pickle) and `random_states_0.pkl`; no fsync, no hash, no
  atomic commit, no manifest. The labelled variant adds an fsync of every file it wrote and
  of its folders (per file, no `os.sync()`): the durability cost that plain accelerate skips.
- **baseline, load** = `accelerator.load_state(dir)`: reads and loads the same objects; no
  integrity check at all.
- **disk** = one file of our checkpoint's size written from memory and fsynced: the plain speed of
  this disk for those bytes. The save-throughput aim compares it with **writing our checkpoint**:
  the part of the synchronous save inside `store.save` (every file serialised, hashed, written and
  fsynced, the files all at the same time; `manifest.json`; the rename; the folders' fsyncs;
  retention), timed in the same rounds. Until this run's version the aim was judged on the whole
  synchronous save, whose `state_dict()`, non-finite scan and probe forward compute and write
  nothing; that ratio is still given, on the line below it.
- **snapshot** (GPU only) = a device → host copy of every tensor of the state a save holds.

Both sides load from a checkpoint written moments before, so reads come from the page cache
on both sides. Rounds interleave the two sides (A B A B …, order flipped every other round)
after one untimed warm-up of every operation; the figure per side is the median. torch runs
with the thread count given by `--threads` (default 1: on a shared 2-core machine two
OpenMP threads per process make small ops erratic whenever something else runs).
"""


def write_results(path: Path, results: list[SizeResult], args: argparse.Namespace, total_s: float,
                  work_root: Path) -> None:
    threads = torch.get_num_threads()
    head = [
        "# Checkpoint benchmark: verified save / load against accelerate",
        "",
        "Generated by `bench/bench_checkpoint.py`; this section is replaced on every run. Every figure is",
        "a ratio against the accelerate baseline measured side by side in the same invocation.",
        "",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPU cores, torch threads {threads}, "
        f"temp folder on {_fs_type(work_root)}",
        f"- 1-minute load average: {args.load_before:.2f} at the start, {args.load_after:.2f} at the end "
        f"(above ~0.5, other processes competed for the cores and inflated torch's small ops most)",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, accelerate "
        f"{accelerate.__version__}, safetensors {safetensors.__version__}",
        f"- command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}` "
        f"(sizes {', '.join(args.size)}, {args.repeats} rounds ({min(args.repeats, args.repeats_large)} for "
        f"large), {args.steps} training steps before "
        f"measuring; whole run {total_s:.0f} s)",
        f"- aims (issue 20): save blocks training ≤ {AIM_SAVE}× save_state, load + verify ≤ {AIM_LOAD}× "
        f"load_state (probe forward included), save throughput ≥ {AIM_THROUGHPUT:.0%} of plain write + fsync",
        f"- device: {results[0].device if results else 'none'}",
        "",
        "## Summary",
        "",
        "| size | checkpoint (ours / accelerate) | save ratio | save ratio vs accelerate + fsync | "
        "load + verify ratio | save throughput / disk |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        head.append(
            f"| {r.size} | {_fmt_bytes(r.ours_bytes[0])} / {_fmt_bytes(r.base_bytes[0])} | "
            f"{r.med('ours_save') / r.med('base_save'):.2f}× | "
            f"{r.med('ours_save') / r.med('base_save_fsync'):.2f}× | "
            f"{r.med('ours_load') / r.med('base_load'):.2f}× | {r.med('disk') / r.med('ours_write'):.0%} |")
    body = ["", FAIRNESS, "## Results per size", ""] + [size_section(r) for r in results]
    write_section(path, "bench_checkpoint", "\n".join(head + body))


def headline(results: list[SizeResult]) -> list[dict[str, tp.Any]]:
    """Rows for the headline table of ``python -m bench`` (each a same-run ratio, with its aim)."""
    rows = []
    for r in results:
        what = f"{r.size}, {_fmt_bytes(r.ours_bytes[0])} of state"
        save, load, disk, write = r.med("ours_save"), r.med("ours_load"), r.med("disk"), r.med("ours_write")
        blocked = r.med("ours_async")
        rows += [
            _headline_row(f"training blocked by a verified save / `save_state` ({what})", blocked,
                          r.med("base_save"), f"≤ {AIM_SAVE}×", blocked / r.med("base_save") <= AIM_SAVE,
                          r.device, f"background save; its commit came {_ms(r.med('ours_async_total'))} ms "
                          f"after its start; {blocked / save:.1%} of a synchronous save"),
            _headline_row(f"synchronous verified save / `save_state` ({what})", save, r.med("base_save"),
                          "–", None, r.device, f"`async_save: false`; largest parts: {_top(r.save_parts)}"),
            _headline_row(f"load + verify / `load_state` ({what})", load, r.med("base_load"),
                          f"≤ {AIM_LOAD}×", load / r.med("base_load") <= AIM_LOAD, r.device,
                          f"read {_ms(r.split['read'])} ms, hash {_ms(r.split['hash'])} ms, probe "
                          f"{_ms(r.med('probe'))} ms; largest parts: {_top(r.load_parts)}"),
            {**_headline_row(f"checkpoint write throughput (`store.save`) / plain write + fsync of the same "
                             f"bytes ({what})", write, disk,
                             f"≥ {AIM_THROUGHPUT:.0%}", disk / write >= AIM_THROUGHPUT, r.device,
                             "ours: writing the checkpoint (`store.save`: files serialised, hashed, written "
                             "and fsynced at once, manifest, rename, folder fsyncs); baseline: one file of "
                             "the same size written from memory and fsynced; the whole synchronous save "
                             f"reaches {disk / save:.0%}"),
             "ratio": disk / write},
        ]
        if "snapshot" in r.times:
            rows.append(_headline_row(f"device → host snapshot / verified save ({what})", r.med("snapshot"),
                                      save, "–", None, r.device,
                                      "what an asynchronous save would block for at the least"))
    return rows


def _headline_row(what: str, ours: float, base: float, aim: str, met: bool | None, device: str,
                  note: str) -> dict[str, tp.Any]:
    return {"bench": "bench_checkpoint", "what": what, "ours_s": ours, "base_s": base, "ratio": ours / base,
            "aim": aim, "met": met, "device": device, "note": note}


def _fs_type(path: Path) -> str:
    """Filesystem type of ``path`` from /proc/mounts (best effort)."""
    best, kind = "", "unknown filesystem"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} ({parts[0]})"
    except OSError:
        pass
    return kind


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["tiny", "medium"],
                        help="model size(s) to measure (default: tiny medium)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per size (default 5)")
    parser.add_argument("--steps", type=int, default=2, help="training steps before measuring (default 2)")
    parser.add_argument("--cache-dir", default=None,
                        help="synthetic data cache (default: the config's, ~/.cache/radiodiff_resume)")
    parser.add_argument("--workdir", default=None, help="where temp folders go (default: the system temp)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for the whole run (default 1: stable when other "
                             "processes share the cores; 0 keeps torch's own choice)")
    parser.add_argument("--repeats-large", type=int, default=3,
                        help="rounds for the large size (default 3: each round writes ~4.5 GB)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--summary", type=Path, default=None,
                        help="also write the headline rows as JSON here (for `python -m bench`)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()[0]

    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="radiodiff-bench-", dir=args.workdir))
    results = []
    try:
        for size in args.size:
            print(f"{size}: building and training the trainer ...", flush=True)
            repeats = min(args.repeats, args.repeats_large) if size == "large" else args.repeats
            results.append(run_size(size, root, repeats, args.steps, args.cache_dir))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - start
    args.load_after = os.getloadavg()[0]
    write_results(args.out, results, args, total, root)
    if args.summary:
        args.summary.write_text(json.dumps(headline(results), indent=1))
    for r in results:
        print(f"{r.size}: save {r.med('ours_save') / r.med('base_save'):.2f}x "
              f"(vs +fsync {r.med('ours_save') / r.med('base_save_fsync'):.2f}x), "
              f"load+verify {r.med('ours_load') / r.med('base_load'):.2f}x, "
              f"{_fmt_bytes(r.ours_bytes[0])} vs {_fmt_bytes(r.base_bytes[0])}")
    print(f"wrote {args.out} ({total:.0f} s)")


if __name__ == "__main__":
    main()
