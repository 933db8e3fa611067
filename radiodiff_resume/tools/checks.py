"""The result of an inspection: named checks, each ok / warn / FAIL / skipped, as a table or JSON.

Exit status: 0 when no check failed (warnings are facts worth reading, not failures), 1 otherwise.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import typing as tp
from dataclasses import asdict, dataclass

OK, WARN, FAIL, SKIPPED = "ok", "warn", "FAIL", "skipped"


@dataclass
class Check:
    name: str
    status: str
    detail: str


class Checks(list[Check]):
    """Checks in the order they ran."""

    def add(self, name: str, status: str, detail: str) -> Check:
        self.append(Check(name, status, detail))
        return self[-1]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self)

    def table(self, width: int | None = None) -> str:
        """Aligned columns; long details wrap under their own column."""
        width = width or max(80, shutil.get_terminal_size((120, 20)).columns)
        name_w = max([len("check"), *(len(c.name) for c in self)])
        status_w = max(len("status"), *(len(s) for s in (OK, WARN, FAIL, SKIPPED)))
        detail_w = max(30, width - name_w - status_w - 4)
        lines = [f"{'check':<{name_w}}  {'status':<{status_w}}  detail",
                 f"{'-' * name_w}  {'-' * status_w}  {'-' * min(detail_w, 40)}"]
        for c in self:
            wrapped = textwrap.wrap(c.detail, detail_w, break_on_hyphens=False, break_long_words=False)
            wrapped = wrapped or [""]
            lines.append(f"{c.name:<{name_w}}  {c.status:<{status_w}}  {wrapped[0]}")
            lines += [f"{'':<{name_w}}  {'':<{status_w}}  {more}" for more in wrapped[1:]]
        return "\n".join(lines)

    def document(self, **fields: tp.Any) -> str:
        """One JSON document: ``fields``, every check, and whether all passed."""
        body = {**fields, "passed": not self.failed, "checks": [asdict(c) for c in self]}
        return json.dumps(body, indent=1)
