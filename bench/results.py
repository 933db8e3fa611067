"""``bench/RESULTS.md`` is shared by the benches: each one replaces only its own section.

A section lies between two marker comments on lines of their own::

    <!-- bench_checkpoint:begin -->
    ...
    <!-- bench_checkpoint:end -->

Everything outside a bench's own markers (the other sections, any text between them) is
kept byte for byte. A missing file is created; a missing section is inserted in the order of
``ORDER``. A file without any marker (written before there were sections) is taken as the
section of ``LEGACY_OWNER``. Markers that do not pair up are an error, never guessed at.
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from pathlib import Path

ORDER = ("headline", "bench_checkpoint", "bench_hash", "bench_guard", "bench_requeue", "bench_network")
"""Where a new section goes: sections keep this order (unknown names come last)."""
LEGACY_OWNER = "bench_checkpoint"
"""Owner of a file that has no markers yet (bench_checkpoint wrote the whole file before)."""

MARKER = re.compile(r"^<!-- ([A-Za-z0-9_.-]+):(begin|end) -->[ \t]*$", re.MULTILINE)

Piece = tuple[str | None, str]
"""``(section name, content)``; name None for text outside every section."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def split_sections(text: str) -> list[Piece]:
    """The file as pieces, in order; :func:`join_sections` gives ``text`` back (a file without
    markers comes back wrapped in its legacy owner's markers)."""
    if not MARKER.search(text):
        return [(LEGACY_OWNER, "\n" + text.strip("\n") + "\n")] if text.strip() else []
    pieces: list[Piece] = []
    pos, open_name, seen = 0, None, set()
    for m in MARKER.finditer(text):
        name, kind = m.groups()
        if kind == "begin":
            if open_name is not None:
                raise ValueError(f"section {name!r} begins inside section {open_name!r}")
            if name in seen:
                raise ValueError(f"section {name!r} appears twice")
            pieces.append((None, text[pos:m.start()]))
            open_name = name
        else:
            if open_name != name:
                raise ValueError(f"end marker of {name!r} without its begin marker")
            pieces.append((name, text[pos:m.start()]))
            seen.add(name)
            open_name = None
        pos = m.end()
    if open_name is not None:
        raise ValueError(f"section {open_name!r} has no end marker")
    pieces.append((None, text[pos:]))
    return [(name, content) for name, content in pieces if name is not None or content]


def join_sections(pieces: list[Piece]) -> str:
    out = []
    for name, content in pieces:
        if name is None:
            out.append(content)
        else:
            begin, end = markers(name)
            out.append(f"{begin}{content}{end}")
    return "".join(out)


def _rank(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` holding ``body`` (added where it belongs when missing)."""
    content = "\n" + body.strip("\n") + "\n"
    pieces = split_sections(text)
    names = [n for n, _ in pieces if n is not None]
    if name in names:
        pieces = [(n, content if n == name else c) for n, c in pieces]
    else:
        later = [i for i, (n, _) in enumerate(pieces) if n is not None and _rank(n) > _rank(name)]
        if later:
            i = later[0]
            pieces[i:i] = [(name, content), (None, "\n\n")]
        else:
            if pieces:
                pieces.append((None, "\n\n"))
            pieces.append((name, content))
    return join_sections(pieces).rstrip("\n") + "\n"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section ``name`` of ``path`` by ``body`` (atomically: a reader never sees half a file)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    new = replace_section(text, name, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cpu_model() -> str:
    """The CPU's model name, for the machine line of each section."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
