"""The manifest: written last, it is the commit record of a checkpoint folder.

A folder counts as a checkpoint only if ``manifest.json`` exists, parses, and every
file it lists has the recorded size and SHA-256.
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing as tp
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

FORMAT = "radiodiff_resume/checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class FileRecord:
    sha256: str
    bytes: int


@dataclass
class Probe:
    """Loss of a fixed batch with fixed noise, recorded at save and recomputed on load."""

    loss: float
    loss_hex: str
    device_type: str
    dtype: str


@dataclass
class Manifest:
    step: int
    stage: str
    world_size: int
    config_hash: str
    scale_factor: float | None
    probe: Probe | None
    files: dict[str, FileRecord] = field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        if raw.get("version") != VERSION:
            raise ValueError(f"manifest version {raw.get('version')!r}; this build reads {VERSION}")
        probe = raw.get("probe")
        return cls(
            step=int(raw["step"]),
            stage=str(raw["stage"]),
            world_size=int(raw["world_size"]),
            config_hash=str(raw["config_hash"]),
            scale_factor=raw.get("scale_factor"),
            probe=Probe(**probe) if probe else None,
            files={k: FileRecord(**v) for k, v in raw["files"].items()},
            created=str(raw.get("created", "")),
            versions=dict(raw.get("versions", {})),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(paths: tp.Sequence[Path]) -> dict[str, FileRecord]:
    """SHA-256 and size of each file, hashed in parallel threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(4, len(paths) or 1)) as pool:
        digests = list(pool.map(sha256_file, paths))
    return {p.name: FileRecord(sha256=d, bytes=p.stat().st_size) for p, d in zip(paths, digests, strict=True)}


@functools.cache
def library_versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "accelerate", "diffusers", "safetensors", "radiodiff-resume"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed folder name ``step-XXXXXXXX``; None for anything else."""
    if name.startswith("step-") and len(name) == 13 and name[5:].isdigit():
        return int(name[5:])
    return None


def probe_from(loss: float, device_type: str, dtype: str) -> Probe:
    return Probe(loss=loss, loss_hex=float(loss).hex(), device_type=device_type, dtype=dtype)
