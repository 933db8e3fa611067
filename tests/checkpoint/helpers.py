"""Helpers for the checkpoint tests: building trainers and corrupting real checkpoint folders on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import typing as tp
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from radiodiff_resume.build import write_untrained_first_stage
from radiodiff_resume.checkpoint.files import decode_component
from radiodiff_resume.checkpoint.files import write_component as write_files_of
from radiodiff_resume.checkpoint.manifest import MANIFEST, checksum
from radiodiff_resume.checkpoint.verify import open_checkpoint
from radiodiff_resume.config import Config, build_config
from radiodiff_resume.run import build_ldm_trainer
from radiodiff_resume.trainer.ldm import LatentDiffusionTrainer
from tests.conftest import tiny_raw

STEP2, STEP4 = "step-00000002", "step-00000004"

GOLDEN = ("trainer.train_num_steps=4", "trainer.val_batches=0", "checkpoint.every=2",
          "trainer.num_sample_images=1")
"""Overrides of the golden run: 4 steps, checkpoints committed at steps 2 and 4."""

FAST = ("trainer.val_batches=0", "trainer.num_sample_images=1")


def build(cfg: Config) -> LatentDiffusionTrainer:
    return build_ldm_trainer(cfg, Accelerator())


def train_golden(results: Path, synth_cache: Path) -> LatentDiffusionTrainer:
    """The golden run: 4 steps of the tiny config with checkpoints committed at steps 2 and 4."""
    cfg = build_config(tiny_raw(results, synth_cache), GOLDEN)
    write_untrained_first_stage(cfg)
    trainer = build(cfg)
    trainer.fit()
    assert committed(results) == [STEP2, STEP4]
    return trainer


@contextlib.contextmanager
def torch_threads(n: int) -> tp.Iterator[None]:
    """``n`` intra-op threads for the duration (the tiny models gain nothing from more, and on a
    shared 2-core machine spinning OpenMP workers make tests several times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def committed(results: Path) -> list[str]:
    """Names of the ``step-*`` folders in ``results/checkpoints``, sorted."""
    folder = results / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path → digest)."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def read_manifest(ckpt: Path) -> dict[str, tp.Any]:
    return tp.cast(dict[str, tp.Any], json.loads((ckpt / MANIFEST).read_text()))


def write_manifest(ckpt: Path, raw: tp.Mapping[str, tp.Any]) -> None:
    """Write ``raw`` as the manifest with a matching checksum (a consistent forgery)."""
    body = {k: v for k, v in raw.items() if k != "checksum"}
    (ckpt / MANIFEST).write_text(json.dumps({**body, "checksum": checksum(body)}, indent=1, sort_keys=True))


def reseal(ckpt: Path, name: str) -> None:
    """Update the manifest record of ``name`` to its current content (a consistent forgery)."""
    raw = read_manifest(ckpt)
    assert name in raw["files"], name
    raw["files"][name] = {"sha256": sha256_file(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    write_manifest(ckpt, raw)


def rewrite_tensors(ckpt: Path, component: str, change: tp.Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load ``component.safetensors``, let ``change`` edit the tensors in place, save, reseal the manifest."""
    path = ckpt / f"{component}.safetensors"
    tensors = load_file(str(path))
    before = sha256_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata={"component": component})
    assert sha256_file(path) != before, "the change must alter the file"
    reseal(ckpt, path.name)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def events(results: Path, name: str) -> list[dict[str, tp.Any]]:
    path = results / "events.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["event"] == name]


def write_component(folder: Path, name: str, tree: tp.Any) -> list[Path]:
    """Write one component's files as a checkpoint save does; the paths written."""
    return [folder / n for n in write_files_of(folder, name, tree)]


def read_component(folder: Path, name: str) -> tp.Any:
    """A component read straight from its files (no manifest), as the checkpoint would decode it."""
    paths = (folder / f"{name}.json", folder / f"{name}.safetensors")
    blobs = {p.name: np.frombuffer(bytearray(p.read_bytes()), dtype=np.uint8) for p in paths if p.exists()}
    return decode_component(blobs, name)


def read_shared(ckpt: Path) -> dict[str, tp.Any]:
    """The shared state a verified LDM checkpoint holds (what ``trainer.state_dict()`` gave at save)."""
    return {k: v for k, v in open_checkpoint(ckpt, "ldm").shared.items() if k != "probe"}


def tensor_equal_trees(a: tp.Any, b: tp.Any) -> bool:
    """Exact equality of two state trees (dtypes and bits): what a restore must reproduce."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensor_equal_trees(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            tensor_equal_trees(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
