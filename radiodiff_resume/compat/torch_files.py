"""Reading another trainer's torch files as data only: every ``.pt`` / ``.bin`` / ``.pkl`` goes through
torch's weights-only unpickler (on torch >= 2.10, :func:`unpickler_refusal`), so a file that would run code
is refused before any of it runs, and the refusal says what the file would call. The one reader of foreign
pickles: ``import``, ``export``'s read-back, ``evaluate --weights`` and the Swin's ImageNet weights."""

from __future__ import annotations

import pickletools
import re
import typing as tp
import warnings
from pathlib import Path

from radiodiff_resume.errors import UserError

if tp.TYPE_CHECKING:
    import torch


Tensors = dict[str, "torch.Tensor"]


TORCH_FILES = frozenset({".pt", ".pth", ".ckpt"})
"""Suffixes of a single ``torch.save`` file, as RadioDiff writes its checkpoints."""


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


def is_torch_file(path: Path) -> bool:
    return path.is_file() and path.suffix in TORCH_FILES
