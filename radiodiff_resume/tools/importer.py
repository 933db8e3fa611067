"""``radiodiff-resume import SRC --cfg CFG [--out OUT]``: another trainer's state → what our run uses: one
of our verified checkpoints, so that ``radiodiff-resume train`` continues it, or our first stage's weights.

What SRC is decides how it is read and what ``--out`` names (:data:`SOURCE_KINDS`): an accelerate
``save_state`` folder, converted here into a checkpoint of the run (``--out``: its results folder), or a
RadioDiff ``model-N.pt``: a whole LDM run when CFG builds RadioDiff's network
(:mod:`radiodiff_resume.compat.radiodiff_ldm`; ``--out``: the results folder), else its first stage, which
becomes our first stage's weights (:mod:`radiodiff_resume.compat.radiodiff_ckpt`; ``--out``: that
``.safetensors`` file).
A source is first read into plain tensors and numbers — safetensors as they are, every ``.bin`` /
``.pt`` / ``.pkl`` through torch's weights-only unpickler (on torch >= 2.10, :func:`unpickler_refusal`), so
a file that would run code is refused before any of it runs — then the run is built exactly as ``train``
builds it from CFG, the source is matched onto it tensor by tensor (names, shapes and dtypes exactly), and
the result is committed through the run's own
:class:`~radiodiff_resume.checkpoint.checkpointer.Checkpointer` with its provenance in the manifest.
Torch is imported only when a command runs, so the CLI stays cheap to start.
"""

from __future__ import annotations

import argparse
import json
import pickletools
import re
import shlex
import typing as tp
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    import torch
    from torch import nn

    from radiodiff_resume.config import Config
    from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer

Tensors = dict[str, "torch.Tensor"]

ADAM_SLOTS = frozenset({"step", "exp_avg", "exp_avg_sq"})
MODEL_FILE = re.compile(r"^(?:model|pytorch_model)(?:_(\d+))?\.(safetensors|bin)$")
RNG_FILE = re.compile(r"^random_states_(\d+)\.pkl$")
PRETRAINED_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                      "diffusion_pytorch_model.bin", "pytorch_model.bin")
"""Weight files of a ``save_pretrained`` folder (diffusers' save hooks write ``unet/``, ``unet_ema/``)."""
TORCH_FILES = frozenset({".pt", ".pth", ".ckpt"})
"""Suffixes of a single ``torch.save`` file, as RadioDiff writes its checkpoints."""
SHARDED = re.compile(r"^(pytorch_model_fsdp.*|optimizer_\d+|pytorch_model|latest|zero_to_fp32\.py)$")
"""FSDP / DeepSpeed save_state entries: per-rank shards that have to be consolidated first."""


# ----- the command -------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``import`` to the ``radiodiff-resume`` sub-commands."""
    cmd = sub.add_parser(
        "import", help="convert another trainer's saved state: an accelerate save_state folder or a "
                       "RadioDiff LDM model-N.pt into a verified checkpoint that `train` resumes from, a "
                       "RadioDiff first stage into our first stage's weights",
        usage="radiodiff-resume import SRC --cfg CFG [--out DIR [--step-from-name] | --out FILE.safetensors "
              "[--force]] [key=value ...]",
        description="Convert SRC for the run CFG describes, with a report of where every tensor came from. "
                    "An accelerate save_state folder becomes one verified checkpoint, exact in weights, "
                    "optimizer state, step and EMA (not in random streams or data position). A RadioDiff "
                    "LDM model-N.pt (train_cond_ldm.py), with a config that builds RadioDiff's network, "
                    "becomes one too, exact in weights, Adam moments, step and EMA; its first stage is "
                    "written to model.first_stage.ckpt_path when that file is not there yet, and what our "
                    "checkpoint does not hold is kept beside it for `radiodiff-resume export`. Otherwise a "
                    "RadioDiff checkpoint (train_vae.py or train_cond_ldm.py) gives its first stage, as the "
                    "weights file model.first_stage.ckpt_path names.",
    )
    cmd.add_argument("src", metavar="SRC",
                     help="what to import: a folder written by accelerate's Accelerator.save_state "
                          "(model.safetensors or pytorch_model.bin, optimizer.bin, scheduler.bin, "
                          "random_states_*.pkl; EMA folders such as unet_ema/), or a RadioDiff checkpoint "
                          "file (.pt, .pth or .ckpt)")
    cmd.add_argument("--cfg", required=True,
                     help="YAML config of the run that will use it (as for `train`), e.g. "
                          "configs/radio_tiny.yaml; for a save_state folder its first-stage weights must "
                          "exist")
    cmd.add_argument("--out", metavar="OUT",
                     help="for a save_state folder or a RadioDiff LDM run: the results folder to write "
                          "<OUT>/checkpoints/step-N into (default: the config's trainer.results_folder), "
                          "which must hold no checkpoint yet; for a RadioDiff first stage (or any RadioDiff "
                          "file, when OUT ends in .safetensors): the file to write the first stage to "
                          "(default: the config's model.first_stage.ckpt_path)")
    cmd.add_argument("--force", action="store_true",
                     help="RadioDiff first-stage import only: replace an existing first-stage file at OUT")
    cmd.add_argument("--step-from-name", action="store_true",
                     help="RadioDiff {'model'}-only file (saved with enable_resume: False, which records no "
                          "step): continue at step = the milestone in its name (model-<milestone>.pt) x "
                          "trainer.save_and_sample_every, with empty Adam moments and the EMA restarting "
                          "from the weights; without it the weights start a fine-tune at step 0, as "
                          "RadioDiff's finetune.ckpt_path does")
    overrides = cmd.add_argument("overrides", nargs="+", default=[], metavar="key=value",
                                 help="config overrides, as for `train`, e.g. trainer.lr=1e-4")
    # '+' and not required: with '*', argparse would consume the (empty) overrides together with SRC
    # and then reject overrides written after --cfg, as in `import SRC --cfg CFG key=value`.
    overrides.required = False
    cmd.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> None:
    src = Path(args.src).expanduser()
    kind = source_kind(src)
    print("\n".join(kind.command(src, args)), flush=True)


@dataclass(frozen=True)
class SourceKind:
    """One kind of thing ``import`` reads: how to recognise it and how to convert it."""

    what: str
    detects: tp.Callable[[Path], bool]
    command: tp.Callable[[Path, argparse.Namespace], list[str]]
    """Converts SRC as the parsed command asks (``--out`` means what this kind writes); returns the
    report's lines, the command to run next last."""
    looks_like: str
    """What such a source holds, for the message when SRC is none of the kinds."""


def source_kind(src: Path) -> SourceKind:
    if not src.exists():
        raise UserError(f"import: {src} does not exist (SRC is what to import: "
                        f"{' or '.join(k.what for k in SOURCE_KINDS)})")
    for kind in SOURCE_KINDS:
        if kind.detects(src):
            return kind
    raise UserError(f"import: {src} is not {' or '.join(k.what for k in SOURCE_KINDS)} "
                    f"({'; '.join(k.looks_like for k in SOURCE_KINDS)})")


# ----- reading a source: data only, nothing of it executed -------------------------------------------


@dataclass
class Weights:
    """The tensors of one source file, under the names the source wrote."""

    name: str
    tensors: Tensors


@dataclass
class Source:
    """A source read into plain tensors and numbers."""

    path: Path
    what: str
    models: list[Weights]
    """In the order the source prepared them (its optimizer lists their parameters in that order)."""
    optimizer: dict[str, tp.Any] | None
    """None: weights only (RadioDiff's ``{'model'}`` file); AdamW starts with empty moments."""
    optimizer_name: str
    scheduler: dict[str, tp.Any] | None = None
    scheduler_name: str = ""
    ema: Weights | None = None
    ema_config: dict[str, tp.Any] = field(default_factory=dict)
    scaler: dict[str, tp.Any] | None = None
    processes: int = 1
    step: int | None = None
    """The source's own training step when it records one (RadioDiff's ``step``; with fp16 it can exceed
    the optimizer's, which skips overflowing steps), or the step chosen for a weights-only source."""
    described: list[str] = field(default_factory=list)
    """Report lines on what the source holds and how it maps, right after the header."""
    notes: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


SAFE_UNPICKLER_TORCH = "2.10"
"""The first torch whose weights-only unpickler has no known way to run a file's code: before 2.6 it had
CVE-2025-32434, before 2.10 CVE-2026-24747."""
CALLING_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4"})
"""The only pickle opcodes that fetch a callable (a global or a ``copyreg`` extension): a pickle without
them can build nothing but plain containers and numbers."""
STRING_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                            "BINSTRING", "STRING"})
NOT_PUSHING = frozenset({"PROTO", "FRAME", "STOP", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def unpickler_refusal(torch_version: str) -> str | None:
    """Why this torch must not read another trainer's pickles, or None. Only ``import`` reads them, so a
    cluster that keeps an older torch still trains; it just imports on a machine with a newer one."""
    from packaging.version import Version

    if Version(torch_version) >= Version(SAFE_UNPICKLER_TORCH):
        return None
    return (f"reading it needs torch >= {SAFE_UNPICKLER_TORCH}, this is torch {torch_version}, whose "
            "weights-only unpickler has known ways to run a file's code (CVE-2025-32434 before 2.6, "
            "CVE-2026-24747 before 2.10): upgrade torch, or import on a machine that has it")


def load_pickled(path: Path, allowed: tp.Sequence[tp.Any] = (), mmap: bool = False) -> tp.Any:
    """``torch.load(weights_only=True)``: only tensors, plain containers and the ``allowed`` rebuilders
    can come out of the file; any other global (``os.system``, a class's ``__reduce__``) is refused before
    anything is called. A file torch cannot read this way is described by what a scan of its opcodes
    shows: code it would call, a plain pickle, or no pickle at all. ``mmap``: tensors are mapped from the
    file (copy-on-write) instead of read into memory, for multi-GiB files."""
    import zipfile

    import torch

    refusal = unpickler_refusal(torch.__version__)
    if refusal is not None:
        raise UserError(f"import: {path}: {refusal}")
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # refused below if it matters
            # torch maps only its zip format; anything else is read (and described if refused) as before
            mapped = mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except Exception as exc:  # torch's reader raises whatever its opcode handlers hit on a file it cannot
        # read (IndexError, struct.error, RecursionError, ...): each is about the file, not a bug here
        raise UserError(unreadable(path, exc, allowed)) from None


def unreadable(path: Path, exc: Exception, allowed: tp.Sequence[tp.Any]) -> str:
    """The one-line reason ``torch.load`` failed on ``path``: code it would run only if it names some."""
    if isinstance(exc, OSError):
        return f"import: {path} cannot be read ({exc.strerror or exc})"
    text = str(exc)
    named = re.search(r"GLOBAL ([\w.]+)", text)
    calls = [named.group(1)] if named else unsafe_globals(path, allowed)
    if calls:
        more = f" and {len(calls) - 1} more" if len(calls) > 1 else ""
        return (f"import: refusing {path}: reading it needs full unpickling, which runs whatever code the "
                f"file carries (it calls {calls[0]}{more}); only plain tensors and containers are read")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    why = detail.group(1) if detail else (text.splitlines() or [""])[0].split(". ")[0]
    opcode = re.fullmatch(r"[Uu]nsupported operand (\d+)", why.strip())
    if opcode:
        name = OPCODE_NAMES.get(int(opcode.group(1)), "")
        why = f"pickle opcode {opcode.group(1)}{f' ({name})' if name else ''}, which it does not read"
    else:
        why = f"{type(exc).__name__}{': ' + why if why else ''}"
    if calls is None:
        return (f"import: {path} is not a readable torch file (damaged, truncated or not written by "
                f"torch.save? {why})")
    return (f"import: {path} holds pickled data that would run no code, but torch's weights-only reader does "
            f"not take it ({why}); only files written by torch.save (with its default pickle protocol) are "
            "read")


def unsafe_globals(path: Path, allowed: tp.Sequence[tp.Any]) -> list[str] | None:
    """The globals ``path``'s pickles name that neither torch nor ``allowed`` marks safe, found by reading
    its opcodes (nothing is executed); None when it holds no pickle at all. A ``torch.save`` archive's
    pickles are its ``*.pkl`` members; any other file is read as pickles one after another."""
    import zipfile

    from torch import _weights_only_unpickler  # torch's own allow-list, the one torch.load applies

    safe = set(_weights_only_unpickler._get_allowed_globals())
    safe |= {f"{obj.__module__}.{obj.__qualname__}" for obj in allowed}
    found: list[str] = []
    parsed = 0
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in (n for n in archive.namelist() if n.endswith(".pkl")):
                    with archive.open(member) as stream:
                        found += pickle_globals(stream)
                        parsed += 1
        else:
            with open(path, "rb") as stream:
                while stream.peek(1):
                    found += pickle_globals(stream)
                    parsed += 1
    except (ValueError, EOFError, zipfile.BadZipFile, OSError):
        pass  # the pickles read so far are what the file holds; the rest is raw data or damage
    if not parsed:
        return None
    return [name for name in dict.fromkeys(found) if name not in safe]


def pickle_globals(stream: tp.BinaryIO) -> list[str]:
    """The globals one pickle names (``module.name``), from its opcodes alone; ``STACK_GLOBAL`` takes the
    two strings pushed (or fetched from the memo) just before it."""
    names: list[str] = []
    memo: dict[int, tp.Any] = {}
    pushed: list[tp.Any] = [None, None]
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            module, name = pushed[-2:]
            names.append(f"{module}.{name}" if isinstance(module, str) and isinstance(name, str)
                         else "a global named at run time")
        elif op.name in CALLING_OPCODES:
            names.append(f"copyreg extension {arg}")
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1]
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        if op.name not in NOT_PUSHING:
            value = memo.get(arg) if op.name in ("GET", "BINGET", "LONG_BINGET") else (
                arg if op.name in STRING_OPCODES else None)
            pushed = [pushed[-1], value]
    return names


def load_tensors(path: Path) -> Tensors:
    """A weights file as a flat name → tensor dict (safetensors, or a weights-only ``.bin``)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"import: {path} cannot be read: {exc}") from None
    state = load_pickled(path)
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in state.items())):
        raise UserError(f"import: {path} is not a model state dict (name → tensor)")
    return state


def pretrained_weights(folder: Path) -> Tensors | None:
    """The weights of a ``save_pretrained`` folder (one file or safetensors shards), None if it has none."""
    for name in PRETRAINED_WEIGHTS:
        if (folder / name).is_file():
            return load_tensors(folder / name)
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        tensors: Tensors = {}
        for shard in shards:
            tensors.update(load_tensors(folder / Path(shard).name))
        return tensors
    return None


def read_json(path: Path) -> dict[str, tp.Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"import: {path} cannot be read: {exc}") from None
    except RecursionError:
        raise UserError(f"import: {path} is nested too deeply to be a config (JSON nested beyond Python's "
                        "recursion limit)") from None
    if not isinstance(data, dict):
        raise UserError(f"import: {path} does not hold a JSON object")
    return data


def rng_allow_list() -> list[tp.Any]:
    """What accelerate's RNG files need besides tensors: numpy's array and dtype rebuilders (the same
    allow-list accelerate's own ``load_state`` uses); none of them can run code."""
    import codecs

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def is_accelerate_folder(path: Path) -> bool:
    return path.is_dir() and any(
        p.name == "optimizer.bin" or RNG_FILE.match(p.name) or MODEL_FILE.match(p.name)
        for p in path.iterdir())


def read_accelerate_folder(folder: Path) -> Source:
    """Every file accelerate's ``save_state`` writes (``accelerate/checkpointing.py``), plus the folders
    diffusers' training examples write with ``save_pretrained`` from their save hooks."""
    entries = sorted(folder.iterdir())
    sharded = [p.name for p in entries if SHARDED.match(p.name)]
    if sharded:
        raise UserError(f"import: {folder} holds a sharded FSDP / DeepSpeed state ({', '.join(sharded)}); "
                        "consolidate it into model.safetensors first (`accelerate merge-weights` for FSDP, "
                        "zero_to_fp32.py for DeepSpeed)")
    optimizers = [p.name for p in entries if re.match(r"^optimizer(_\d+)?\.bin$", p.name)]
    if "optimizer.bin" not in optimizers:
        raise UserError(f"import: {folder} has no optimizer.bin: without the optimizer state this is not a "
                        "training state to continue (start a fresh run from these weights instead)")
    if len(optimizers) > 1:
        raise UserError(f"import: {folder} holds {len(optimizers)} optimizers ({', '.join(optimizers)}); "
                        "this run trains with one AdamW")
    used: set[str] = set()
    models: dict[int, Path] = {}
    for p in entries:
        match = MODEL_FILE.match(p.name)
        if match and p.is_file():
            index = int(match.group(1) or 0)
            if index not in models or p.suffix == ".safetensors":  # accelerate prefers safetensors too
                models[index] = p
    source = Source(folder, f"accelerate save_state folder {folder.resolve()}",
                    [Weights(models[i].name, load_tensors(models[i])) for i in sorted(models)],
                    load_pickled(folder / "optimizer.bin"), "optimizer.bin")
    used |= {p.name for p in models.values()} | {"optimizer.bin"}
    for sub in (p for p in entries if p.is_dir()):
        tensors = pretrained_weights(sub)
        if tensors is None:
            continue
        used.add(sub.name)
        if "ema" not in sub.name.lower():
            source.models.append(Weights(f"{sub.name}/", tensors))
        elif source.ema is not None:
            raise UserError(f"import: {folder} holds two EMA folders ({source.ema.name}, {sub.name}/)")
        else:
            source.ema = Weights(f"{sub.name}/", tensors)
            source.ema_config = read_json(sub / "config.json") if (sub / "config.json").is_file() else {}
    if not source.models:
        raise UserError(f"import: {folder} holds no model weights (model.safetensors, pytorch_model.bin or a "
                        "save_pretrained folder such as unet/)")
    if (folder / "scheduler.bin").is_file():
        source.scheduler, source.scheduler_name = load_pickled(folder / "scheduler.bin"), "scheduler.bin"
        used.add("scheduler.bin")
    if (folder / "scaler.pt").is_file():
        source.scaler = load_pickled(folder / "scaler.pt")
        used.add("scaler.pt")
    rng = [p for p in entries if RNG_FILE.match(p.name)]
    for p in rng:
        load_pickled(p, rng_allow_list())
    used |= {p.name for p in rng}
    source.processes = max(1, len(rng))
    if rng:
        source.notes.append(
            f"RNG: {', '.join(p.name for p in rng)} read with torch's weights-only unpickler (tensors and "
            "numpy arrays only) and not applied: this trainer draws its training noise from a "
            "generator of its own and orders data by its own sampler, so the source's global random "
            "streams would not continue its run; exact in weights, optimizer, step and EMA, not in RNG")
    source.unused = [f"{p.name}{'/' if p.is_dir() else ''}" for p in entries if p.name not in used]
    return source


# ----- matching source tensors onto our model ---------------------------------------------------------


def strip_wrappers(tensors: Tensors) -> tuple[Tensors, list[str]]:
    """Keys without torch.compile's ``_orig_mod.`` and DDP's leading ``module.``; the prefixes removed."""
    stripped = {".".join(p for p in k.split(".") if p != "_orig_mod"): v for k, v in tensors.items()}
    if len(stripped) != len(tensors):
        raise UserError("import: tensor names collide once torch.compile's _orig_mod. is removed")
    removed = ["_orig_mod. (torch.compile)"] if stripped.keys() != tensors.keys() else []
    while stripped and all(k.startswith("module.") for k in stripped):
        stripped = {k.removeprefix("module."): v for k, v in stripped.items()}
        removed.append("module. (DDP)")
    return stripped, removed


@dataclass
class Target:
    """A part of our model a source file can be, with its keys as that part names them → our LDM's names."""

    name: str
    module: nn.Module
    keys: dict[str, str]


@dataclass
class Placement:
    """Where one source file's tensors went."""

    weights: Weights
    target: Target
    keys: dict[str, str]
    """Source key (wrappers stripped) → our LDM key."""
    stripped: list[str]


def targets(ldm: nn.Module, trainable: nn.Module) -> list[Target]:
    """The trainable part (what the optimizer sees) and every sub-module, under their own names."""
    ours = ldm.state_dict(keep_vars=True)
    by_id = {id(t): k for k, t in ours.items()}
    found = [Target("the trainable modules", trainable,
                    {k: by_id[id(t)] for k, t in trainable.state_dict(keep_vars=True).items()})]
    for name, module in ldm.named_modules():
        if name:
            keys = {k[len(name) + 1:]: k for k in ours if k.startswith(name + ".")}
            found.append(Target(name, module, keys))
    return found


def check_tensors(what: str, keys: dict[str, str], tensors: Tensors, ours: Tensors) -> None:
    """Every source tensor has exactly the shape and dtype of ours; else name the first that differs."""
    for key, mine in sorted(keys.items()):
        theirs, own = tensors[key], ours[mine]
        if theirs.shape != own.shape or theirs.dtype != own.dtype:
            raise UserError(
                f"import: {what}: tensor {key} is {tuple(theirs.shape)} {theirs.dtype} in the source, our "
                f"{mine} is {tuple(own.shape)} {own.dtype} (the source was trained with another model "
                "config)")


def place(weights: Weights, ldm: nn.Module, parts: list[Target]) -> Placement | str:
    """Where ``weights`` belong in our model: under our whole model's own names (all of every top-level
    part it touches), or exactly one part whose keys it equals. A reason when nowhere."""
    tensors, stripped = strip_wrappers(weights.tensors)
    ours = ldm.state_dict()
    keys = set(tensors)
    if keys <= set(ours):
        touched = {k.split(".")[0] for k in keys}
        partial = sorted(k for k in ours if k.split(".")[0] in touched and k not in keys)
        if partial:
            raise UserError(f"import: {weights.name} holds part of our {', '.join(sorted(touched))} but not "
                            f"{len(partial)} of its tensors (e.g. {', '.join(partial[:3])})")
        whole = Target("our model, under its own names", ldm, {k: k for k in ours})
        placement = Placement(weights, whole, {k: k for k in tensors}, stripped)
    else:
        fits = [t for t in parts if set(t.keys) == keys]
        if len(fits) > 1:
            return f"its keys fit several of our modules ({', '.join(t.name for t in fits[:4])})"
        if not fits:
            return f"it fits no part of our model ({closest(keys, parts)})"
        placement = Placement(weights, fits[0], {k: fits[0].keys[k] for k in tensors}, stripped)
    check_tensors(weights.name, placement.keys, tensors, ours)
    return placement


def closest(keys: set[str], parts: list[Target]) -> str:
    def distance(t: Target) -> int:
        return len(keys ^ set(t.keys))

    best = min(parts, key=distance)
    missing, unexpected = sorted(set(best.keys) - keys), sorted(keys - set(best.keys))
    return (f"closest: {best.name}, missing {len(missing)} (e.g. {', '.join(missing[:2]) or '-'}), "
            f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:2]) or '-'})")


def source_tensors(placement: Placement) -> Tensors:
    """The placed file's tensors under our LDM's names."""
    tensors, _ = strip_wrappers(placement.weights.tensors)
    return {placement.keys[k]: v for k, v in tensors.items()}


def groups(keys: tp.Iterable[str], covered: tp.Iterable[str] = ()) -> Counter[str]:
    """Keys counted by the shortest module path none of ``covered`` lies under (or their first part)."""
    inside = {".".join(k.split(".")[:i]) for k in covered for i in range(1, k.count(".") + 1)}
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        depth = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) not in inside), len(parts))
        counts[".".join(parts[:depth]) + (".*" if depth < len(parts) else "")] += 1
    return counts


def mapping_lines(placement: Placement) -> list[str]:
    """Source prefix → our prefix, one line per top-level group of the source file."""
    lines: Counter[tuple[str, str]] = Counter()
    for key, mine in placement.keys.items():
        head, _, rest = key.partition(".")
        lines[(head + (".*" if rest else ""), mine[: len(mine) - len(rest)] + ("*" if rest else ""))] += 1
    return [f"    {src:<28} {n:>5} → {dst}" for (src, dst), n in sorted(lines.items())]


# ----- the LDM import ------------------------------------------------------------------------------------


def import_accelerate(src: Path, args: argparse.Namespace) -> list[str]:
    """``--out`` is the results folder of the run that continues the source."""
    if args.force or args.step_from_name:
        raise UserError(f"import: {'--force' if args.force else '--step-from-name'} is for RadioDiff "
                        "checkpoints; an accelerate import never writes over a run (pass --out with a new "
                        "results folder) and takes its step from optimizer.bin")
    cfg = load_run_config(args)
    report = import_into_ldm(read_accelerate_folder(src), cfg)
    return [*report, f"resume with: {resume_command(args, cfg)}"]


def resume_command(args: argparse.Namespace, cfg: Config) -> str:
    """``train`` with the import's own config and overrides, which resumes from what it wrote."""
    resume = ["radiodiff-resume", "train", "--cfg", args.cfg, *args.overrides]
    if args.out is not None:
        resume.append(f"trainer.results_folder={cfg.results_folder.resolve()}")
    if cfg.checkpoint.resume != "auto":
        resume.append("checkpoint.resume=auto")
    return shlex.join(resume)


def is_torch_file(path: Path) -> bool:
    return path.is_file() and path.suffix in TORCH_FILES


def import_radiodiff(src: Path, args: argparse.Namespace) -> list[str]:
    """A RadioDiff ``model-N.pt``: a whole LDM run when it is one and CFG builds RadioDiff's network
    (``--out``: the results folder), else its first stage (``--out``: the weights file). The readers live
    in the RadioDiff compatibility package; the file is read once, mapped rather than copied."""
    from radiodiff_resume.compat import radiodiff_ckpt, radiodiff_ldm

    ckpt = load_pickled(src, mmap=True)
    if (args.out is None or not args.out.endswith(".safetensors")) and radiodiff_ldm.is_ldm_run(ckpt):
        cfg = load_run_config(args)
        if radiodiff_ldm.builds_radiodiff_unet(cfg):
            return radiodiff_ldm.import_run(src, ckpt, cfg, args)
    if args.step_from_name:
        raise UserError("import: --step-from-name is for a RadioDiff LDM file imported as a run (a config "
                        "whose model.unet.target is RadioDiff's network)")
    return radiodiff_ckpt.import_radiodiff(src, args, ckpt)


def load_run_config(args: argparse.Namespace) -> Config:
    """CFG with the overrides, ``--out`` as ``trainer.results_folder`` (the run the import writes)."""
    from radiodiff_resume.config import load_config

    overrides = list(args.overrides)
    if args.out is not None:
        if any(o.startswith("trainer.results_folder=") for o in overrides):
            raise UserError("import: give the results folder once: --out DIR or trainer.results_folder=")
        overrides.append(f"trainer.results_folder={Path(args.out).expanduser().resolve()}")
    return load_config(args.cfg, overrides)


def refuse_existing_run(cfg: Config) -> None:
    """An import never mixes with a run: its results folder must hold no checkpoint yet."""
    folder = cfg.results_folder.resolve() / "checkpoints"
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if present:
        raise UserError(f"import: {folder} already holds {', '.join(present[:3])}"
                        f"{' …' if len(present) > 3 else ''}; an import never mixes with an existing run: "
                        "pass --out with a new results folder")


def import_into_ldm(source: Source, cfg: Config,
                    before_save: tp.Callable[[LdmImport], None] | None = None) -> list[str]:
    """Build the run as ``train`` does, put the source's state into it, commit one verified checkpoint
    (``before_save`` sees the loaded state first and may add to the report and the provenance)."""
    from radiodiff_resume.lock import RunLock
    from radiodiff_resume.run import build_ldm_trainer, make_accelerator

    first_stage = Path(str(cfg.model.first_stage.ckpt_path))
    if not first_stage.is_file():
        raise UserError(f"import: model.first_stage.ckpt_path: {first_stage} not found; an import never "
                        "trains a first stage: point it at the trained autoencoder's weights")
    refuse_existing_run(cfg)
    accelerator = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        raise UserError("import: run it as one process (not under accelerate launch / srun)")
    lock = RunLock(cfg.results_folder)
    lock.acquire()
    try:
        trainer = build_ldm_trainer(cfg, accelerator)
        return LdmImport(source, cfg, trainer, first_stage).run(before_save)
    finally:
        lock.release()
        accelerator.end_training()


class LdmImport:
    """One source into one freshly built LDM trainer; collects the report as it goes."""

    def __init__(self, source: Source, cfg: Config, trainer: LatentDiffusionTrainer,
                 first_stage: Path) -> None:
        self.source, self.cfg, self.trainer, self.first_stage = source, cfg, trainer, first_stage
        self.ldm = trainer.ldm
        self.report = [f"import: {source.what} ({source.processes} process(es))", *source.described]
        self.provenance = [f"imported by `radiodiff-resume import` from the {source.what}"]

    def run(self, before_save: tp.Callable[[LdmImport], None] | None = None) -> list[str]:
        from radiodiff_resume.checkpoint.verify import nonfinite_names

        t = self.trainer
        placements = self.place_weights()
        model = dict(self.ldm.state_dict())
        for placement in placements:
            model.update(source_tensors(placement))
        self.ldm.load_state_dict(model)
        mapped = {k for p in placements for k in p.keys.values()}
        self.report_unplaced(mapped)
        self.report.append(f"  scale_factor {self.scale_factor(mapped)}")
        optimizer, step = (self.optimizer_state(placements) if self.source.optimizer is not None
                           else self.no_optimizer_state())
        shared = t.state_dict()
        shared.update(model=self.ldm.state_dict(), optimizer=optimizer,
                      train_state={"step": step, "samples_seen": 0})
        if t.ema is not None:
            shared["ema"] = self.ema_state(step)
        elif self.source.ema is not None:
            self.report.append(f"EMA: {self.source.ema.name} not used: trainer.use_ema is false")
        self.grad_scaler(shared)
        bad = nonfinite_names({k: shared[k] for k in ("model", "ema", "optimizer") if k in shared})
        if bad:
            raise UserError(f"import: the source holds non-finite values in {len(bad)} tensor(s) "
                            f"({', '.join(bad[:4])}); nothing was written")
        t.load_state_dict(shared)
        self.report += [
            f"learning rate: {t.lr_schedule.get_last_lr()[0]:.6g} at step {step} by this config's schedule "
            f"(trainer.lr_schedule={self.cfg.trainer.lr_schedule}, trainer.lr, warm-up), which `train` "
            f"rebuilds at the step{self.source_lr()}",
            "data: starts at epoch 0 of this config's data stream (the source's loader position does not "
            "carry over)", *self.source.notes,
            f"not used: {', '.join(self.source.unused) or 'nothing'}",
        ]
        if step >= self.cfg.trainer.train_num_steps:
            self.report.append(f"note: step {step} is not below trainer.train_num_steps="
                               f"{self.cfg.trainer.train_num_steps}: `train` will only write the final "
                               "weights unless you raise it")
        self.provenance.append("not carried over: random streams and data position (new ones from the seed)")
        if before_save is not None:
            before_save(self)
        path = t.checkpointer.save(provenance=self.provenance)
        verified = t.checkpointer.verify_and_load(path)
        if not verified.ok:
            raise UserError(f"import: the checkpoint written to {path} does not verify "
                            f"({verified.summary()}): {tp.cast(tp.Any, verified.failure).detail}")
        t.events.emit("imported", stage=t.stage, step=step, path=str(path), source=str(self.source.path))
        return [*self.report, f"written: {path} ({verified.summary()})"]

    # ----- weights ---------------------------------------------------------------------------------
    def place_weights(self) -> list[Placement]:
        parts = targets(self.ldm, self.trainer.trainable_module(self.ldm))
        placements, reasons = [], []
        for weights in self.source.models:
            found = place(weights, self.ldm, parts)
            if isinstance(found, str):
                reasons.append(f"{weights.name} ({len(weights.tensors)} tensors): {found}")
            else:
                placements.append(found)
        if not placements:
            raise UserError(f"import: none of the source's weights fit this config's model: "
                            f"{'; '.join(reasons)}")
        seen: dict[str, str] = {}
        for p in placements:
            for mine in p.keys.values():
                if mine in seen:
                    raise UserError(f"import: {seen[mine]} and {p.weights.name} both hold our {mine}")
                seen[mine] = p.weights.name
        self.report.append("weights (shapes and dtypes equal, bit for bit):")
        for p in placements:
            stripped = f"; removed {', '.join(p.stripped)}" if p.stripped else ""
            self.report.append(f"  {p.weights.name} ({len(p.keys)} tensors) → {p.target.name}{stripped}")
            self.report += mapping_lines(p)
        self.provenance.append("weights: " + "; ".join(f"{p.weights.name} → {p.target.name}"
                                                       for p in placements))
        self.report += [f"  {reason}: not used" for reason in reasons]
        return placements

    def scale_factor(self, mapped: set[str]) -> str:
        """From the source when it holds one, else as a fresh run of this config sets it."""
        import torch

        from radiodiff_resume.config import measures_scale_factor

        value = float(self.ldm.scale_factor)
        m = self.cfg.model
        if "scale_factor" in mapped:
            fixed = torch.tensor(m.scale_factor, dtype=self.ldm.scale_factor.dtype).item()
            if not measures_scale_factor(m) and fixed != value:
                raise UserError(f"import: the source's scale_factor is {value!r} but the config fixes "
                                f"model.scale_factor={m.scale_factor!r}, and `train` would refuse to resume "
                                f"with another one: set model.scale_factor={value!r}")
            how = "from the source"
        else:
            self.trainer.on_fit_start()  # step 0: exactly what a fresh run of this config does
            value = float(self.ldm.scale_factor)
            how = ("measured by model.scale_by_std (1/std of the first training batch's latents, as a fresh "
                   "run does)" if measures_scale_factor(m) else "model.scale_factor")
        self.provenance.append(f"scale_factor {value!r}: {how}")
        return f"{value:.6g}: {how}"

    def report_unplaced(self, mapped: set[str]) -> None:
        """Which of our tensors the source did not hold, and where each came from instead."""
        missing = [k for k in self.ldm.state_dict() if k not in mapped and k != "scale_factor"]
        self.report.append(f"  not in the source:{'' if missing else ' nothing'}")
        for prefix, n in sorted(groups(missing, mapped).items()):
            where = (f"model.first_stage.ckpt_path {self.first_stage}" if prefix.startswith("first_stage")
                     else f"initialised as a fresh run of this config (trainer.seed={self.cfg.trainer.seed})")
            self.report.append(f"    {prefix:<28} {n:>5} ← {where}")

    # ----- optimizer and step --------------------------------------------------------------------
    def optimizer_state(self, placements: list[Placement]) -> tuple[dict[str, tp.Any], int]:
        """The source's Adam moments on our parameters, and the step they were taken at."""
        import torch

        t, opt = self.trainer, self.source.optimizer
        name = self.source.optimizer_name
        groups_ = opt.get("param_groups") if isinstance(opt, dict) else None
        if not (isinstance(groups_, list) and isinstance(opt.get("state"), dict)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups_)):
            raise UserError(f"import: {name} is not a torch optimizer state_dict")
        flat = [i for g in groups_ for i in g["params"]]
        state = opt["state"]
        if not set(state) <= set(flat) or len(set(flat)) != len(flat):
            raise UserError(f"import: {name}: its state and param_groups list different parameters")
        for i, slots in state.items():
            if not (isinstance(slots, dict) and set(slots) == ADAM_SLOTS
                    and all(isinstance(slots[k], torch.Tensor) for k in ("exp_avg", "exp_avg_sq"))):
                raise UserError(f"import: {name}: parameter {i} has state {sorted(slots)}, not Adam/AdamW's "
                                f"{sorted(ADAM_SLOTS)} tensors; this run trains with AdamW")
        if any(g.get("amsgrad") for g in groups_):
            raise UserError(f"import: {name} was trained with amsgrad; this run's AdamW has none")
        params, order = self.fitting_params(flat, state, placements)
        index = {id(p): j for j, p in enumerate(t.params)}
        ours = t.optimizer.state_dict()
        ours["state"] = {}
        for i, p in zip(flat, params, strict=True):
            if i in state:
                slots = state[i]
                step = slots["step"]
                ours["state"][index[id(p)]] = {
                    "step": step if isinstance(step, torch.Tensor) else torch.tensor(float(step)),
                    "exp_avg": slots["exp_avg"], "exp_avg_sq": slots["exp_avg_sq"]}
        names = {id(p): n for n, p in self.ldm.named_parameters()}
        fresh = [names[id(p)] for p in t.params if id(p) not in {id(q) for q in params}]
        line = (f"optimizer: {name}: Adam state of {len(flat)} parameters in {len(groups_)} group(s) → "
                f"ours, {order}")
        if fresh:
            line += f"; {len(fresh)} of ours ({', '.join(sorted(groups(fresh)))}) start with empty Adam state"
        self.report.append(line)
        self.report += self.hyper_parameters(groups_)
        step = self.step(state, name)
        self.provenance.append(f"optimizer: {name}, {order}; step {step}")
        return ours, step

    def no_optimizer_state(self) -> tuple[dict[str, tp.Any], int]:
        """A weights-only source: our AdamW with empty moments, at the step the source was given."""
        step = tp.cast(int, self.source.step)
        ours = self.trainer.optimizer.state_dict()
        ours["state"] = {}
        self.report.append(f"optimizer: none in the source ({self.source.optimizer_name}); AdamW starts with "
                           "empty moments (its bias correction starts again)")
        self.provenance.append(f"optimizer: none in the source, empty moments; step {step}")
        return ours, step

    def fitting_params(self, flat: list[int], state: dict[int, tp.Any],
                       placements: list[Placement]) -> tuple[list[nn.Parameter], str]:
        """Our parameters in the order the source's optimizer lists them: that of its weights files (each
        part's own order), or our optimizer's; the first whose count and shapes fit."""
        t = self.trainer
        trainable = {id(p) for p in t.params}
        names = {id(p): n for n, p in self.ldm.named_parameters()}
        placed = [(pl.target.module, set(pl.keys.values())) for pl in placements]
        by_files = [p for module, keys in placed for p in module.parameters()
                    if id(p) in trainable and names[id(p)] in keys]
        candidates = [(by_files, "in the order of the placed weights' parameters"),
                      (list(t.params), "in our optimizer's parameter order")]
        problems = []
        for params, order in candidates:
            if len(params) != len(flat):
                problems.append(f"{len(params)} parameters {order.removeprefix('in ')}")
                continue
            wrong = next((f"#{n}: {tuple(state[i]['exp_avg'].shape)} {state[i]['exp_avg'].dtype} vs our "
                          f"{names[id(p)]} {tuple(p.shape)} {p.dtype}"
                          for n, (i, p) in enumerate(zip(flat, params, strict=True)) if i in state and (
                              state[i]["exp_avg"].shape != p.shape or state[i]["exp_avg"].dtype != p.dtype)),
                         None)
            if wrong is None:
                return params, order
            problems.append(f"{order.removeprefix('in ')}: parameter {wrong}")
        raise UserError(f"import: {self.source.optimizer_name} holds state for {len(flat)} parameters and "
                        f"does not fit ours ({'; '.join(problems)})")

    def hyper_parameters(self, source_groups: list[dict[str, tp.Any]]) -> list[str]:
        ours = self.trainer.optimizer.state_dict()["param_groups"][0]
        lines = []
        for key in ("betas", "eps", "weight_decay"):
            theirs = sorted({repr(tuple(g[key]) if key == "betas" else g[key])
                             for g in source_groups if key in g})
            mine = repr(tuple(ours[key]) if key == "betas" else ours[key])
            if theirs and theirs != [mine]:
                lines.append(f"  {key}: {', '.join(theirs)} in the source, {mine} in this run (this run's "
                             "applies)")
        return lines

    def step(self, state: dict[int, tp.Any], name: str) -> int:
        """The source's own step when it records one, else the optimizer's per-parameter step (the count
        its Adam bias correction uses); checked against the LR scheduler's ``last_epoch`` (accelerate
        steps a prepared scheduler once per process)."""
        steps = sorted({int(float(s["step"])) for s in state.values()})
        if not steps or steps[-1] == 0:
            raise UserError(f"import: {name} holds no optimizer step: nothing was trained yet, start a "
                            "fresh run")
        step = steps[-1]
        how = f"{name} per-parameter step {step}"
        if len(steps) > 1:
            how += f" (the largest; some parameters were stepped {', '.join(map(str, steps[:-1]))} times)"
        sched = self.source.scheduler
        last = sched.get("last_epoch") if isinstance(sched, dict) else None
        if self.source.step is not None:
            own = self.source.step
            agrees = own == step and last == own
            how = (f"the file's step, = {how} = {self.source.scheduler_name} last_epoch" if agrees else
                   f"the file's step; {how}, {self.source.scheduler_name} last_epoch {last} (Adam keeps its "
                   "own count for its bias correction)")
            self.report.append(f"step: {own} ({how})")
            return own
        if not isinstance(last, int):
            how += f"; {self.source.scheduler_name or 'scheduler.bin'} absent or without last_epoch"
        elif last == step:
            how += f" = {self.source.scheduler_name} last_epoch"
        elif last == step * self.source.processes:
            how += (f" = {self.source.scheduler_name} last_epoch {last} / {self.source.processes} processes "
                    "(accelerate steps a prepared scheduler once per process)")
        else:
            how += (f"; {self.source.scheduler_name} last_epoch is {last}: they disagree, the optimizer's "
                    "is used (its moments were built over that many steps)")
        self.report.append(f"step: {step} ({how})")
        return step

    def source_lr(self) -> str:
        sched = self.source.scheduler
        last = sched.get("_last_lr") if isinstance(sched, dict) else None
        if isinstance(last, list) and last:
            return f"; the source's last was {', '.join(f'{float(v):.6g}' for v in last)}"
        return ""

    # ----- EMA and loss scale --------------------------------------------------------------------
    def ema_state(self, step: int) -> dict[str, tp.Any]:
        """Shadow parameters from the source's EMA where it has them, else the imported online weights."""
        t = self.trainer
        ema = tp.cast(tp.Any, t.ema)
        state = dict(ema.state_dict())
        names = {id(p): n for n, p in self.ldm.named_parameters()}
        shadow = {names[id(p)]: p.detach().clone() for p in t.params}
        fresh = set(shadow)
        if self.source.ema is None:
            state["optimization_step"] = 0
            self.report.append("EMA: none in the source; ours starts from the imported online weights "
                               "(its decay warms up again, as after a checkpoint saved without EMA)")
            self.provenance.append("EMA: none in the source, started from the imported weights")
        else:
            weights = self.source.ema
            found = place(weights, self.ldm, targets(self.ldm, t.trainable_module(self.ldm)))
            if isinstance(found, str):
                raise UserError(f"import: EMA {weights.name}: {found}")
            tensors = source_tensors(found)
            used = {k: v for k, v in tensors.items() if k in shadow}
            shadow.update({k: v.clone() for k, v in used.items()})
            fresh -= set(used)
            recorded = self.source.ema_config.get("optimization_step")
            state["optimization_step"] = recorded if isinstance(recorded, int) else step
            line = (f"EMA: {weights.name} ({len(used)} parameters) → our EMA of {found.target.name} "
                    f"(optimization_step {state['optimization_step']}"
                    f"{'' if isinstance(recorded, int) else ': none recorded, the step'})")
            if fresh:
                line += f"; {len(fresh)} of ours ({', '.join(sorted(groups(fresh)))}) from the online weights"
            skipped = sorted(set(tensors) - set(used))
            if skipped:
                line += (f"; {len(skipped)} tensors outside our EMA (buffers, frozen parameters) not used "
                         f"({', '.join(sorted(groups(skipped)))})")
            self.report.append(line)
            self.provenance.append(f"EMA: {weights.name}")
        state["shadow_params"] = [shadow[names[id(p)]] for p in t.params]
        return state

    def grad_scaler(self, shared: dict[str, tp.Any]) -> None:
        scaler, theirs = self.trainer.accelerator.scaler, self.source.scaler
        if scaler is not None and theirs is not None:
            state = scaler.state_dict()
            if set(theirs) != set(state):
                raise UserError(f"import: scaler.pt holds {sorted(theirs)}, a GradScaler has {sorted(state)}")
            shared["grad_scaler"] = theirs
            self.report.append(f"fp16 loss scale: scaler.pt (scale {theirs.get('scale')})")
        elif theirs is not None:
            self.report.append("fp16 loss scale: scaler.pt not used: this run has no GradScaler "
                               "(trainer.mixed_precision is not fp16)")
        elif scaler is not None:
            self.report.append("fp16 loss scale: none in the source; ours starts afresh")


SOURCE_KINDS: tuple[SourceKind, ...] = (
    SourceKind("an accelerate save_state folder", is_accelerate_folder, import_accelerate,
               "an accelerate save_state folder holds optimizer.bin, random_states_0.pkl and "
               "model.safetensors"),
    SourceKind("a RadioDiff checkpoint file (.pt, .pth or .ckpt)", is_torch_file, import_radiodiff,
               "RadioDiff's train_vae.py and train_cond_ldm.py write model-N.pt"),
)
"""Checked in order; the first whose ``detects`` accepts SRC converts it."""
