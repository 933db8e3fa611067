"""``events.jsonl``: one JSON line per checkpoint, guard or signal event, for people and tools."""

from __future__ import annotations

import json
import time
import typing as tp
from pathlib import Path

from radiodiff_resume.io import MAX_LOG_BYTES, append_line, json_objects, read_regular


class EventLog:
    """Appends events from the main process (other ranks hold a disabled log)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def emit(self, event: str, **fields: tp.Any) -> None:
        """Append one record; a link, FIFO or folder in the log's place is refused, never written through."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": round(time.time(), 3), "event": event, **fields}
        append_line(self.path, json.dumps(record, default=str) + "\n")

    def read(self) -> list[dict[str, tp.Any]]:
        """The records so far; a line that is not a JSON object (a torn last line) is skipped."""
        try:
            data = read_regular(self.path, MAX_LOG_BYTES)
        except FileNotFoundError:
            return []
        return json_objects(data)
