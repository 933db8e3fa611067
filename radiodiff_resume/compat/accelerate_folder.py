"""An accelerate ``save_state`` folder read into a :class:`~radiodiff_resume.compat.ldm_import.Source`:
its model files (or ``save_pretrained`` sub-folders), optimizer, scheduler, EMA, grad scaler and RNG
files, refusing FSDP/DeepSpeed shards and anything that is not plain data."""

from __future__ import annotations

import json
import re
import typing as tp
from pathlib import Path

from radiodiff_resume.compat.ldm_import import Source, Weights
from radiodiff_resume.compat.torch_files import Tensors, load_pickled, load_tensors
from radiodiff_resume.errors import UserError

MODEL_FILE = re.compile(r"^(?:model|pytorch_model)(?:_(\d+))?\.(safetensors|bin)$")


RNG_FILE = re.compile(r"^random_states_(\d+)\.pkl$")


PRETRAINED_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                      "diffusion_pytorch_model.bin", "pytorch_model.bin")
"""Weight files of a ``save_pretrained`` folder (diffusers' save hooks write ``unet/``, ``unet_ema/``)."""


SHARDED = re.compile(r"^(pytorch_model_fsdp.*|optimizer_\d+|pytorch_model|latest|zero_to_fp32\.py)$")
"""FSDP / DeepSpeed save_state entries: per-rank shards that have to be consolidated first."""


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
