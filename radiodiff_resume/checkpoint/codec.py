"""Nested ``state_dict``s ↔ (tensors for safetensors, a JSON tree). No pickle.

A state tree may hold dicts (any scalar keys), lists, tuples, tensors, ints, floats,
bools, strings and None. Tensors become named entries of a safetensors file and are
referenced from the JSON tree; everything else is JSON, with the few types JSON
cannot express (non-string keys, tuples, non-finite floats) tagged.
"""

from __future__ import annotations

import math
import typing as tp

import torch

from radiodiff_resume.errors import UserError

TENSOR, MAP, TUPLE, FLOAT = "__tensor__", "__map__", "__tuple__", "__float__"


class CodecError(UserError):
    """A state holds something this format refuses to store (or a file is inconsistent)."""


def encode(tree: tp.Any, prefix: str = "") -> tuple[tp.Any, dict[str, torch.Tensor]]:
    """Split ``tree`` into a JSON-able tree and the tensors it references."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}  # id(tensor) → name: a tensor referenced twice is stored once
    storages: set[int] = set()

    def walk(node: tp.Any, path: str) -> tp.Any:
        if isinstance(node, torch.Tensor):
            if id(node) in names:
                return {TENSOR: names[id(node)]}
            name = path or "tensor"
            while name in tensors:  # paths that stringify alike ({1: a, "1": b}) stay distinct
                name += "#"
            tensor = node.detach().cpu().contiguous()
            if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()  # views of one storage: safetensors wants them separate
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[name] = tensor
            names[id(node)] = name
            return {TENSOR: name}
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node):
                return {k: walk(v, _join(path, k)) for k, v in node.items()}
            return {MAP: [[_key(k, path), walk(v, _join(path, str(k)))] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {TUPLE: [walk(v, _join(path, str(i))) for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, _join(path, str(i))) for i, v in enumerate(node)]
        if isinstance(node, float) and not math.isfinite(node):
            return {FLOAT: repr(node)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise CodecError(f"cannot store {type(node).__name__} at '{path}' (no pickle in checkpoints)")

    return walk(tree, prefix), tensors


def decode(tree: tp.Any, tensors: tp.Mapping[str, torch.Tensor]) -> tp.Any:
    """Inverse of :func:`encode`."""
    if isinstance(tree, dict):
        if TENSOR in tree:
            name = tree[TENSOR]
            if name not in tensors:
                raise CodecError(f"tensor '{name}' referenced by the checkpoint is missing")
            return tensors[name]
        if MAP in tree:
            return {k: decode(v, tensors) for k, v in tree[MAP]}
        if TUPLE in tree:
            return tuple(decode(v, tensors) for v in tree[TUPLE])
        if FLOAT in tree:
            return float(tree[FLOAT])
        return {k: decode(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    return tree


def _join(path: str, key: str) -> str:
    return f"{path}/{key}" if path else key


def _key(key: tp.Any, path: str) -> tp.Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise CodecError(f"cannot store a {type(key).__name__} dict key at '{path}'")
