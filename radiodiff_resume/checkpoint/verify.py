"""Verification levels, each reported on its own:

1. ``structure`` — manifest parses; every listed file exists with its size and SHA-256;
   no file is missing or stray.
2. ``keys`` — strict key / shape / dtype match of model, EMA and optimizer against the
   live objects, with a readable diff.
3. ``finite`` — every floating tensor is finite.
4. ``scale_factor`` — the model's buffer equals the manifest's.
5. ``probe`` — (run by the checkpointer after loading) the recorded probe loss is
   reproduced.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch

from radiodiff_resume.checkpoint.manifest import MANIFEST, Manifest, hash_files

LEVELS = ("structure", "keys", "finite", "scale_factor", "probe")


@dataclass
class Level:
    name: str
    ok: bool | None = None
    """None: not reached (an earlier level failed)."""
    detail: str = ""


@dataclass
class Report:
    path: Path
    levels: dict[str, Level] = field(default_factory=lambda: {n: Level(n) for n in LEVELS})

    def set(self, name: str, ok: bool, detail: str = "") -> bool:
        self.levels[name] = Level(name, ok, detail)
        return ok

    @property
    def ok(self) -> bool:
        return all(level.ok for level in self.levels.values())

    @property
    def failure(self) -> Level | None:
        return next((lv for lv in self.levels.values() if lv.ok is False), None)

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


def check_structure(path: Path, report: Report) -> Manifest | None:
    """Level 1. Returns the manifest when the folder is structurally sound."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        report.set("structure", False, "manifest.json missing (the save never committed)")
        return None
    try:
        manifest = Manifest.from_json(manifest_path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        report.set("structure", False, f"manifest.json unreadable: {exc}")
        return None
    problems = []
    present = {p.name for p in path.iterdir() if p.is_file()} - {MANIFEST}
    present |= {f"{p.name}/" for p in path.iterdir() if p.is_dir()}
    sized = []
    for name, record in sorted(manifest.files.items()):
        file = path / name
        if name not in present:
            problems.append(f"{name} missing")
        elif file.stat().st_size != record.bytes:
            problems.append(f"{name} has {file.stat().st_size} bytes, manifest says {record.bytes}")
        else:
            sized.append(file)
    for name, found in hash_files(sized).items():
        if found.sha256 != manifest.files[name].sha256:
            problems.append(f"{name} sha256 mismatch (content changed after the save)")
    stray = sorted(present - set(manifest.files))
    if stray:
        problems.append(f"stray file(s) not in the manifest: {', '.join(stray)}")
    if problems:
        report.set("structure", False, "; ".join(problems))
        return None
    report.set("structure", True, f"{len(manifest.files)} files, hashes match")
    return manifest


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
    expect_ema: bool,
) -> bool:
    """Level 2: model, EMA and optimizer fit the live objects exactly."""
    problems = diff_tensors("model", state["model"], live_model)
    shapes = [tuple(p.shape) for p in live_params]
    if expect_ema != ("ema" in state):
        problems.append("ema: " + ("missing from the checkpoint" if expect_ema else
                                   "present in the checkpoint but trainer.use_ema is false"))
    elif expect_ema:
        shadow = [tuple(t.shape) for t in state["ema"]["shadow_params"]]
        if shadow != shapes:
            problems.append(f"ema: {len(shadow)} shadow params do not match the {len(shapes)} trainable "
                            "parameters (count or shapes differ)")
    groups = state["optimizer"]["param_groups"]
    n_params = sum(len(g["params"]) for g in groups)
    if n_params != len(shapes):
        problems.append(f"optimizer: {n_params} parameters in checkpoint, {len(shapes)} trainable in model")
    else:
        for idx, slots in state["optimizer"]["state"].items():
            for slot, value in slots.items():
                if value.dim() > 0 and tuple(value.shape) != shapes[int(idx)]:
                    problems.append(f"optimizer: state[{idx}].{slot} shape {tuple(value.shape)}, "
                                    f"parameter has {shapes[int(idx)]}")
    if problems:
        return report.set("keys", False, "; ".join(problems))
    return report.set("keys", True, f"{len(live_model)} model tensors, {len(shapes)} trainable params")


def floating_tensors(tree: tp.Any, prefix: str = "") -> tp.Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every floating tensor in a nested state tree."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            yield prefix or "<tensor>", tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from floating_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from floating_tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_names(tree: tp.Any) -> list[str]:
    """Paths of floating tensors in ``tree`` holding NaN or Inf.

    Fast path: one fp32 sum per tensor (a non-finite element makes the sum non-finite)
    and one host sync for all of them; only tensors whose sum is not finite — which
    includes finite tensors whose sum overflows — get the exact element-wise check.
    """
    named = list(floating_tensors(tree))
    if not named:
        return []
    sums = torch.stack([t.sum(dtype=torch.float32).to("cpu") for _, t in named])
    suspects = (~torch.isfinite(sums)).nonzero().flatten().tolist()
    return [named[i][0] for i in suspects if not bool(torch.isfinite(named[i][1]).all())]


def check_finite(report: Report, state: tp.Mapping[str, tp.Any]) -> bool:
    """Level 3."""
    bad = nonfinite_names({k: state[k] for k in ("model", "ema", "optimizer") if k in state})
    if bad:
        return report.set("finite", False, f"non-finite values in {len(bad)} tensor(s): {_few(bad)}")
    return report.set("finite", True, "all tensors finite")


def check_scale_factor(report: Report, state: tp.Mapping[str, tp.Any], manifest: Manifest) -> bool:
    """Level 4: the buffer in the weights is the value the manifest recorded."""
    if manifest.scale_factor is None:
        return report.set("scale_factor", True, "no scale_factor in this stage")
    buffer = state["model"].get("scale_factor")
    if buffer is None:
        return report.set("scale_factor", False, "model.safetensors has no scale_factor buffer")
    value = float(buffer)
    if value != manifest.scale_factor:
        return report.set("scale_factor", False,
                          f"weights hold {value!r}, manifest recorded {manifest.scale_factor!r}")
    return report.set("scale_factor", True, f"{value:.6g}")
