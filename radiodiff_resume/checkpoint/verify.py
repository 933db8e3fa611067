"""Verification levels, each reported on its own, and what a failure of each means.

Integrity levels — a failure proves the checkpoint is damaged, so discovery may move it
to quarantine and fall back to an older one:

1. ``structure`` — the manifest parses into the format (with its own checksum); every
   listed file is a regular file with its size and digest (XXH3-128; SHA-256 in format 2),
   read once and decoded from those same bytes; nothing missing or stray; every component has
   the shape the format requires; step, world size and rank files agree with each other.
2. ``finite`` — every floating tensor is finite, and no second moment or variance
   (Adam's ``exp_avg_sq``, ``max_exp_avg_sq``, ``running_var``) is negative: its square root is
   NaN, so the first step or forward that uses it would poison the weights. Running statistics
   (BatchNorm ``running_mean`` / ``running_var``) are the exception: they are derived from data,
   not learnt, and are recomputed after loading (the probe is then not compared; see
   ``Report.repairable``).
3. ``scale_factor`` — the model's buffer equals the manifest's, and is present exactly
   when the stage has one.

Compatibility levels — a failure means the checkpoint is fine but this run differs from
the one that wrote it (config, code, environment); nothing is moved, the run stops and
says what differs and which override accepts it:

4. ``keys`` — strict key / shape / dtype match against the live model, EMA and optimizer.
5. ``probe`` — (run by the checkpointer after loading) the recorded probe is reproduced:
   bit for bit in an identical environment, within the tolerance otherwise.

A checkpoint of another stage or format version fails ``structure`` without being an
integrity failure.
"""

from __future__ import annotations

import hashlib
import math
import random
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from radiodiff_resume.checkpoint.files import (
    CheckpointCorrupt,
    decode_component,
    listing_problems,
    read_files,
    read_manifest,
)
from radiodiff_resume.checkpoint.manifest import Manifest, ManifestError, parse_step
from radiodiff_resume.checkpoint.store import rank_component

LEVELS = ("structure", "finite", "scale_factor", "keys", "probe")
INTEGRITY = frozenset({"structure", "finite", "scale_factor"})

REQUIRED = ("model", "optimizer", "train_state", "data", "probe")
OPTIONAL = ("ema", "grad_scaler", "guard")
RUNNING_STATS = (".running_mean", ".running_var")
NONNEGATIVE = (".exp_avg_sq", ".max_exp_avg_sq", ".running_var")
"""Second moments and variances: a negative entry is as impossible as a NaN (its square root is one)."""
CONFIG_FILE = "config.yaml"
MAPPED = frozenset({"model.safetensors", "ema.safetensors"})
"""Files mapped rather than read (:func:`~radiodiff_resume.checkpoint.files.read_files`): the model's and the
EMA's tensors are only copied out, by their ``load_state_dict`` (the module's ``copy_``, the EMA's deep copy),
so mapping saves the copy that reading makes.
The optimizer's are read: ``Optimizer.load_state_dict`` keeps the very tensors it is given, and training
would then write into pages of the file's mapping (copied one at a time on the first write, slower than
reading, and tied to the file until then)."""


@dataclass
class Level:
    name: str
    ok: bool | None = None
    """None: not reached (an earlier level failed)."""
    detail: str = ""
    integrity: bool = True
    """Whether a failure here proves damage (quarantine) rather than a difference (stop)."""


@dataclass
class Report:
    path: Path
    levels: dict[str, Level] = field(default_factory=lambda: {n: Level(n) for n in LEVELS})
    checkpoint: Checkpoint | None = None
    """The decoded checkpoint, once every level passed."""
    repairable: list[str] = field(default_factory=list)
    """Non-finite running statistics: not damage, but the trainer must recompute them."""

    def set(self, name: str, ok: bool, detail: str = "", integrity: bool | None = None) -> bool:
        self.levels[name] = Level(name, ok, detail, name in INTEGRITY if integrity is None else integrity)
        return ok

    @property
    def ok(self) -> bool:
        return all(level.ok for level in self.levels.values())

    @property
    def failure(self) -> Level | None:
        return next((lv for lv in self.levels.values() if lv.ok is False), None)

    @property
    def damaged(self) -> bool:
        """Failed at an integrity level: the files themselves are bad."""
        return self.failure is not None and self.failure.integrity

    def summary(self) -> str:
        """One line: each level and whether it passed."""
        return ", ".join(f"{lv.name} {'ok' if lv.ok else 'FAILED' if lv.ok is False else '-'}"
                         for lv in self.levels.values())

    def describe(self) -> str:
        marks = {True: "ok", False: "FAILED", None: "not checked"}
        lines = [f"{self.path}:"]
        for lv in self.levels.values():
            lines.append(f"  {lv.name:<13} {marks[lv.ok]}{': ' + lv.detail if lv.detail else ''}")
        return "\n".join(lines)


@dataclass
class Checkpoint:
    """The decoded content of a checkpoint folder, every byte of it hash-checked."""

    path: Path
    manifest: Manifest
    shared: dict[str, tp.Any]
    ranks: dict[int, tp.Any]
    config: str


def open_checkpoint(path: Path, stage: str, rank: int | None = None) -> Checkpoint:
    """Read and check ``path`` (level 1). ``rank=None`` reads every rank's file (rank 0's view);
    otherwise only that rank's. Raises :class:`ManifestError` or :class:`CheckpointCorrupt`."""
    try:
        manifest = read_manifest(path)
    except FileNotFoundError:
        raise CheckpointCorrupt("manifest.json missing (the save never committed)") from None
    except OSError as exc:
        raise CheckpointCorrupt(f"manifest.json unreadable ({exc.strerror or exc})") from None
    except ManifestError as exc:
        raise ManifestError(f"manifest.json: {exc}", exc.integrity) from None
    if manifest.stage != stage:
        raise ManifestError(f"a checkpoint of stage '{manifest.stage}', this is the '{stage}' stage",
                            integrity=False)
    problems = listing_problems(path, manifest) + _layout_problems(path, manifest)
    if problems:
        raise CheckpointCorrupt("; ".join(problems))
    wanted = [n for n in manifest.files
              if not n.startswith("rank-") or rank is None or n.startswith(rank_component(rank) + ".")]
    blobs = read_files(path, manifest.files, wanted, mapped=MAPPED)
    shared = {c: decode_component(blobs, c) for c in (*REQUIRED, *OPTIONAL) if f"{c}.json" in blobs}
    ranks = {r: decode_component(blobs, rank_component(r)) for r in range(manifest.world_size)
             if f"{rank_component(r)}.json" in blobs}
    problems = _content_problems(manifest, shared, ranks)
    if problems:
        raise CheckpointCorrupt("; ".join(problems))
    config = blobs[CONFIG_FILE].tobytes()
    if hashlib.sha256(config).hexdigest()[:16] != manifest.config_hash:
        raise CheckpointCorrupt(f"{CONFIG_FILE} does not match the manifest's config_hash")
    return Checkpoint(path, manifest, shared, ranks, config.decode("utf-8", errors="replace"))


def _layout_problems(path: Path, manifest: Manifest) -> list[str]:
    """Which files must be listed, and nothing else."""
    listed = set(manifest.files)
    problems = [f"required file {n} not listed" for c in REQUIRED if (n := f"{c}.json") not in listed]
    if CONFIG_FILE not in listed:
        problems.append(f"required file {CONFIG_FILE} not listed")
    rank_files = {f"{rank_component(r)}.json" for r in range(manifest.world_size)}
    problems += [f"{n} missing for world_size {manifest.world_size}" for n in sorted(rank_files - listed)]
    components = [*REQUIRED, *OPTIONAL, *(rank_component(r) for r in range(manifest.world_size))]
    allowed = {CONFIG_FILE} | {f"{c}.{ext}" for c in components for ext in ("json", "safetensors")}
    unexpected = sorted(listed - allowed)
    if unexpected:
        problems.append(f"manifest lists file(s) the format does not have: {', '.join(unexpected)}")
    named = parse_step(path.name)
    if named is not None and named != manifest.step:
        problems.append(f"folder {path.name} holds step {manifest.step} per its manifest")
    return problems


def _content_problems(manifest: Manifest, shared: dict[str, tp.Any], ranks: dict[int, tp.Any]) -> list[str]:
    """Each component has the shape its ``load_state_dict`` needs, and the counters agree."""
    problems: list[str] = []

    def need(ok: bool, what: str) -> bool:
        if not ok:
            problems.append(what)
        return ok

    model = shared["model"]
    need(isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                         for k, v in model.items()), "model: not a name → tensor map")
    opt = shared["optimizer"]
    if need(isinstance(opt, dict) and set(opt) == {"state", "param_groups"}, "optimizer: not its state"):
        groups = opt["param_groups"]
        need(isinstance(groups, list) and all(_group_ok(g) for g in groups),
             "optimizer: malformed param_groups")
        need(isinstance(opt["state"], dict) and all(
            _is_int(k) and isinstance(v, dict)
            and all(isinstance(x, (torch.Tensor, int, float)) for x in v.values())
            for k, v in opt["state"].items()), "optimizer: malformed state")
    train, data = shared["train_state"], shared["data"]
    if need(_ints(train, "step", "samples_seen"), "train_state: needs int step, samples_seen"):
        need(train["step"] == manifest.step,
             f"train_state.step {train['step']} ≠ manifest step {manifest.step}")
    need(_ints(data, "epoch", "offset") and data["epoch"] >= 0
         and 0 <= data["offset"] <= (train.get("samples_seen", 0) if isinstance(train, dict) else 0),
         "data: needs int epoch >= 0 and 0 <= offset <= train_state.samples_seen")
    probe = shared["probe"]
    need(isinstance(probe, dict) and bool(probe) and all(isinstance(v, torch.Tensor) for v in probe.values()),
         "probe: not a name → tensor map")
    if "ema" in shared:
        need(_ema_ok(shared["ema"]), "ema: not an EMA state")
    if "guard" in shared:
        need(_guard_ok(shared["guard"]), "guard: not a guard state")
    if "grad_scaler" in shared:
        need(isinstance(shared["grad_scaler"], dict) and all(
            isinstance(shared["grad_scaler"].get(k), (int, float))
            for k in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")),
            "grad_scaler: not a GradScaler state")
    device_type = manifest.probe.environment.get("device_type")
    for r, state in ranks.items():
        error = _rank_problem(state, device_type)
        need(error is None, f"{rank_component(r)}: {error}")
    return problems


def _is_int(value: tp.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(tree: tp.Any, *keys: str) -> bool:
    return isinstance(tree, dict) and all(_is_int(tree.get(k)) for k in keys)


def _ema_ok(ema: tp.Any) -> bool:
    return (isinstance(ema, dict) and isinstance(ema.get("shadow_params"), list)
            and all(isinstance(p, torch.Tensor) for p in ema["shadow_params"])
            and _ints(ema, "optimization_step", "update_after_step")
            and all(isinstance(ema.get(k), float) and 0.0 <= ema[k] <= 1.0 for k in ("decay", "min_decay"))
            and isinstance(ema.get("use_ema_warmup"), bool)
            and all(_is_number(ema.get(k)) and math.isfinite(ema[k]) for k in ("inv_gamma", "power")))


def _guard_ok(guard: tp.Any) -> bool:
    if not (isinstance(guard, dict) and isinstance(guard.get("counts"), dict)
            and all(_is_int(v) and v >= 0 for v in guard["counts"].values())
            and _ints(guard, "consecutive_skips", "rollbacks_since_save")
            and isinstance(guard.get("lr_scale"), float) and 0 < guard["lr_scale"] <= 1):
        return False
    losses, clip = guard.get("losses"), guard.get("clip")
    return (_ints(losses, "count") and isinstance(losses.get("losses"), torch.Tensor)
            and losses["losses"].dim() == 1 and losses["losses"].is_floating_point()
            and len(losses["losses"]) <= losses["count"]
            and _ints(clip, "count") and clip["count"] >= 0
            and all(isinstance(clip.get(k), torch.Tensor) and clip[k].dim() == 0 for k in ("mean", "var")))


GROUP_TYPES: dict[str, tuple[type, ...]] = {
    "lr": (int, float, torch.Tensor), "eps": (int, float), "weight_decay": (int, float),
    "initial_lr": (int, float), "amsgrad": (bool,), "maximize": (bool,), "foreach": (bool, type(None)),
    "capturable": (bool,), "differentiable": (bool,), "fused": (bool, type(None)),
}
"""The types of the AdamW hyper-parameters a param group carries (those present are checked)."""


def _group_ok(group: tp.Any) -> bool:
    if not (isinstance(group, dict) and isinstance(group.get("params"), list)
            and all(_is_int(i) for i in group["params"])):
        return False
    betas = group.get("betas", (0.9, 0.999))
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) for b in betas)):
        return False
    return all(isinstance(group[k], kinds) for k, kinds in GROUP_TYPES.items() if k in group)


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rank_problem(state: tp.Any, device_type: str | None) -> str | None:
    """Why this rank state cannot be restored (checked on scratch generators), or None."""
    if not (isinstance(state, dict) and isinstance(state.get("rng"), dict)
            and isinstance(state.get("noise_rng"), torch.Tensor)):
        return "needs rng and noise_rng"
    rng = state["rng"]
    try:
        py = rng["python"]
        random.Random().setstate((py["version"], tuple(py["internal"]), py["gauss"]))
        n = rng["numpy"]
        np.random.RandomState().set_state(
            (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.Generator().set_state(rng["torch"])
        if device_type == "cpu":
            torch.Generator().set_state(state["noise_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError) as exc:
        return f"RNG state cannot be restored ({type(exc).__name__}: {exc})"
    return None


def diff_tensors(
    what: str, saved: tp.Mapping[str, torch.Tensor], live: tp.Mapping[str, torch.Tensor]
) -> list[str]:
    """Readable differences between two name → tensor maps (keys, shapes, dtypes)."""
    out = []
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    if missing:
        out.append(f"{what}: missing {len(missing)} key(s): {_few(missing)}")
    if unexpected:
        out.append(f"{what}: unexpected {len(unexpected)} key(s): {_few(unexpected)}")
    mismatched = []
    for k in sorted(set(saved) & set(live)):
        s, v = saved[k], live[k]
        if tuple(s.shape) != tuple(v.shape):
            mismatched.append(f"{k} shape {tuple(s.shape)} in checkpoint, {tuple(v.shape)} in model")
        elif s.dtype != v.dtype:
            mismatched.append(f"{k} dtype {s.dtype} in checkpoint, {v.dtype} in model")
    if mismatched:
        out.append(f"{what}: {len(mismatched)} mismatch(es): {_few(mismatched, 3)}")
    return out


def _few(names: list[str], n: int = 4) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_keys(
    report: Report,
    state: tp.Mapping[str, tp.Any],
    live_model: tp.Mapping[str, torch.Tensor],
    live_params: list[torch.Tensor],
    live_group_sizes: list[int],
) -> bool:
    """Level 4: model, EMA (when both sides have one) and optimizer fit the live objects exactly."""
    problems = diff_tensors("model", state["model"], live_model)
    shapes = [tuple(p.shape) for p in live_params]
    if "ema" in state:
        shadow = [tuple(t.shape) for t in state["ema"]["shadow_params"]]
        if shadow != shapes:
            problems.append(f"ema: {len(shadow)} shadow params do not match the {len(shapes)} trainable "
                            "parameters (count or shapes differ)")
    sizes = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    if sizes != live_group_sizes:
        problems.append(f"optimizer: param groups of {sizes} parameters in checkpoint, "
                        f"{live_group_sizes} in this run")
    else:
        for idx, slots in state["optimizer"]["state"].items():
            if not 0 <= int(idx) < len(shapes):
                problems.append(f"optimizer: state for parameter {idx}, the model has {len(shapes)}")
                continue
            for slot, value in slots.items():
                shaped = isinstance(value, torch.Tensor) and value.dim() > 0
                if shaped and tuple(value.shape) != shapes[int(idx)]:
                    problems.append(f"optimizer: state[{idx}].{slot} shape {tuple(value.shape)}, "
                                    f"parameter has {shapes[int(idx)]}")
    if problems:
        return report.set("keys", False, "; ".join(problems))
    return report.set("keys", True, f"{len(live_model)} model tensors, {len(shapes)} trainable params")


def floating_leaves(tree: tp.Any, prefix: str = "") -> tp.Iterator[tuple[str, torch.Tensor | float]]:
    """``(path, value)`` for every floating tensor and every float in a nested state tree, in order
    (a stack, not recursion: a state holds thousands of leaves)."""
    stack: list[tuple[str, tp.Any]] = [(prefix, tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, torch.Tensor):
            if node.is_floating_point():
                yield path or "<tensor>", node
        elif isinstance(node, float):
            yield path or "<float>", node
        elif isinstance(node, (dict, list, tuple)):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend(reversed([(f"{path}.{k}" if path else str(k), v) for k, v in items]))


def nonfinite_names(tree: tp.Any) -> list[str]:
    """Paths of floating tensors (and plain floats) in ``tree`` holding NaN or Inf (see :func:`scan`)."""
    return scan(tree, negatives=False)[0]


def scan(tree: tp.Any, negatives: bool = True) -> tuple[list[str], list[str]]:
    """Paths of floating tensors (and plain floats) in ``tree`` holding NaN or Inf, and (``negatives``)
    of the second moments and variances (:data:`NONNEGATIVE`) holding a negative value.

    One pass over each tensor, copying nothing: its fp32 sum (a non-finite element makes the sum
    non-finite), or for a :data:`NONNEGATIVE` one its minimum and maximum (NaN propagates into both,
    and the minimum tells a negative entry). These are stacked on each tensor's device and copied to
    the host once per device — one sync for a whole GPU state, not one per tensor. Only the suspects
    get an exact element-wise check: tensors whose sum is not finite (a finite tensor whose sum
    overflows included), and those whose minimum is NaN (a negative entry beside a NaN still counts).
    """
    leaves = list(floating_leaves(tree))
    named = [(k, v) for k, v in leaves if isinstance(v, torch.Tensor)]
    ranged = [negatives and k.endswith(NONNEGATIVE) and v.numel() > 0 for k, v in named]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    suspects, negative = [], set()
    for indices in by_device.values():
        summed = [i for i in indices if not ranged[i]]
        spans = [i for i in indices if ranged[i]]
        parts = [named[i][1].sum(dtype=torch.float32) for i in summed]
        parts += [v.float() for i in spans for v in torch.aminmax(named[i][1].detach())]
        values, n = torch.stack(parts).cpu(), len(summed)
        sums, lows, highs = values[:n], values[n::2], values[n + 1::2]
        suspects += [summed[j] for j in (~torch.isfinite(sums)).nonzero().flatten().tolist()]
        unbounded = ~(torch.isfinite(lows) & torch.isfinite(highs))
        suspects += [spans[j] for j in unbounded.nonzero().flatten().tolist()]
        negative |= {spans[j] for j in (lows < 0).nonzero().flatten().tolist()}
        negative |= {spans[j] for j in lows.isnan().nonzero().flatten().tolist()
                     if bool((named[spans[j]][1] < 0).any())}
    bad = {named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())}
    bad |= {k for k, v in leaves if isinstance(v, float) and not math.isfinite(v)}
    return [k for k, _ in leaves if k in bad], [named[i][0] for i in sorted(negative)]


def defect(where: str, value: torch.Tensor | float) -> str | None:
    """What is wrong with one value of a state tree, with counts (NaN, ±Inf, and negative entries
    where :data:`NONNEGATIVE` forbids them); None when nothing is. The per-tensor account of what
    :func:`check_finite` refuses, for ``doctor``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r}"
    v = value.detach().float()
    nan, pos, neg = (int(x) for x in (v.isnan().sum(), v.isposinf().sum(), v.isneginf().sum()))
    negative = int((v < 0).sum()) - neg if where.endswith(NONNEGATIVE) else 0
    counts = ((nan, "NaN"), (pos, "+Inf"), (neg, "-Inf"), (negative, "negative"))
    parts = [f"{n} {label}" for n, label in counts if n]
    return f"{', '.join(parts)} of {v.numel()} values" if parts else None


def check_finite(report: Report, state: tp.Mapping[str, tp.Any]) -> bool:
    """Level 2; non-finite (or negative) running statistics are listed in ``report.repairable``
    instead."""
    checked = {k: state[k] for k in ("model", "ema", "optimizer", "probe", "guard") if k in state}
    bad, negative = scan(checked)
    stats = [n for n in dict.fromkeys((*bad, *negative))
             if n.startswith("model.") and n.endswith(RUNNING_STATS)]
    problems = []
    if damage := [n for n in bad if n not in stats]:
        problems.append(f"non-finite values in {len(damage)} tensor(s) or number(s): {_few(damage)}")
    if damage := [n for n in negative if n not in stats and n not in bad]:
        problems.append(f"negative second moments in {len(damage)} tensor(s): {_few(damage)} (their square "
                        "root is NaN: the first optimizer step would poison the weights)")
    if problems:
        return report.set("finite", False, "; ".join(problems))
    report.repairable = stats
    if stats:
        return report.set("finite", True, f"finite except {len(stats)} running statistic(s) ({_few(stats)}), "
                                          "recomputed after loading")
    return report.set("finite", True, "all tensors and numbers finite")


def check_scale_factor(report: Report, state: tp.Mapping[str, tp.Any], manifest: Manifest,
                       stage_has_one: bool) -> bool:
    """Level 3: the buffer in the weights is the value the manifest recorded."""
    buffer = state["model"].get("scale_factor")
    if not stage_has_one:
        if manifest.scale_factor is not None or buffer is not None:
            return report.set("scale_factor", False, "this stage has no scale_factor, the checkpoint does")
        return report.set("scale_factor", True, "no scale_factor in this stage")
    if manifest.scale_factor is None:
        return report.set("scale_factor", False, "the manifest records no scale_factor")
    if buffer is None or buffer.numel() != 1:
        return report.set("scale_factor", False, "model.safetensors has no scale_factor buffer")
    value = float(buffer)
    if value != manifest.scale_factor:
        return report.set("scale_factor", False,
                          f"weights hold {value!r}, manifest recorded {manifest.scale_factor!r}")
    return report.set("scale_factor", True, f"{value:.6g}")
