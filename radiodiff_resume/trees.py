"""Nested config mappings seen as dotted keys: what the config diff and the RadioDiff translation read."""

from __future__ import annotations

import typing as tp


def leaves(tree: tp.Mapping[str, tp.Any], prefix: str = "") -> dict[str, tp.Any]:
    """Dotted key → value of every leaf (an empty mapping is a leaf too), in the tree's order."""
    out: dict[str, tp.Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{path}."))
        else:
            out[path] = value
    return out
