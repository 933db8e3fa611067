"""``events.jsonl``: one JSON line per checkpoint, guard or signal event, for people and tools."""

from __future__ import annotations

import json
import time
import typing as tp
from pathlib import Path


class EventLog:
    """Appends events from the main process (other ranks hold a disabled log)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def emit(self, event: str, **fields: tp.Any) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), "event": event, **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()

    def read(self) -> list[dict[str, tp.Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
