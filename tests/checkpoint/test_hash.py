"""The files' hash: XXH3-128 on save, SHA-256 checkpoints of format 2 still read, an unknown hash refused
as a newer build's checkpoint (stop, nothing moved), never as damage (quarantine)."""

from __future__ import annotations

import hashlib
import json
import typing as tp
from pathlib import Path

import pytest
import xxhash

from radiodiff_resume.checkpoint.manifest import MANIFEST, Manifest, ManifestError, checksum
from radiodiff_resume.config import Config
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import (
    STEP2,
    STEP4,
    build,
    events,
    hashes,
    read_manifest,
    sha256_file,
    write_manifest,
)


def test_a_save_records_xxh3_128_of_each_file_as_written(golden: tp.Any) -> None:
    ckpt = golden.results / "checkpoints" / STEP4
    raw = read_manifest(ckpt)
    assert raw["version"] == 3
    for name, record in raw["files"].items():
        assert set(record) == {"xxh3_128", "bytes"}, name
        data = (ckpt / name).read_bytes()
        assert record == {"xxh3_128": xxhash.xxh3_128_hexdigest(data), "bytes": len(data)}, name


def as_format_2(ckpt: Path) -> None:
    """Rewrite the manifest exactly as format 2 wrote it: the data files are the same bytes, each
    record is ``{sha256, bytes}``, the version is 2 and the checksum covers that."""
    raw = read_manifest(ckpt)
    raw["version"] = 2
    raw["files"] = {name: {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
                    for name in raw["files"]}
    write_manifest(ckpt, raw)


def test_a_format_2_checkpoint_hashed_with_sha256_still_resumes(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    for step in (STEP2, STEP4):
        as_format_2(run / "checkpoints" / step)
    trainer = build(run_cfg())

    assert trainer.checkpointer.resume() == run / "checkpoints" / STEP4
    assert trainer.state.step == 4 and events(run, "checkpoint_quarantined") == []
    report = trainer.checkpointer.verify_and_load(run / "checkpoints" / STEP4)
    assert report.ok and {r.algorithm for r in report.checkpoint.manifest.files.values()} == {"sha256"}


def test_a_format_2_checkpoint_with_a_flipped_byte_is_still_caught(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckpt = run / "checkpoints" / STEP4
    as_format_2(ckpt)
    path = ckpt / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    report = build(run_cfg()).checkpointer.verify_and_load(ckpt)

    assert report.damaged and "optimizer.safetensors sha256 mismatch" in report.levels["structure"].detail


def test_an_unknown_hash_is_a_newer_builds_checkpoint_refused_in_one_line_and_never_moved(
    run: Path, run_cfg: tp.Callable[..., Config]
) -> None:
    ckpt = run / "checkpoints" / STEP4
    raw = read_manifest(ckpt)
    record = raw["files"]["model.safetensors"]
    digest = next(v for k, v in record.items() if k != "bytes")
    raw["files"]["model.safetensors"] = {"blake9": digest, "bytes": record["bytes"]}
    write_manifest(ckpt, raw)
    before = hashes(run / "checkpoints")

    with pytest.raises(UserError) as info:
        build(run_cfg()).checkpointer.resume()

    message = str(info.value)
    assert "(nothing was moved)" in message and str(ckpt) in message
    [line] = [ln for ln in message.splitlines() if "blake9" in ln]
    assert "files['model.safetensors'] is hashed with 'blake9', which this build" in line
    assert hashes(run / "checkpoints") == before and events(run, "checkpoint_quarantined") == []
    assert not (run / "checkpoints" / "quarantine").exists()


MALFORMED = r"must be \{<hash name>: <hex digest>, bytes\}"


@pytest.mark.parametrize(("record", "expected"), [
    ({"xxh3_128": "ab" * 32, "bytes": 1}, r"files\['a.json'\].xxh3_128 is not a xxh3_128 hex digest"),
    ({"sha256": "ab" * 16, "bytes": 1}, r"files\['a.json'\].sha256 is not a sha256 hex digest"),
    ({"sha256": "ab" * 32, "xxh3_128": "ab" * 16, "bytes": 1}, MALFORMED),
    ({"Bad Name": "ab", "bytes": 1}, MALFORMED),
    ({"xxh3_128": "ab" * 16}, MALFORMED),
], ids=["xxh3-too-long", "sha-too-short", "two-hashes", "not-a-name", "no-bytes"])
def test_a_malformed_record_is_damage(golden: tp.Any, record: dict[str, tp.Any], expected: str) -> None:
    raw = read_manifest(golden.results / "checkpoints" / STEP4)
    raw["files"]["a.json"] = record
    body = {k: v for k, v in raw.items() if k != "checksum"}

    with pytest.raises(ManifestError, match=expected) as info:
        Manifest.from_json(json.dumps({**body, "checksum": checksum(body)}))
    assert info.value.integrity


def test_a_manifest_read_from_format_2_is_written_back_as_format_3_with_its_sha256_records(
    golden: tp.Any, tmp_path: Path
) -> None:
    (tmp_path / MANIFEST).write_bytes((golden.results / "checkpoints" / STEP4 / MANIFEST).read_bytes())
    raw = read_manifest(tmp_path)
    raw["version"] = 2
    raw["files"] = {n: {"sha256": hashlib.sha256(n.encode()).hexdigest(), "bytes": 1} for n in raw["files"]}
    write_manifest(tmp_path, raw)

    again = json.loads(Manifest.from_json((tmp_path / MANIFEST).read_bytes()).to_json())

    assert again["version"] == 3 and again["files"] == raw["files"]
