"""The manifest: written last, it is the commit record of a checkpoint folder.

A folder counts as a checkpoint only if ``manifest.json`` exists, parses into this
schema, carries its own checksum, and every file it lists has the recorded size and
digest. Parsing is strict: a field the format requires is required, with the type
and range it must have, so no check downstream can pass on a missing or NaN value.

Each file record names its hash: ``{"xxh3_128": hex, "bytes": n}`` since format version 3
(XXH3-128 keeps up with the disk where SHA-256 does not; ``bench/RESULTS.md``), and
``{"sha256": hex, "bytes": n}`` in version 2, which is still read. The digests detect
corruption; they are not a signature: whoever can write the folder can reseal it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import typing as tp
from dataclasses import asdict, dataclass, field, fields

import xxhash

FORMAT = "radiodiff_resume/checkpoint"
VERSION = 3
READABLE = (2, 3)
"""Version 2 differs only in hashing every file with SHA-256 (a manifest read is written back as 3)."""
MANIFEST = "manifest.json"
OPTIONAL_FIELD = "provenance"
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest lists files and a few fields; anything larger is not one of ours."""

FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
"""What a listed file may be called: a plain name inside the folder (no ``/``, no ``..``)."""


class ManifestError(ValueError):
    """``manifest.json`` is not a valid manifest; the message says which field and why."""

    def __init__(self, message: str, integrity: bool = True) -> None:
        super().__init__(message)
        self.integrity = integrity
        """False when the file is sound but written by another format version."""


class Hasher(tp.Protocol):
    def update(self, data: tp.Any, /) -> None: ...
    def hexdigest(self) -> str: ...


HASHES: dict[str, tuple[tp.Callable[[], Hasher], int]] = {
    "xxh3_128": (xxhash.xxh3_128, 32),
    "sha256": (hashlib.sha256, 64),
}
"""Hash name → (constructor, hex digits). ``sha256`` is read (version 2 checkpoints, imported files)."""
HASH = "xxh3_128"
"""What a save hashes with."""


@dataclass
class FileRecord:
    """A listed file's digest and size; ``algorithm`` is a key of :data:`HASHES` (SHA-256 unless named:
    what format 2 and an import's passengers record)."""

    digest: str
    bytes: int
    algorithm: str = "sha256"

    def to_json(self) -> dict[str, tp.Any]:
        return {self.algorithm: self.digest, "bytes": self.bytes}


def hasher(algorithm: str) -> Hasher:
    """A fresh hash object of a known algorithm (see :data:`HASHES`)."""
    return HASHES[algorithm][0]()


@dataclass
class Probe:
    """A fingerprint of the state: a fixed function of the weights on inputs stored in the checkpoint.

    ``environment`` says where it was computed; bit-exact reproduction is required
    only where the environment is identical.
    """

    loss: float
    loss_hex: str
    dtype: str
    environment: dict[str, str]


@dataclass
class Manifest:
    step: int
    stage: str
    world_size: int
    line: str
    """Identifies one line of training: set on a fresh start, inherited on resume."""
    config_hash: str
    scale_factor: float | None
    probe: Probe
    files: dict[str, FileRecord] = field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    provenance: list[str] = field(default_factory=list)
    """How the state came to be other than by training: an import or a repair, one line each (an
    optional field, left out when empty, so a manifest without it is read as before)."""
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        body = asdict(self)
        body["files"] = {name: record.to_json() for name, record in self.files.items()}
        if not body[OPTIONAL_FIELD]:
            del body[OPTIONAL_FIELD]
        body["checksum"] = checksum(body)
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse and validate; raises :class:`ManifestError` naming the first bad field."""
        if isinstance(data, str):
            data = data.encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{len(data)} bytes, more than a manifest can have")
        try:
            raw = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys,
                             parse_constant=_no_constant, parse_float=_finite_float)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"not valid JSON ({type(exc).__name__}: {_short(exc)})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ManifestError(f"not a {FORMAT} manifest")
        body = {k: v for k, v in raw.items() if k != "checksum"}
        try:
            expected_sum = checksum(body)
        except RecursionError:
            raise ManifestError("nested too deeply to be a manifest") from None
        if "checksum" in raw and raw["checksum"] != expected_sum:
            raise ManifestError("checksum mismatch (the manifest was changed after the save)")
        version = raw.get("version")
        if not _is_int(version):
            raise ManifestError(f"'version' must be an int, got {_short_repr(version)}")
        if version not in READABLE:  # an intact manifest of another format version: not damage
            raise ManifestError(
                f"format version {raw.get('version')!r}, this build of radiodiff_resume reads version "
                f"{' or '.join(map(str, READABLE))}: finish that run with the version that wrote it, or "
                "start a new run with checkpoint.resume=never", integrity=False)
        _get(raw, "checksum", str)
        expected = {f.name for f in fields(cls)} | {"checksum"}
        if set(raw) | {OPTIONAL_FIELD} != expected:
            extra, missing = sorted(set(raw) - expected), sorted(expected - set(raw) - {OPTIONAL_FIELD})
            raise ManifestError(f"fields differ from the format (unexpected {extra}, missing {missing})")
        step = _get(raw, "step", int)
        world_size = _get(raw, "world_size", int)
        files = _files(_get(raw, "files", dict))
        if step < 0 or world_size < 1:
            raise ManifestError(f"step {step} / world_size {world_size} out of range")
        if world_size > len(files):  # every rank has a listed file
            raise ManifestError(f"world_size {world_size} but only {len(files)} file(s) listed")
        scale = raw["scale_factor"]
        if scale is not None and not (_is_number(scale) and math.isfinite(scale) and scale > 0):
            raise ManifestError(f"scale_factor {scale!r} is not a finite positive number or null")
        return cls(
            step=step, stage=_get(raw, "stage", str), world_size=world_size,
            line=_get(raw, "line", str), config_hash=_get(raw, "config_hash", str),
            scale_factor=None if scale is None else float(scale),
            probe=_probe(_get(raw, "probe", dict)), files=files,
            created=_get(raw, "created", str), versions=_str_map(_get(raw, "versions", dict), "versions"),
            provenance=_provenance(raw.get(OPTIONAL_FIELD, [])),
        )


def checksum(body: tp.Mapping[str, tp.Any]) -> str:
    """SHA-256 of the canonical JSON of every field but the checksum itself."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _unique_keys(pairs: list[tuple[str, tp.Any]]) -> dict[str, tp.Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _no_constant(name: str) -> tp.NoReturn:
    raise ValueError(f"{name} is not a number a manifest may hold")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} overflows")
    return value


def _is_int(value: tp.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 160 else text[:157] + "..."


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(raw: tp.Mapping[str, tp.Any], key: str, kind: type) -> tp.Any:
    value = raw.get(key)
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise ManifestError(
            f"'{key}' must be {kind.__name__}, got {type(value).__name__} {_short_repr(value)}")
    return value


def _short_repr(value: tp.Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _str_map(raw: tp.Mapping[str, tp.Any], what: str) -> dict[str, str]:
    if not all(isinstance(v, str) for v in raw.values()):
        raise ManifestError(f"'{what}' must map names to strings")
    return dict(raw)


def _probe(raw: tp.Mapping[str, tp.Any]) -> Probe:
    loss = raw.get("loss")
    if not (_is_number(loss) and math.isfinite(loss)):
        raise ManifestError(f"probe.loss {loss!r} is not a finite number")
    loss_hex = _get(raw, "loss_hex", str)
    try:
        exact = float.fromhex(loss_hex)
    except ValueError:
        raise ManifestError(f"probe.loss_hex {loss_hex!r} is not a float in hex") from None
    if exact != loss:
        raise ManifestError(f"probe.loss {loss!r} and probe.loss_hex {loss_hex} disagree")
    if set(raw) != {"loss", "loss_hex", "dtype", "environment"}:
        raise ManifestError(f"probe fields {sorted(raw)} differ from the format")
    return Probe(loss=float(loss), loss_hex=loss_hex, dtype=_get(raw, "dtype", str),
                 environment=_str_map(_get(raw, "environment", dict), "probe.environment"))


def _provenance(raw: tp.Any) -> list[str]:
    if not (isinstance(raw, list) and all(isinstance(x, str) for x in raw)):
        raise ManifestError("'provenance' must be a list of strings")
    return list(raw)


def _files(raw: tp.Mapping[str, tp.Any]) -> dict[str, FileRecord]:
    files = {}
    for name, record in raw.items():
        if not FILE_NAME.fullmatch(name) or name == MANIFEST:
            raise ManifestError(f"lists {name!r}, which is not a plain file name inside the checkpoint")
        algorithm = _algorithm(name, record)
        digest, size = record[algorithm], record["bytes"]
        if not (isinstance(digest, str) and re.fullmatch(f"[0-9a-f]{{{HASHES[algorithm][1]}}}", digest)):
            raise ManifestError(f"files[{name!r}].{algorithm} is not a {algorithm} hex digest")
        if not (_is_int(size) and size >= 0):
            raise ManifestError(f"files[{name!r}].bytes must be an int >= 0")
        files[name] = FileRecord(digest=digest, bytes=size, algorithm=algorithm)
    return files


def _algorithm(name: str, record: tp.Any) -> str:
    """The hash a file record names. A well-formed name this build does not know is a checkpoint of
    a newer build, not damage (the manifest's checksum already vouched for the record)."""
    keys = sorted(record) if isinstance(record, dict) else []
    named = [k for k in keys if k != "bytes"]
    if "bytes" not in keys or len(named) != 1 or not re.fullmatch(r"[a-z0-9_]{1,32}", named[0]):
        raise ManifestError(f"files[{name!r}] must be {{<hash name>: <hex digest>, bytes}}")
    algorithm = named[0]
    if algorithm not in HASHES:
        raise ManifestError(
            f"files[{name!r}] is hashed with '{algorithm}', which this build of radiodiff_resume does not "
            f"know (it knows {', '.join(HASHES)}): resume it with the version that wrote it", integrity=False)
    return algorithm


def record_of(data: bytes) -> FileRecord:
    """Size and digest of bytes about to be written (or just read): hashed once, from memory."""
    digest = hasher(HASH)
    digest.update(data)
    return FileRecord(digest=digest.hexdigest(), bytes=len(data), algorithm=HASH)


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a committed folder name ``step-XXXXXXXX``; None for anything else."""
    if name.startswith("step-") and len(name) == 13 and name[5:].isdigit():
        return int(name[5:])
    return None


def probe_from(loss: float, dtype: str, environment: dict[str, str]) -> Probe:
    return Probe(loss=loss, loss_hex=float(loss).hex(), dtype=dtype, environment=environment)
