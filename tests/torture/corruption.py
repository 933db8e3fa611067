"""Corruption fuzzing of committed checkpoints: a mutation library, the oracle, and a runner.

Every mutation is applied to a fresh copy of a good committed checkpoint (``step-00000004``
of a finished run) and the copy is verified with ``trainer.checkpointer.verify_and_load``:

* ``detected`` — the report fails at an integrity level (``report.damaged``);
* ``missed``   — the report passes, or fails at a level that does not prove damage;
* ``crashed``  — an exception escaped verification, or it hung past the trial's time limit.

Controls verify untouched copies (any failure is a false alarm). Discovery trials put a mutated
copy as the newest ``step-*`` folder and call ``checkpointer.resume()``: it must move that folder
unchanged into ``quarantine/`` (reason file beside it) and resume step 2.

Three groups of mutations:

* ``file`` — for every file of the checkpoint (``manifest.json`` included): truncation, byte
  flips, deletion, stray duplicates, appended bytes, zero fill, swapped or stale content, and the
  file replaced by a directory, a symlink to an identical copy outside the folder, or a FIFO.
* ``manifest`` — a rewritten manifest *resealed with a valid checksum*, so that only the semantic
  checks can catch it (paths outside the folder, wrong types, missing components, ...).
* ``component`` — a rewritten component file whose manifest record is updated to the new size and
  SHA-256 (and the manifest resealed): wrong shapes, dangling tensor references, NaN / Inf,
  garbage safetensors, deep nesting.

From a script::

    from tests.torture.corruption import run_trials
    summary = run_trials(Path("results-of-a-finished-run"), trials=None, seed=0)
    print(summary.header())
    print(summary.row())
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import tempfile
import threading
import time
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from radiodiff_resume.checkpoint.manifest import MANIFEST
from radiodiff_resume.checkpoint.store import REASON_SUFFIX
from radiodiff_resume.checkpoint.verify import Report
from radiodiff_resume.config import load_config
from radiodiff_resume.errors import UserError
from radiodiff_resume.run import build_ldm_trainer

if tp.TYPE_CHECKING:
    from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer

NEWEST, OLDER = "step-00000004", "step-00000002"
TRIAL_TIMEOUT = 60.0
"""Seconds a single verification may take before the trial counts as hung (normal: ~0.1 s)."""

DETECTED, MISSED, CRASHED, ACCEPTED = "detected", "missed", "crashed", "accepted"

Apply = tp.Callable[[Path, random.Random], str]


class Hung(BaseException):
    """Raised by the watchdog in the main thread: a verification ran past its time limit.

    A BaseException so that no ``except Exception`` in the code under test can swallow it.
    """


@dataclass(frozen=True)
class Mutation:
    """One way of damaging a checkpoint folder; ``apply`` returns a short description."""

    name: str
    target: str
    """The file it damages ('' for mutations of several files)."""
    apply: Apply
    group: str
    """``file``, ``manifest`` or ``component``."""
    expect: str = ""
    """A regex the failing level's detail must match (used by the explicit tests; '' = anything)."""
    timeout: float = TRIAL_TIMEOUT
    difference: bool = False
    """A consistent, resealed change that is indistinguishable from a run set up differently (e.g.
    another optimizer grouping): the right outcome is a stop that moves nothing, not a quarantine."""

    @property
    def id(self) -> str:
        return f"{self.target}:{self.name}" if self.target else self.name


@dataclass
class Outcome:
    kind: str
    """``verify``, ``discovery``, ``control`` or ``edge``."""
    mutation: str
    description: str
    verdict: str
    detail: str
    seconds: float


@dataclass
class Summary:
    trials: int = 0
    detected: int = 0
    missed: int = 0
    crashed: int = 0
    accepted: int = 0
    """Edge trials whose nesting sits in an unknown key the format tolerates, and that verified ok."""
    controls: int = 0
    false_alarms: int = 0
    seconds: float = 0.0
    failures: list[Outcome] = field(default_factory=list)
    """Every missed or crashed trial and every false alarm, with its description and what happened."""
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.kind == "control":
            self.controls += 1
            if outcome.verdict != "ok":
                self.false_alarms += 1
                self.failures.append(outcome)
            return
        self.trials += 1
        if outcome.verdict == DETECTED:
            self.detected += 1
            return
        if outcome.verdict == ACCEPTED:
            self.accepted += 1
            return
        if outcome.verdict == CRASHED:
            self.crashed += 1
        else:
            self.missed += 1
        self.failures.append(outcome)

    @staticmethod
    def header() -> str:
        return (f"{'trials':>7} {'detected':>9} {'missed':>7} {'crashed':>8} {'controls':>9} "
                f"{'false alarms':>13} {'seconds':>8}")

    def row(self) -> str:
        return (f"{self.trials:>7} {self.detected:>9} {self.missed:>7} {self.crashed:>8} {self.controls:>9} "
                f"{self.false_alarms:>13} {self.seconds:>8.1f}")

    def report(self) -> str:
        """The table row and one line per failure."""
        lines = [self.header(), self.row()]
        for f in self.failures:
            lines.append(f"  {f.verdict.upper():<11} [{f.kind}] {f.mutation}: {f.description} -> {f.detail}")
        return "\n".join(lines)


# ----- file-level helpers -----------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_raw(ckpt: Path) -> dict[str, tp.Any]:
    return tp.cast(dict[str, tp.Any], json.loads((ckpt / MANIFEST).read_bytes()))


def seal_text(body: tp.Mapping[str, tp.Any]) -> str:
    """The checksum the library computes (canonical JSON of every field but ``checksum``).

    ``allow_nan=True`` so that a manifest holding NaN gets the checksum a lenient parser would
    accept: the only thing left to refuse it is the semantic check.
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_sealed(ckpt: Path, raw: tp.Mapping[str, tp.Any],
                 edit: tp.Callable[[str], str] | None = None) -> None:
    """Write ``raw`` as the manifest with a valid checksum; ``edit`` may then rewrite the text
    (for what ``json`` cannot produce: duplicate keys, overflowing numbers, deep nesting)."""
    body = {k: v for k, v in raw.items() if k != "checksum"}
    text = json.dumps({**body, "checksum": seal_text(body)}, indent=1, sort_keys=True, allow_nan=True)
    (ckpt / MANIFEST).write_text(edit(text) if edit else text)


def reseal(ckpt: Path, *names: str) -> None:
    """Update the manifest records of ``names`` to their current content, and the checksum."""
    raw = read_raw(ckpt)
    for name in names:
        data = (ckpt / name).read_bytes()
        raw["files"][name] = {"sha256": sha256(data), "bytes": len(data)}
    write_sealed(ckpt, raw)


def unlist(ckpt: Path, *names: str) -> None:
    """Delete ``names`` from disk and from the manifest listing (resealed)."""
    raw = read_raw(ckpt)
    for name in names:
        (ckpt / name).unlink()
        del raw["files"][name]
    write_sealed(ckpt, raw)


def edit_manifest(change: tp.Callable[[dict[str, tp.Any]], None]) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        raw = read_raw(ckpt)
        change(raw)
        write_sealed(ckpt, raw)
        return "manifest rewritten and resealed"

    return apply


def edit_json(name: str, change: tp.Callable[[tp.Any], tp.Any]) -> Apply:
    """Rewrite component file ``name`` (parsed JSON → ``change`` returns the new tree), resealed."""

    def apply(ckpt: Path, rng: random.Random) -> str:
        tree = json.loads((ckpt / name).read_bytes())
        new = change(tree)
        (ckpt / name).write_text(json.dumps(tree if new is None else new, allow_nan=True))
        reseal(ckpt, name)
        return f"{name} rewritten and resealed"

    return apply


def write_text_resealed(name: str, text: str | bytes) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        data = text.encode() if isinstance(text, str) else text
        (ckpt / name).write_bytes(data)
        reseal(ckpt, name)
        return f"{name} replaced by {len(data)} bytes, resealed"

    return apply


def edit_tensors(component: str, change: tp.Callable[[dict[str, torch.Tensor]], None]) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        path = ckpt / f"{component}.safetensors"
        tensors = load_file(str(path))
        change(tensors)
        save_file(tensors, str(path), metadata={"component": component})
        reseal(ckpt, path.name)
        return f"{path.name} rewritten and resealed"

    return apply


def edit_safetensors_header(component: str, change: tp.Callable[[dict[str, tp.Any]], None]) -> Apply:
    """Rewrite the JSON header of a safetensors file (8-byte length + JSON + data), resealed."""

    def apply(ckpt: Path, rng: random.Random) -> str:
        path = ckpt / f"{component}.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        change(header)
        new = json.dumps(header).encode()
        new += b" " * ((-len(new)) % 8)
        path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
        reseal(ckpt, path.name)
        return f"{path.name} header rewritten, resealed"

    return apply


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ----- generic mutations, applied to every file ---------------------------------------------------------


def _truncate_random(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    keep = rng.randrange(1, size) if size > 1 else 0
    os.truncate(path, keep)
    return f"truncated {size} -> {keep} bytes"


def _truncate_zero(path: Path, rng: random.Random) -> str:
    os.truncate(path, 0)
    return "truncated to 0 bytes"


def _truncate_last(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    os.truncate(path, size - 1)
    return f"last byte cut ({size} -> {size - 1})"


def _flip(path: Path, positions: list[int], rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    done = []
    for pos in positions:
        mask = rng.randrange(1, 256)
        data[pos] ^= mask
        done.append(f"{pos}^0x{mask:02x}")
    path.write_bytes(bytes(data))
    return "flipped " + ", ".join(done)


JSON_SPACE = b" \t\r\n"


def _positions(path: Path) -> list[int]:
    """Where a flip changes the file's meaning. The manifest is not hashed by itself but parsed and
    checksummed, so a flip of whitespace between its tokens (say a space into a tab) changes nothing."""
    data = path.read_bytes()
    if path.name != MANIFEST:
        return list(range(len(data)))
    return [i for i, b in enumerate(data) if b not in JSON_SPACE]


def _flip_one(path: Path, rng: random.Random) -> str:
    return _flip(path, [rng.choice(_positions(path))], rng)


def _flip_several(path: Path, rng: random.Random) -> str:
    positions = _positions(path)
    return _flip(path, sorted(rng.sample(positions, min(len(positions), rng.randint(2, 8)))), rng)


def _flip_ends(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    return _flip(path, sorted({0, size - 1}), rng)


def _zero_fill(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    path.write_bytes(bytes(size))
    return f"{size} bytes zeroed (same size)"


def _append(path: Path, rng: random.Random) -> str:
    extra = rng.randbytes(rng.randint(1, 4096))
    if not extra.strip(JSON_SPACE):  # only whitespace after a manifest would change nothing
        extra = b"x" + extra
    with path.open("ab") as f:
        f.write(extra)
    return f"{len(extra)} random bytes appended"


def _append_newline(path: Path, rng: random.Random) -> str:
    with path.open("ab") as f:
        f.write(b"\n")
    return "a newline appended (JSON still parses)"


def _delete(path: Path, rng: random.Random) -> str:
    path.unlink()
    return "deleted"


def _duplicate(path: Path, rng: random.Random) -> str:
    name = rng.choice([f"{path.name}.bak", f"copy of {path.name}", f".{path.name}", f"{path.name}~",
                       f"{path.stem}-1{path.suffix}"])
    shutil.copyfile(path, path.with_name(name))
    return f"copied to {name!r} (stray)"


def _outside_copy(path: Path) -> Path:
    outside = path.parent.parent / "outside"
    outside.mkdir(exist_ok=True)
    copy = outside / path.name
    shutil.copyfile(path, copy)
    return copy


def _symlink_absolute(path: Path, rng: random.Random) -> str:
    copy = _outside_copy(path)
    path.unlink()
    path.symlink_to(copy.resolve())
    return f"replaced by a symlink to an identical copy {copy.resolve()}"


def _symlink_relative(path: Path, rng: random.Random) -> str:
    copy = _outside_copy(path)
    path.unlink()
    target = Path("..") / copy.parent.name / copy.name
    path.symlink_to(target)
    return f"replaced by a symlink to an identical copy {target}"


def _directory(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    path.unlink()
    path.mkdir()
    (path / path.name).write_bytes(data)
    return "replaced by a directory holding the file"


def _fifo(path: Path, rng: random.Random) -> str:
    path.unlink()
    os.mkfifo(path)
    return "replaced by a FIFO (a reader that blocks on it hangs)"


def _swap_next(path: Path, rng: random.Random) -> str:
    names = sorted(p.name for p in path.parent.iterdir())
    other = path.parent / names[(names.index(path.name) + 1) % len(names)]
    a, b = path.read_bytes(), other.read_bytes()
    path.write_bytes(b)
    other.write_bytes(a)
    return f"content swapped with {other.name}"


GENERIC: dict[str, tp.Callable[[Path, random.Random], str]] = {
    "truncate-random": _truncate_random,
    "truncate-zero": _truncate_zero,
    "truncate-last-byte": _truncate_last,
    "flip-one-byte": _flip_one,
    "flip-several-bytes": _flip_several,
    "flip-first-and-last": _flip_ends,
    "zero-fill": _zero_fill,
    "append-bytes": _append,
    "append-newline": _append_newline,
    "delete": _delete,
    "duplicate": _duplicate,
    "directory": _directory,
    "symlink-absolute": _symlink_absolute,
    "symlink-relative": _symlink_relative,
    "fifo": _fifo,
    "swap-with-next-file": _swap_next,
}


NOT_A_CHANGE = {(MANIFEST, "append-newline")}
"""(file, mutation) pairs that do not change what the file means: trailing whitespace after the
manifest's JSON leaves every field and the checksum as they were."""


def _generic(name: str, target: str) -> Mutation:
    fn = GENERIC[name]

    def apply(ckpt: Path, rng: random.Random) -> str:
        return f"{target}: {fn(ckpt / target, rng)}"

    return Mutation(name, target, apply, "file")


def _stale(target: str, older: Path) -> Mutation:
    def apply(ckpt: Path, rng: random.Random) -> str:
        shutil.copyfile(older / target, ckpt / target)
        return f"{target}: replaced by the same file of {older.name} (a stale file)"

    return Mutation("stale-from-older-checkpoint", target, apply, "file")


# ----- manifest mutations (resealed) --------------------------------------------------------------------

PLAIN = "not a plain file name inside the checkpoint"


def _listed_outside(name_of: tp.Callable[[Path], str], where_of: tp.Callable[[Path], Path]) -> Apply:
    """List a file outside the folder, with the correct record, and create it there."""

    def apply(ckpt: Path, rng: random.Random) -> str:
        data = b"x"
        where = where_of(ckpt)
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(data)
        raw = read_raw(ckpt)
        name = name_of(ckpt)
        raw["files"][name] = {"sha256": sha256(data), "bytes": len(data)}
        write_sealed(ckpt, raw)
        return f"manifest lists {name!r} (which exists, with that content), resealed"

    return apply


def _rename_listed(old: str, new: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        raw = read_raw(ckpt)
        raw["files"][new] = raw["files"].pop(old)
        write_sealed(ckpt, raw)
        return f"manifest lists {old} as {new!r}, resealed"

    return apply


def _listed_subdirectory(ckpt: Path, rng: random.Random) -> str:
    (ckpt / "grad_scaler.json").mkdir()
    (ckpt / "grad_scaler.json" / "x").write_bytes(b"{}")
    raw = read_raw(ckpt)
    raw["files"]["grad_scaler.json"] = {"sha256": sha256(b""), "bytes": 0}
    write_sealed(ckpt, raw)
    return "a sub-directory grad_scaler.json/ listed as a file, resealed"


def _remove_component(component: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        names = [n for n in read_raw(ckpt)["files"] if n == component or n.startswith(component + ".")]
        unlist(ckpt, *names)
        return f"{', '.join(names)} removed from disk and listing, resealed"

    return apply


def _set(key: str, value: tp.Any) -> Apply:
    def change(raw: dict[str, tp.Any]) -> None:
        node = raw
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value

    return edit_manifest(change)


def _drop(key: str) -> Apply:
    return edit_manifest(lambda raw: raw.pop(key))


def _text_edit(change: tp.Callable[[str], str], what: str) -> Apply:
    """Seal the manifest, then edit its text (the checksum field stays the one of the sealed body)."""

    def apply(ckpt: Path, rng: random.Random) -> str:
        write_sealed(ckpt, read_raw(ckpt), change)
        return what

    return apply


def _value_text(key: str, text: str, probe: bool = False) -> Apply:
    """Replace the JSON value of ``key`` (top level, or in ``probe``) by raw ``text`` (NaN, 1e400,
    deep nesting)."""
    indent = "  " if probe else " "
    pattern = re.compile(rf'^{indent}"{re.escape(key)}": (.*?)(,?)$', re.M)

    def change(doc: str) -> str:
        new, n = pattern.subn(lambda m: f'{indent}"{key}": {text}{m.group(2)}', doc, count=1)
        assert n == 1, key
        return new

    shown = text if probe else f"{text[:40]}{'...' if len(text) > 40 else ''}"
    return _text_edit(change, f"manifest {'probe.' if probe else ''}{key} = {shown}")


def _probe_text(key: str, text: str) -> Apply:
    return _value_text(key, text, probe=True)


def _duplicate_key(doc: str) -> str:
    return doc.replace('\n "step": ', '\n "step": 4,\n "step": ', 1)


def _huge_padding(doc: str) -> str:
    return doc + " " * (16 << 20)


def _huge_field(ckpt: Path, rng: random.Random) -> str:
    raw = read_raw(ckpt)
    raw["created"] = "x" * ((16 << 20) + 1)
    write_sealed(ckpt, raw)
    return "manifest created = a 16 MiB string, resealed"


def _step_everywhere(ckpt: Path, rng: random.Random) -> str:
    (ckpt / "train_state.json").write_text(json.dumps({"samples_seen": 24, "step": 6}))
    reseal(ckpt, "train_state.json")
    raw = read_raw(ckpt)
    raw["step"] = 6
    write_sealed(ckpt, raw)
    return "step 6 in manifest and train_state (folder still says 4), resealed"


def _whole_manifest(text: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        (ckpt / MANIFEST).write_text(text)
        return f"manifest.json = {text[:30]}{'...' if len(text) > 30 else ''}"

    return apply


def _manifest_bytes(data: bytes, what: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        (ckpt / MANIFEST).write_bytes(data + (ckpt / MANIFEST).read_bytes())
        return what

    return apply


def _digit_to_e(ckpt: Path, rng: random.Random) -> str:
    """One byte flipped, not resealed: a digit of scale_factor becomes ``e`` (``0.998...`` ->
    ``0.9e8131...``), a number that parses but overflows to inf."""
    path = ckpt / MANIFEST
    data = bytearray(path.read_bytes())
    match = re.search(rb'"scale_factor": -?\d+\.\d(\d{3,})', bytes(data))
    assert match is not None
    pos = match.start(1)
    mask = data[pos] ^ ord("e")
    data[pos] = ord("e")
    path.write_bytes(bytes(data))
    return f"byte {pos} of manifest.json ^0x{mask:02x}: a digit of scale_factor became 'e' (overflows)"


REQUIRED_FIELDS = ("step", "stage", "world_size", "line", "config_hash", "scale_factor", "probe", "files",
                   "created", "versions")


def manifest_mutations() -> list[Mutation]:
    def m(name: str, apply: Apply, expect: str = "", timeout: float = TRIAL_TIMEOUT) -> Mutation:
        return Mutation(name, MANIFEST, apply, "manifest", expect, timeout)

    out = [
        m("path-dotdot", _listed_outside(lambda c: "../../x", lambda c: c / ".." / ".." / "x"), PLAIN),
        m("path-sub", _listed_outside(lambda c: "sub/x", lambda c: c / "sub" / "x"), PLAIN),
        m("path-absolute", _listed_outside(lambda c: str((c.parent / "abs-x").resolve()),
                                           lambda c: c.parent / "abs-x"), PLAIN),
        m("path-back-into-folder", _rename_listed("model.json", "../" + NEWEST + "/model.json"), PLAIN),
        m("path-dot-slash", _rename_listed("model.json", "./model.json"), PLAIN),
        m("path-trailing-newline", _rename_listed("model.json", "model.json\n"), PLAIN),
        m("path-empty", _rename_listed("model.json", ""), PLAIN),
        m("path-nul", _rename_listed("model.json", "model.json\x00"), PLAIN),
        m("path-manifest-itself", _listed_outside(lambda c: MANIFEST, lambda c: c.parent / "unused"), PLAIN),
        m("files-list", _set("files", []), "'files' must be dict"),
        m("files-null", _set("files", None), "'files' must be dict"),
        m("files-empty", _set("files", {}), r"world_size 1 but only 0 file\(s\) listed"),
        m("listed-subdirectory", _listed_subdirectory, "not a regular file"),
        m("record-extra-field", edit_manifest(lambda r: r["files"]["model.json"].update(mode=420)),
          r"must be \{<hash name>: <hex digest>, bytes\}"),
        m("record-bytes-negative", edit_manifest(lambda r: r["files"]["model.json"].update(bytes=-1)),
          r"bytes must be an int >= 0"),
        m("record-bytes-bool", edit_manifest(lambda r: r["files"]["data.json"].update(bytes=True)),
          r"bytes must be an int >= 0"),
        m("record-bytes-float", edit_manifest(
            lambda r: r["files"]["data.json"].update(bytes=float(r["files"]["data.json"]["bytes"]))),
          r"bytes must be an int >= 0"),
        m("record-sha-uppercase", edit_manifest(
            lambda r: r["files"]["model.json"].update(xxh3_128=r["files"]["model.json"]["xxh3_128"].upper())),
          "is not a xxh3_128 hex digest"),
        m("record-wrong-sha", edit_manifest(lambda r: r["files"]["model.json"].update(xxh3_128="ab" * 16)),
          "xxh3_128 mismatch"),
        m("record-wrong-bytes", edit_manifest(
            lambda r: r["files"]["optimizer.json"].update(bytes=r["files"]["optimizer.json"]["bytes"] + 1)),
          r"optimizer\.json has \d+ bytes, manifest says \d+"),
        m("missing-rank-file", _remove_component("rank-00000"), r"rank-00000\.json missing for world_size 1"),
        m("world-size-2", _set("world_size", 2), r"rank-00001\.json missing for world_size 2"),
        m("world-size-0", _set("world_size", 0), "out of range"),
        m("world-size-string", _set("world_size", "1"), "'world_size' must be int"),
        m("world-size-huge", _set("world_size", 10**12), "", timeout=3.0),
        m("step-changed", _set("step", 6), r"holds step 6|train_state\.step 4 ≠ manifest step 6"),
        m("step-changed-with-train-state", _step_everywhere, r"folder step-00000004 holds step 6"),
        m("step-negative", _set("step", -1), "out of range"),
        m("step-bool", _set("step", True), "'step' must be int"),
        m("step-float", _set("step", 4.0), "'step' must be int"),
        m("probe-null", _set("probe", None), "'probe' must be dict"),
        m("probe-loss-nan", _probe_text("loss", "NaN"), "not valid JSON|not a finite number"),
        m("probe-loss-infinity", _probe_text("loss", "-Infinity"), "not valid JSON|not a finite number"),
        m("probe-loss-overflow", _probe_text("loss", "1e400"), "not valid JSON|not a finite number"),
        m("probe-loss-string", edit_manifest(lambda r: r["probe"].update(loss=str(r["probe"]["loss"]))),
          "not a finite number"),
        m("probe-loss-hex-disagrees", edit_manifest(
            lambda r: r["probe"].update(loss_hex=(r["probe"]["loss"] * 2).hex())), "disagree"),
        m("probe-loss-hex-garbage", edit_manifest(lambda r: r["probe"].update(loss_hex="0xzz")),
          "not a float in hex"),
        m("probe-extra-field", edit_manifest(lambda r: r["probe"].update(extra=1)), "probe fields"),
        m("probe-environment-not-strings", edit_manifest(
            lambda r: r["probe"]["environment"].update(threads=1)), "must map names to strings"),
        m("scale-factor-null", _set("scale_factor", None), "records no scale_factor"),
        m("scale-factor-nan", _value_text("scale_factor", "NaN"), "not valid JSON|not a finite positive"),
        m("scale-factor-overflow", _value_text("scale_factor", "1e400"),
          "not valid JSON|not a finite positive"),
        m("scale-factor-negative", edit_manifest(lambda r: r.update(scale_factor=-r["scale_factor"])),
          "not a finite positive"),
        m("scale-factor-zero", _set("scale_factor", 0.0), "not a finite positive"),
        m("scale-factor-string", _set("scale_factor", "1.0"), "not a finite positive"),
        m("scale-factor-bool", _set("scale_factor", True), "not a finite positive"),
        m("scale-factor-changed", edit_manifest(lambda r: r.update(scale_factor=r["scale_factor"] * 1.01)),
          "weights hold .*, manifest recorded"),
        m("huge-padding", _text_edit(_huge_padding, "16 MiB of spaces after the manifest, resealed"),
          "more than a manifest can have"),
        m("huge-field", _huge_field, "more than a manifest can have"),
        m("nested-whole", _whole_manifest(nested(100_000)), "not valid JSON"),
        m("nested-in-field", _value_text("line", nested(100_000)), "not valid JSON"),
        m("nested-objects", _whole_manifest('{"a":' * 100_000 + "1" + "}" * 100_000), "not valid JSON"),
        m("duplicate-keys", _text_edit(_duplicate_key, "manifest with the key step twice"), "duplicate key"),
        m("extra-field", _set("comment", "hello"), r"unexpected \['comment'\]"),
        m("version-removed", _drop("version"), ""),
        m("version-string", _set("version", "2"), ""),
        m("format-removed", _drop("format"), "not a radiodiff_resume/checkpoint manifest"),
        m("format-other", _set("format", "someone/else"), "not a radiodiff_resume/checkpoint manifest"),
        m("checksum-removed", _text_edit(lambda d: re.sub(r'^ "checksum": .*\n', "", d, flags=re.M),
                                         "manifest without its checksum field"), "'checksum' must be str"),
        m("checksum-wrong", _text_edit(lambda d: re.sub(r'("checksum": ")[0-9a-f]{64}', r"\g<1>" + "ab" * 32,
                                                        d),
                                       "manifest with another checksum"), "checksum mismatch"),
        m("checksum-null", _text_edit(lambda d: re.sub(r'"checksum": "[0-9a-f]{64}"', '"checksum": null', d),
                                      "manifest with checksum null"),
          "checksum mismatch|'checksum' must be str"),
        m("line-int", _set("line", 5), "'line' must be str"),
        m("versions-not-strings", edit_manifest(lambda r: r["versions"].update(torch=2)),
          "must map names to strings"),
        m("not-an-object", _whole_manifest("[]"), "not a radiodiff_resume/checkpoint manifest"),
        m("null", _whole_manifest("null"), "not a radiodiff_resume/checkpoint manifest"),
        m("empty-object", _whole_manifest("{}"), "not a radiodiff_resume/checkpoint manifest"),
        m("flip-digit-to-e", _digit_to_e, "not valid JSON|checksum mismatch|not a finite positive"),
        m("utf8-bom", _manifest_bytes(b"\xef\xbb\xbf", "UTF-8 byte order mark before the manifest"),
          "not valid JSON"),
        m("invalid-utf8", _manifest_bytes(b"\xff\xfe", "invalid UTF-8 before the manifest"),
          "not valid JSON"),
    ]
    out += [m(f"field-removed-{k}", _drop(k), rf"missing \['{k}'\]") for k in REQUIRED_FIELDS]
    for component in ("model", "optimizer", "train_state", "data", "probe", "config.yaml"):
        out.append(m(f"missing-component-{component}", _remove_component(component),
                     rf"required file {re.escape(component)}(\.json)? not listed"))
    return out


# ----- component mutations (resealed) -------------------------------------------------------------------


def _poison(component: str, value: float, pick: tp.Callable[[dict[str, torch.Tensor]], str]) -> Apply:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        name = pick(tensors)
        tensors[name].view(-1)[tensors[name].numel() // 2] = value

    return edit_tensors(component, change)


def _first_float(prefix: str = "") -> tp.Callable[[dict[str, torch.Tensor]], str]:
    return lambda t: next(k for k in sorted(t) if k.startswith(prefix) and t[k].is_floating_point()
                          and t[k].numel() > 1)


def _garbage_safetensors(component: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        path = ckpt / f"{component}.safetensors"
        size = path.stat().st_size
        path.write_bytes(rng.randbytes(size))
        reseal(ckpt, path.name)
        return f"{path.name}: {size} random bytes, resealed"

    return apply


def _safetensors_huge_header(component: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        path = ckpt / f"{component}.safetensors"
        data = path.read_bytes()
        path.write_bytes(struct.pack("<Q", 2**63 - 1) + data[8:])
        reseal(ckpt, path.name)
        return f"{path.name}: header length 2**63-1, resealed"

    return apply


def _safetensors_bad_offsets(header: dict[str, tp.Any]) -> None:
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 10**9]


def _safetensors_shape_lies(header: dict[str, tp.Any]) -> None:
    name = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) >= 1)
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]


def _dangling(name: str, path: tp.Callable[[tp.Any], tuple[tp.Any, tp.Any]]) -> Apply:
    def change(tree: tp.Any) -> None:
        node, key = path(tree)
        node[key] = {"__tensor__": "no-such-tensor"}

    return edit_json(name, change)


def _first_key(tree: dict[str, tp.Any]) -> tuple[tp.Any, tp.Any]:
    return tree, sorted(tree)[0]


def _optimizer_split_groups(tree: dict[str, tp.Any]) -> None:
    group = tree["param_groups"][0]
    second = dict(group)
    second["params"] = group["params"][1:]
    group["params"] = group["params"][:1]
    tree["param_groups"].append(second)


def _optimizer_step_nan_float(tree: dict[str, tp.Any]) -> None:
    entries = tree["state"]["__map__"]
    entries[0][1]["step"] = {"__float__": "nan"}


def _rank_python_truncated(tree: dict[str, tp.Any]) -> None:
    tree["rng"]["python"]["internal"] = tree["rng"]["python"]["internal"][:100]


def _rank_numpy_truncated(tree: dict[str, tp.Any]) -> None:
    tree["rng"]["numpy"]["keys"] = tree["rng"]["numpy"]["keys"][:10]


def _truncate_tensor(component: str, name: str) -> Apply:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][: tensors[name].numel() // 2].clone()

    return edit_tensors(component, change)


def _drop_tensor(name: str) -> tp.Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    return change


def _scale_buffer_times(factor: float) -> tp.Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["scale_factor"] = t["scale_factor"] * factor

    return change


def _grad_scaler_listed(ckpt: Path, rng: random.Random) -> str:
    (ckpt / "grad_scaler.json").write_text(json.dumps({"scale": "big"}))
    reseal_new(ckpt, "grad_scaler.json")
    return "a malformed grad_scaler.json added and listed, resealed"


def reseal_new(ckpt: Path, name: str) -> None:
    raw = read_raw(ckpt)
    data = (ckpt / name).read_bytes()
    raw["files"][name] = {"sha256": sha256(data), "bytes": len(data)}
    write_sealed(ckpt, raw)


def _deep_value(name: str, key: str, depth: int) -> Apply:
    """Component ``name``'s field ``key`` (dotted) becomes a list nested ``depth`` deep."""

    def apply(ckpt: Path, rng: random.Random) -> str:
        tree = json.loads((ckpt / name).read_bytes())
        node = tree
        *path, last = key.split(".")
        for k in path:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = "@@NESTED@@"
        (ckpt / name).write_text(json.dumps(tree).replace('"@@NESTED@@"', nested(depth)))
        reseal(ckpt, name)
        return f"{name} {key} = a list nested {depth} deep, resealed"

    return apply


DANGLING = "referenced by the checkpoint is missing"
NONFINITE = "non-finite values"
GUARD = "guard: not a guard state"
COMPONENT_JSON = ("model.json", "optimizer.json", "train_state.json", "data.json", "probe.json", "ema.json",
                  "rank-00000.json")
SAFETENSORS = ("model", "optimizer", "ema", "probe", "rank-00000")


def component_mutations() -> list[Mutation]:
    def m(name: str, target: str, apply: Apply, expect: str = "") -> Mutation:
        return Mutation(name, target, apply, "component", expect)

    decode = "cannot be decoded"
    out = [m("nested-100000", n, write_text_resealed(n, nested(100_000)), decode) for n in COMPONENT_JSON]
    out += [m("not-json", n, write_text_resealed(n, b"\x00\xffnot json"), decode) for n in COMPONENT_JSON]
    out += [m("garbage", f"{c}.safetensors", _garbage_safetensors(c), decode) for c in SAFETENSORS]
    out += [m("header-length-huge", f"{c}.safetensors", _safetensors_huge_header(c), decode)
            for c in SAFETENSORS]
    out += [m("offsets-beyond-data", f"{c}.safetensors", edit_safetensors_header(c, _safetensors_bad_offsets),
              decode) for c in SAFETENSORS]
    out += [m("shape-lies", f"{c}.safetensors", edit_safetensors_header(c, _safetensors_shape_lies), decode)
            for c in SAFETENSORS]
    out += [m("tensor-file-removed", f"{c}.safetensors", _remove_listed(f"{c}.safetensors"),
              f"{decode}|referenced by the checkpoint is missing") for c in SAFETENSORS]
    out += [
        m("wrong-shape-list", "optimizer.json", write_text_resealed("optimizer.json", "[]"),
          "optimizer: not its state"),
        m("wrong-shape-list", "model.json", write_text_resealed("model.json", "[]"), "model: not a name"),
        m("wrong-shape-object", "ema.json", write_text_resealed("ema.json", "{}"), "ema: not an EMA state"),
        m("wrong-shape-object", "probe.json", write_text_resealed("probe.json", "{}"), "probe: not a name"),
        m("wrong-shape-null", "train_state.json", write_text_resealed("train_state.json", "null"),
          "train_state: needs int step"),
        m("wrong-shape-null", "rank-00000.json", write_text_resealed("rank-00000.json", "null"),
          "needs rng and noise_rng"),
        m("param-groups-null", "optimizer.json",
          edit_json("optimizer.json", lambda t: t.update(param_groups=None)),
          "malformed param_groups"),
        dataclasses.replace(
            m("param-groups-split", "optimizer.json", edit_json("optimizer.json", _optimizer_split_groups),
              "param groups of"), difference=True),
        m("betas-string", "optimizer.json", edit_json(
            "optimizer.json", lambda t: t["param_groups"][0].update(betas="0.9,0.999"))),
        m("state-string-keys", "optimizer.json", edit_json(
            "optimizer.json", lambda t: t.update(state={"a": {}})), "malformed state"),
        m("state-step-nan-float", "optimizer.json", edit_json("optimizer.json", _optimizer_step_nan_float)),
        m("step-string", "train_state.json", edit_json("train_state.json", lambda t: t.update(step="4")),
          "train_state: needs int step"),
        m("step-bool", "train_state.json", edit_json("train_state.json", lambda t: t.update(step=True)),
          "train_state: needs int step"),
        m("samples-seen-missing", "train_state.json",
          edit_json("train_state.json", lambda t: t.pop("samples_seen")),
          "train_state: needs int step, samples_seen"),
        m("step-disagrees", "train_state.json", edit_json("train_state.json", lambda t: t.update(step=3)),
          r"train_state\.step 3 ≠ manifest step 4"),
        m("offset-negative", "data.json", edit_json("data.json", lambda t: t.update(offset=-1)),
          "data: needs int epoch >= 0 and 0 <= offset"),
        m("offset-beyond-epoch", "data.json", edit_json("data.json", lambda t: t.update(offset=10**9))),
        m("epoch-string", "data.json", edit_json("data.json", lambda t: t.update(epoch="2")),
          "data: needs int epoch"),
        m("empty-object", "data.json", write_text_resealed("data.json", "{}"), "data: needs int epoch"),
        m("python-rng-truncated", "rank-00000.json", edit_json("rank-00000.json", _rank_python_truncated),
          "RNG state cannot be restored"),
        m("numpy-rng-truncated", "rank-00000.json", edit_json("rank-00000.json", _rank_numpy_truncated),
          "RNG state cannot be restored"),
        m("rng-missing", "rank-00000.json", edit_json("rank-00000.json", lambda t: t.pop("rng")),
          "needs rng and noise_rng"),
        m("torch-rng-truncated", "rank-00000.safetensors", _truncate_tensor("rank-00000", "rng/torch"),
          "RNG state cannot be restored"),
        m("noise-rng-truncated", "rank-00000.safetensors", _truncate_tensor("rank-00000", "noise_rng"),
          "RNG state cannot be restored"),
        m("dangling-tensor", "model.json", _dangling("model.json", _first_key), DANGLING),
        m("dangling-tensor", "ema.json", _dangling("ema.json", lambda t: (t["shadow_params"], 0)), DANGLING),
        m("dangling-tensor", "probe.json", _dangling("probe.json", _first_key), DANGLING),
        m("dangling-tensor", "optimizer.json",
          _dangling("optimizer.json", lambda t: (t["state"]["__map__"][0][1], "exp_avg")), DANGLING),
        m("nan", "model.safetensors", _poison("model", math.nan, _first_float("unet.")), "non-finite values"),
        m("inf", "model.safetensors", _poison("model", math.inf, _first_float("cond_encoder.")), NONFINITE),
        m("nan", "optimizer.safetensors", _poison("optimizer", math.nan, _first_float("state/")),
          "non-finite values"),
        m("inf", "optimizer.safetensors", _poison("optimizer", -math.inf, lambda t: "state/3/exp_avg_sq"),
          "non-finite values"),
        m("nan-step", "optimizer.safetensors", edit_tensors(
            "optimizer", lambda t: t["state/0/step"].fill_(math.nan)), "non-finite values"),
        m("nan", "ema.safetensors", _poison("ema", math.nan, _first_float("shadow_params/")), NONFINITE),
        m("inf", "probe.safetensors", _poison("probe", math.inf, lambda t: "cond"), "non-finite values"),
        m("scale-factor-buffer-removed", "model.safetensors", _remove_model_tensor("scale_factor"),
          "no scale_factor buffer"),
        m("scale-factor-buffer-changed", "model.safetensors", edit_tensors("model", _scale_buffer_times(1.5)),
          "weights hold .*, manifest recorded"),
        m("decay-out-of-range", "ema.json", edit_json("ema.json", lambda t: t.update(decay=1.5))),
        m("decay-nan", "ema.json", edit_json("ema.json", lambda t: t.update(decay={"__float__": "nan"}))),
        m("shadow-params-not-list", "ema.json", edit_json("ema.json", lambda t: t.update(shadow_params={})),
          "ema: not an EMA state"),
        m("use-ema-warmup-int", "ema.json", edit_json("ema.json", lambda t: t.update(use_ema_warmup=0)),
          "ema: not an EMA state"),
        m("malformed-listed", "grad_scaler.json", _grad_scaler_listed, "grad_scaler: not a GradScaler state"),
        m("wrong-shape-list", "guard.json", write_text_resealed("guard.json", "[]"), GUARD),
        m("counts-negative", "guard.json", edit_json(
            "guard.json", lambda t: t["counts"].update(steps_skipped=-1)), GUARD),
        m("lr-scale-zero", "guard.json", edit_json("guard.json", lambda t: t.update(lr_scale=0.0)), GUARD),
        m("window-count-short", "guard.json", edit_json(
            "guard.json", lambda t: t["losses"].update(count=0)), GUARD),
        m("nan", "guard.safetensors", _poison("guard", math.nan, lambda t: "losses/losses"), NONFINITE),
        m("inf", "guard.safetensors", _poison("guard", math.inf, lambda t: "clip/var"), NONFINITE),
        m("garbage", "config.yaml", write_text_resealed("config.yaml", b"\x00\xff{{{ not yaml")),
        m("nested", "config.yaml", write_text_resealed("config.yaml", nested(100_000))),
        m("nested-in-required-value", "train_state.json",
          _deep_value("train_state.json", "step", 100_000), decode),
    ]
    return out


def _remove_listed(name: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        unlist(ckpt, name)
        return f"{name} removed from disk and listing, resealed"

    return apply


def _remove_model_tensor(name: str) -> Apply:
    def apply(ckpt: Path, rng: random.Random) -> str:
        edit_tensors("model", _drop_tensor(name))(ckpt, rng)
        tree = json.loads((ckpt / "model.json").read_bytes())
        del tree[name]
        (ckpt / "model.json").write_text(json.dumps(tree))
        reseal(ckpt, "model.json")
        return f"model: {name} removed from model.json and model.safetensors, resealed"

    return apply


def all_mutations(golden_results: Path) -> list[Mutation]:
    """The full deterministic set: every generic mutation on every file, then the specific ones."""
    newest = golden_results / "checkpoints" / NEWEST
    older = golden_results / "checkpoints" / OLDER
    files = sorted(p.name for p in newest.iterdir())
    out = [_generic(name, f) for f in files for name in GENERIC if (f, name) not in NOT_A_CHANGE]
    out += [_stale(f, older) for f in files
            if (older / f).is_file() and (older / f).read_bytes() != (newest / f).read_bytes()]
    return out + manifest_mutations() + component_mutations()


# ----- nesting at the recursion limit --------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeFamily:
    """Nesting ``depth`` deep in one value; the runner finds the depth where parsing starts to fail
    (it depends on the caller's stack) and tries the depths around it, where one parser may succeed
    and a later recursive step (checksum, deepcopy) fail."""

    name: str
    target: str
    make: tp.Callable[[int], Apply]
    tolerated: bool = False
    """The nested value sits in an unknown key, which the format tolerates in a component (torch and
    diffusers add keys across versions): verifying ok is then right, only a crash is wrong."""


def _manifest_nested_created(depth: int) -> Apply:
    return _value_text("created", nested(depth))


EDGE_FAMILIES = (
    EdgeFamily("nested-edge-created", MANIFEST, _manifest_nested_created),
    EdgeFamily("nested-edge-betas", "optimizer.json",
               lambda d: _deep_value("optimizer.json", "param_groups.0.betas", d)),
    EdgeFamily("nested-edge-extra-key", "ema.json", lambda d: _deep_value("ema.json", "extra", d), True),
    EdgeFamily("nested-edge-step", "train_state.json", lambda d: _deep_value("train_state.json", "step", d)),
    EdgeFamily("nested-edge-offset", "data.json", lambda d: _deep_value("data.json", "offset", d)),
)


# ----- running trials -----------------------------------------------------------------------------------


@contextlib.contextmanager
def watchdog(seconds: float) -> tp.Iterator[None]:
    """Raise :class:`Hung` in the main thread after ``seconds`` (a blocking open() of a FIFO is
    interrupted too). Off the main thread there is no watchdog."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum: int, frame: tp.Any) -> None:
        raise Hung(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tree_snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (not following symlinks): kind plus content hash / link target."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            info = path.lstat()
            if path.is_symlink():
                out[rel] = "symlink " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                out[rel] = "file " + sha256(path.read_bytes())
            else:
                out[rel] = f"special {info.st_mode:o}"
    return out


class Bench:
    """A trainer built from a finished run's ``config.yaml`` (results in a scratch folder), to verify with."""

    def __init__(self, golden_results: Path, work: Path) -> None:
        self.golden = golden_results
        self.work = work
        self.trainer: LatentDiffusionTrainer | None = None

    def build(self, results: Path) -> LatentDiffusionTrainer:
        cfg = load_config(self.golden / "config.yaml", [f"trainer.results_folder={results}"])
        return build_ldm_trainer(cfg, Accelerator())

    def verifier(self) -> LatentDiffusionTrainer:
        if self.trainer is None:
            self.trainer = self.build(self.work / "verifier-run")
        return self.trainer

    def verify(self, ckpt: Path, timeout: float = TRIAL_TIMEOUT) -> tuple[Report | None, str]:
        """``(report, '')`` or ``(None, what escaped)``; after an escape the trainer is rebuilt."""
        trainer = self.verifier()
        try:
            with watchdog(timeout):
                return trainer.checkpointer.verify_and_load(ckpt), ""
        except (Exception, Hung) as exc:  # the oracle: anything escaping is a crash, recorded not raised
            self.trainer = None
            return None, f"{type(exc).__name__}: {str(exc)[:300]}"

    def fresh_copy(self, tag: str) -> Path:
        """A fresh copy of the newest golden checkpoint at ``<work>/<tag>/d1/d2/step-00000004``
        (so ``../../x`` from it stays inside the trial's folder)."""
        trial = self.work / tag
        shutil.rmtree(trial, ignore_errors=True)
        ckpt = trial / "d1" / "d2" / NEWEST
        shutil.copytree(self.golden / "checkpoints" / NEWEST, ckpt)
        return ckpt


def verdict_of(report: Report | None, escaped: str, difference: bool = False) -> tuple[str, str]:
    if report is None:
        return CRASHED, escaped
    if report.ok:
        return MISSED, "verified ok"
    failure = tp.cast(tp.Any, report.failure)
    if difference and not report.damaged:
        return DETECTED, f"{failure.name} (a difference, not damage): {failure.detail[:300]}"
    if not report.damaged:
        return MISSED, f"{failure.name} failed but not as damage: {failure.detail[:300]}"
    return DETECTED, f"{failure.name}: {failure.detail[:300]}"


def verify_trial(bench: Bench, mutation: Mutation, rng: random.Random, tag: str) -> Outcome:
    start = time.perf_counter()
    ckpt = bench.fresh_copy(tag)
    try:
        description = mutation.apply(ckpt, rng)
        report, escaped = bench.verify(ckpt, mutation.timeout)
        verdict, detail = verdict_of(report, escaped, mutation.difference)
    finally:
        shutil.rmtree(bench.work / tag, ignore_errors=True)
    return Outcome("verify", mutation.id, description, verdict, detail, time.perf_counter() - start)


def control_trial(bench: Bench, tag: str, which: str = NEWEST) -> Outcome:
    start = time.perf_counter()
    ckpt = bench.fresh_copy(tag)
    if which != NEWEST:
        shutil.rmtree(ckpt)
        ckpt = ckpt.with_name(which)
        shutil.copytree(bench.golden / "checkpoints" / which, ckpt)
    try:
        report, escaped = bench.verify(ckpt)
    finally:
        shutil.rmtree(bench.work / tag, ignore_errors=True)
    if report is None:
        verdict, detail = "crashed", escaped
    elif report.ok:
        verdict, detail = "ok", report.summary()
    else:
        verdict, detail = "false alarm", report.describe()
    return Outcome("control", f"untouched {which}", "no change", verdict, detail, time.perf_counter() - start)


def discovery_trial(bench: Bench, mutation: Mutation | None, rng: random.Random, tag: str) -> Outcome:
    """The mutated copy as the newest ``step-*`` of a run with a good older one; ``resume()`` must
    quarantine it unchanged (reason beside it) and resume step 2. ``mutation=None``: a control,
    which must resume step 4 and move nothing."""
    start = time.perf_counter()
    results = bench.work / tag / "run"
    shutil.rmtree(bench.work / tag, ignore_errors=True)
    ckdir = results / "checkpoints"
    ckdir.mkdir(parents=True)
    shutil.copytree(bench.golden / "checkpoints" / OLDER, ckdir / OLDER)
    newest = ckdir / NEWEST
    shutil.copytree(bench.golden / "checkpoints" / NEWEST, newest)
    description = "no change" if mutation is None else mutation.apply(newest, rng)
    name = "untouched (discovery)" if mutation is None else mutation.id
    kind = "control" if mutation is None else "discovery"
    before = tree_snapshot(newest)
    older = tree_snapshot(ckdir / OLDER)
    try:
        trainer = bench.build(results)
        try:
            with watchdog(TRIAL_TIMEOUT if mutation is None else mutation.timeout):
                chosen = trainer.checkpointer.resume()
        except UserError as exc:  # a clean stop (one message, exit 2), but no quarantine and no fallback
            if mutation is not None and mutation.difference and "nothing was moved" in str(exc) \
                    and tree_snapshot(newest) == before:
                return Outcome(kind, name, description, DETECTED, f"stopped, nothing moved: {str(exc)[:200]}",
                               time.perf_counter() - start)
            return Outcome(kind, name, description, MISSED if mutation else "false alarm",
                           f"resume() stopped with {type(exc).__name__} (nothing quarantined): "
                           f"{str(exc)[:300]}",
                           time.perf_counter() - start)
        except (Exception, Hung) as exc:  # the oracle: anything else escaping is a crash
            return Outcome(kind, name, description, CRASHED, f"resume() raised {type(exc).__name__}: "
                           f"{str(exc)[:300]}", time.perf_counter() - start)
        problems = _discovery_problems(ckdir, chosen, trainer.state.step, before, older, mutation is None)
    finally:
        shutil.rmtree(bench.work / tag, ignore_errors=True)
    if mutation is None:
        verdict, fine = ("ok" if not problems else "false alarm"), "resumed step 4, nothing moved"
    else:
        verdict, fine = (DETECTED if not problems else MISSED), "quarantined unchanged, resumed step 2"
    return Outcome(kind, name, description, verdict, "; ".join(problems) or fine, time.perf_counter() - start)


def _discovery_problems(ckdir: Path, chosen: Path | None, step: int, before: dict[str, str],
                        older: dict[str, str], control: bool) -> list[str]:
    problems = []
    quarantine = ckdir / "quarantine"
    moved = sorted(p for p in quarantine.iterdir() if not p.name.endswith(REASON_SUFFIX)) \
        if quarantine.is_dir() else []
    if control:
        if chosen != ckdir / NEWEST or step != 4:
            problems.append(f"resumed {chosen} at step {step}, expected {NEWEST} at step 4")
        if moved:
            problems.append(f"quarantined {[p.name for p in moved]}")
        return problems
    if chosen != ckdir / OLDER or step != 2:
        problems.append(f"resumed {chosen} at step {step}, expected {OLDER} at step 2")
    if (ckdir / NEWEST).exists() or (ckdir / NEWEST).is_symlink():
        problems.append(f"{NEWEST} is still in place")
    if len(moved) != 1 or not moved[0].name.startswith(NEWEST + "-"):
        problems.append(f"quarantine holds {[p.name for p in moved]}, expected one {NEWEST}-<time>")
        return problems
    if tree_snapshot(moved[0]) != before:
        problems.append("the quarantined folder differs from the damaged one (it must move unchanged)")
    reason = moved[0].with_name(moved[0].name + REASON_SUFFIX)
    if not reason.is_file() or "FAILED" not in reason.read_text():
        problems.append(f"no reason file {reason.name} naming the failed level")
    if tree_snapshot(ckdir / OLDER) != older:
        problems.append(f"{OLDER} was changed")
    return problems


def _deeper(frames: int, fn: tp.Callable[[], Outcome]) -> Outcome:
    """``fn()`` called ``frames`` Python frames deeper (the recursion limit counts them)."""
    return fn() if frames <= 0 else _deeper(frames - 1, fn)


def edge_trials(bench: Bench, family: EdgeFamily, frames: int = 0, lo: int = 100, hi: int = 1200,
                width: int = 3) -> list[Outcome]:
    """Find the smallest depth whose verification reports a RecursionError or escapes (binary search,
    the result is monotone in depth), then try every depth within ``width`` of it. A crash seen
    while searching is an outcome too. Where exactly two recursive steps part ways depends on the
    caller's stack, so run this with ``frames`` 0 and 1 (both parities of a two-frames-per-level
    recursion)."""
    seen: dict[int, Outcome] = {}

    def at(depth: int) -> Outcome:
        if depth not in seen:
            mutation = Mutation(f"{family.name}-{depth}+{frames}", family.target, family.make(depth), "edge")
            outcome = _deeper(frames, lambda: verify_trial(bench, mutation, random.Random(depth),
                                                           f"edge-{family.name}-{depth}"))
            outcome.kind = "edge"
            if family.tolerated and outcome.detail == "verified ok":
                outcome.verdict = ACCEPTED
            seen[depth] = outcome
        return seen[depth]

    def past_limit(depth: int) -> bool:
        o = at(depth)
        return o.verdict == CRASHED or "RecursionError" in o.detail

    while lo < hi:
        mid = (lo + hi) // 2
        if past_limit(mid):
            hi = mid
        else:
            lo = mid + 1
    for depth in range(max(1, lo - width), lo + width + 1):
        at(depth)
    window = {d: o for d, o in seen.items() if abs(d - lo) <= width or o.verdict == CRASHED}
    return [window[d] for d in sorted(window)]


def select(mutations: list[Mutation], trials: int | None, seed: int) -> list[tuple[Mutation, str]]:
    """``(mutation, trial seed)``: every mutation once (``trials=None``), or a seeded sample."""
    if trials is None:
        return [(m, f"{seed}/{m.id}") for m in mutations]
    rng = random.Random(seed)
    picked = rng.sample(mutations, min(trials, len(mutations)))
    picked += [rng.choice(mutations) for _ in range(trials - len(picked))]
    return [(m, f"{seed}/{m.id}/{i}") for i, m in enumerate(picked)]


def run_trials(
    golden_results: Path,
    trials: int | None = None,
    seed: int = 0,
    *,
    controls: int = 3,
    discovery: int | None = None,
    edges: bool | None = None,
    workdir: Path | None = None,
    log: tp.Callable[[Outcome], None] | None = None,
) -> Summary:
    """Run corruption trials against copies of ``golden_results/checkpoints/step-00000004``.

    ``golden_results``: the results folder of a finished run with committed checkpoints at steps 2 and
    4 and its ``config.yaml`` (the trainer that verifies is built from it, with its results in a
    scratch folder; the golden folder is only read).
    ``trials``: ``None`` runs every mutation once (every file × every generic mutation, then every
    manifest and component mutation); an int runs a sample of that size drawn with ``seed``.
    ``controls``: untouched copies verified (each failure is a false alarm), plus one of step 2 and one
    untouched discovery run.
    ``discovery``: how many mutations also run end to end through ``resume()`` (``None``: every
    non-generic mutation and each generic one once for the full set, 3 for a sample).
    ``edges``: run the recursion-limit families (default: only for the full set).
    ``log``: called with each outcome as it is known (progress output for scripts).
    """
    start = time.perf_counter()
    summary = Summary()
    own_work = workdir is None
    work = Path(tempfile.mkdtemp(prefix="torture-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(Path(golden_results), work)

    def record(outcome: Outcome) -> None:
        summary.add(outcome)
        if log is not None:
            log(outcome)

    try:
        mutations = all_mutations(bench.golden)
        chosen = select(mutations, trials, seed)
        for i in range(controls):
            record(control_trial(bench, f"control-{i}"))
        record(control_trial(bench, "control-older", OLDER))
        for i, (mutation, trial_seed) in enumerate(chosen):
            record(verify_trial(bench, mutation, random.Random(trial_seed), f"t{i}"))
        record(discovery_trial(bench, None, random.Random(seed), "discovery-control"))
        for i, (mutation, trial_seed) in enumerate(_discovery_set(chosen, trials, discovery, seed)):
            record(discovery_trial(bench, mutation, random.Random(trial_seed), f"d{i}"))
        if edges if edges is not None else trials is None:
            for family in EDGE_FAMILIES:
                for frames in (0, 1):
                    for outcome in edge_trials(bench, family, frames):
                        record(outcome)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    return summary


def _discovery_set(chosen: list[tuple[Mutation, str]], trials: int | None, discovery: int | None,
                   seed: int) -> list[tuple[Mutation, str]]:
    if discovery is None and trials is None:
        kinds: dict[str, tuple[Mutation, str]] = {}
        rng = random.Random(seed)
        for mutation, trial_seed in rng.sample(chosen, len(chosen)):
            key = mutation.name if mutation.group == "file" else mutation.id
            kinds.setdefault(key, (mutation, trial_seed))
        return sorted(kinds.values(), key=lambda mt: mt[0].id)
    rng = random.Random(f"{seed}/discovery")
    return rng.sample(chosen, min(3 if discovery is None else discovery, len(chosen)))
