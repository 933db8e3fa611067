"""The output folder of one evaluation, laid out so that a kill at any moment loses at most the maps in
flight and a re-run finishes the rest:

- ``evaluate.json``: the settings the maps were sampled with; a re-run with other settings is refused;
- ``<img_name>``: one 8-bit PNG per map, written aside and renamed into place (never seen half-written);
- ``records/rank-NNN.jsonl``: one line per map, appended by the process that sampled it *after* its PNG is
  in place, so a map counts as done only when both exist (a line cut by a kill is skipped);
- ``metrics.csv``, ``metrics.json``: every map's values and the summary, written once all maps are done.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import typing as tp
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from radiodiff_resume.errors import UserError
from radiodiff_resume.evaluation.conventions import CONVENTIONS
from radiodiff_resume.evaluation.metrics import FIELDS, summarize
from radiodiff_resume.io import (
    MAX_DOCUMENT_BYTES,
    MAX_LOG_BYTES,
    append_line,
    commit_file,
    is_regular_file,
    json_objects,
    read_regular,
    write_text_atomic,
)
from radiodiff_resume.lock import LOCK_NAME

SETTINGS = "evaluate.json"
RECORDS = "records"
Record = dict[str, tp.Any]


def png_pixels(pred: torch.Tensor) -> np.ndarray:
    """A ``[1, H, W]`` map in [-1, 1] as RadioDiff's ``torchvision.utils.save_image`` stores its [0, 1]
    map: ``x · 255 + 0.5``, clamped to [0, 255], truncated to uint8 (one channel here, where torchvision
    repeats it into three identical RGB channels)."""
    unit = (pred.detach().float().cpu().nan_to_num(0.0).clamp(-1, 1) + 1) / 2
    return unit.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)[0].numpy()


class EvalFolder:
    """One evaluation's folder (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def check_settings(self, settings: tp.Mapping[str, tp.Any]) -> None:
        """Record ``settings`` in a new folder; in one that has them, refuse any difference (its maps
        were sampled with those, and mixing would make one table of two evaluations)."""
        file = self.path / SETTINGS
        if not is_regular_file(file):
            other = sorted(p.name for p in self.path.iterdir() if not p.name.startswith(LOCK_NAME))
            if other:
                more = " …" if len(other) > 3 else ""
                raise UserError(f"{self.path} holds files but no {SETTINGS} ({', '.join(other[:3])}{more}): "
                                "it is not an evaluation's folder; pass a new or empty --out")
            write_text_atomic(file, json.dumps(settings, indent=1, sort_keys=True) + "\n")
            return
        try:
            saved = json.loads(read_regular(file, MAX_DOCUMENT_BYTES))
        except ValueError:
            raise UserError(f"{file} is not valid JSON: this is not a folder of `radiodiff-resume evaluate`; "
                            "pass another --out") from None
        was, now = _flat(saved), _flat(settings)
        changed = [f"{key}: {_show(was.get(key))} → {_show(value)}" for key, value in now.items()
                   if was.get(key) != value]
        changed += [f"{key}: {_show(value)} → (none)" for key, value in was.items() if key not in now]
        if changed:
            raise UserError(f"{self.path} holds an evaluation with other settings ({'; '.join(changed)}): "
                            "run it with the settings it had to finish it, or pass another --out")

    def remove_leftovers(self) -> list[str]:
        """Files a killed process left half-written beside their final names; none may be in flight."""
        names = []
        for folder in (self.path, self.path / RECORDS):
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
                names.append(tmp.name)
        return names

    def records(self) -> dict[int, Record]:
        """Index → the last record of each map whose PNG is in place."""
        found: dict[int, Record] = {}
        for file in sorted((self.path / RECORDS).glob("rank-*.jsonl")):
            for value in json_objects(read_regular(file, MAX_LOG_BYTES)):
                if _is_record(value) and is_regular_file(self.path / value["img_name"]):
                    found[value["index"]] = value
        return found

    def write_map(self, index: int, name: str, pred: torch.Tensor, values: tp.Mapping[str, tp.Any],
                  rank: int) -> None:
        """The PNG of one map, then its record: a map is done only when both are there."""
        final = self.path / name
        tmp = self.path / f".{name}.tmp-{os.getpid()}"
        buffer = io.BytesIO()
        Image.fromarray(png_pixels(pred)).save(buffer, format="PNG")
        tmp.write_bytes(buffer.getvalue())
        commit_file(tmp, final)
        line = json.dumps({"index": index, "img_name": name, **values}, allow_nan=False)
        append_line(self.path / RECORDS / f"rank-{rank:03d}.jsonl", line + "\n")

    def write_tables(self, records: tp.Sequence[Record], document: tp.Mapping[str, tp.Any]) -> None:
        """``metrics.csv`` (one row per map, every value; empty where not finite) and ``metrics.json``
        (``document``, the summary under each convention, every map)."""
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["index", "img_name", *FIELDS])
        for r in records:
            values = ("" if r.get(k) is None else repr(r[k]) for k in FIELDS)
            writer.writerow([r["index"], r["img_name"], *values])
        write_text_atomic(self.path / "metrics.csv", text.getvalue())
        summary = {name: _json_safe(summarize(records, name)) for name in CONVENTIONS}
        body = {**document, "data_range": dict(CONVENTIONS), "summary": summary, "maps": list(records)}
        write_text_atomic(self.path / "metrics.json", json.dumps(body, indent=1, allow_nan=False) + "\n")


def _is_record(value: tp.Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("index"), int)
            and isinstance(value.get("img_name"), str) and Path(value["img_name"]).name == value["img_name"]
            and value["img_name"] not in ("", ".", ".."))


def _flat(mapping: tp.Mapping[str, tp.Any], prefix: str = "") -> dict[str, tp.Any]:
    out: dict[str, tp.Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: tp.Any) -> str:
    return json.dumps(value)


def _json_safe(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {m: {k: (v if math.isfinite(v) else None) for k, v in s.items()} for m, s in summary.items()}
