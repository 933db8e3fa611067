"""The no-pickle codec: nested state trees ↔ JSON + safetensors, exactly."""

from __future__ import annotations

import copy
import json
import math
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from radiodiff_resume.checkpoint.codec import CodecError, decode, encode
from radiodiff_resume.errors import UserError
from tests.checkpoint.helpers import read_component, tensor_equal_trees, write_component


def assert_identical(a: tp.Any, b: tp.Any, path: str = "<root>") -> None:
    """Exact equality that also checks container/scalar types, key types, dtypes and NaN bit patterns."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}"
        bits_a = a.contiguous().reshape(-1).view(torch.uint8)
        bits_b = b.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(bits_a, bits_b), f"{path}: tensor values differ"
    elif isinstance(a, dict):
        # Key order is not part of the contract (string-keyed JSON objects are written sorted).
        typed_a = {(type(k), k) for k in a}
        typed_b = {(type(k), k) for k in b}
        assert typed_a == typed_b, f"{path}: keys {sorted(map(repr, a))} vs {sorted(map(repr, b))}"
        for key, value in a.items():
            assert_identical(value, b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan became {b!r}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def nested_tree() -> dict[str, tp.Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "int_keys": {0: "zero", 7: [1, 2], -3: None},
        "scalar_keys": {2.5: "float key", None: "none key", True: "bool key"},
        "tuples": (1, "x", (2.5, None), ()),
        "lists": [True, False, None, "s", 3, -0.0, 1e-300, [], {}],
        "floats": {"inf": math.inf, "ninf": -math.inf, "nan": math.nan, "plain": 0.1},
        "bool_vs_int": [True, 1, False, 0],
        "tensors": {
            "f32": torch.randn(3, 4, generator=g),
            "f64": torch.randn(5, generator=g, dtype=torch.float64),
            "f16": torch.randn(2, 2, generator=g).half(),
            "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
            "u8": torch.randint(0, 256, (17,), generator=g, dtype=torch.uint8),
            "i64": torch.randint(-(2**62), 2**62, (3,), generator=g, dtype=torch.int64),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.25),
            "empty": torch.zeros(0, 4),
            "nonfinite": torch.tensor([math.inf, -math.inf, math.nan, 1.0]),
            "non_contiguous": torch.arange(12.0).reshape(3, 4).t(),
        },
        "deep": {"a": [{"b": ({1: torch.ones(2, dtype=torch.int32)},)}]},
    }


def test_nested_tree_round_trips_exactly_in_memory() -> None:
    tree = nested_tree()
    structure, tensors = encode(tree)
    assert len(tensors) == 12
    assert all(t.is_contiguous() for t in tensors.values())
    back = decode(json.loads(json.dumps(structure)), tensors)
    assert_identical(tree, back)


def test_nested_tree_round_trips_exactly_through_files(tmp_path: Path) -> None:
    tree = nested_tree()
    written = write_component(tmp_path, "state", tree)
    assert sorted(p.name for p in written) == ["state.json", "state.safetensors"]
    assert all(p.parent == tmp_path and p.is_file() for p in written)

    def no_constants(token: str) -> tp.NoReturn:
        raise AssertionError(f"non-standard JSON constant {token} in state.json")

    json.loads((tmp_path / "state.json").read_text(), parse_constant=no_constants)
    assert_identical(tree, read_component(tmp_path, "state"))


def test_a_tree_without_tensors_writes_no_safetensors_file(tmp_path: Path) -> None:
    written = write_component(tmp_path, "lr", {"last_epoch": 3, "lrs": (0.1, math.nan)})
    assert [p.name for p in written] == ["lr.json"]
    assert not (tmp_path / "lr.safetensors").exists()
    assert_identical(read_component(tmp_path, "lr"), {"last_epoch": 3, "lrs": (0.1, math.nan)})


@pytest.mark.parametrize(
    ("tree", "path", "kind"),
    [
        ({"opt": {"state": {0: {"weird": object()}}}}, "opt/state/0/weird", "object"),
        ({"x": [1, np.zeros(3)]}, "x/1", "ndarray"),
        ({"rng": (np.float32(1.0),)}, "rng/0", "float32"),
        ({"a": {"b": {1, 2}}}, "a/b", "set"),
        ({"groups": {(1, 2): "tuple key"}}, "groups", "tuple"),
    ],
    ids=["object", "numpy-array", "numpy-scalar", "set", "tuple-key"],
)
def test_unsupported_values_raise_codec_error_naming_the_path(tree: tp.Any, path: str, kind: str) -> None:
    with pytest.raises(CodecError) as info:
        encode(tree)
    assert f"'{path}'" in str(info.value)
    assert kind in str(info.value)
    assert isinstance(info.value, UserError)


def test_unsupported_value_fails_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match="'bad/0'"):
        write_component(tmp_path, "thing", {"ok": torch.ones(2), "bad": [object()]})
    assert list(tmp_path.iterdir()) == []


def test_a_reference_to_a_missing_tensor_is_a_codec_error() -> None:
    structure, tensors = encode({"w": torch.ones(2), "v": torch.zeros(1)})
    del tensors["w"]
    with pytest.raises(CodecError, match="tensor 'w' .* missing"):
        decode(structure, tensors)


def test_adamw_state_round_trips_and_loads_into_a_fresh_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    x = torch.randn(5, 2, 6, 6)
    model(x).square().mean().backward()
    opt.step()
    twin.load_state_dict(model.state_dict())
    saved = opt.state_dict()
    assert saved["state"] and all(isinstance(k, int) for k in saved["state"])

    written = write_component(tmp_path, "optimizer", saved)
    assert sorted(p.name for p in written) == ["optimizer.json", "optimizer.safetensors"]
    loaded = read_component(tmp_path, "optimizer")
    assert tensor_equal_trees(loaded, saved)
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)

    fresh = torch.optim.AdamW(twin.parameters(), lr=0.5)
    fresh.load_state_dict(loaded)
    assert tensor_equal_trees(fresh.state_dict(), opt.state_dict())
    assert_identical(fresh.state_dict(), opt.state_dict())

    # One more identical step on both: bit-identical parameters.
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


# ----- known defects --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tree",
    [
        {"m": {1: torch.ones(2), "1": torch.zeros(2)}},
        {"a/b": torch.ones(2), "a": {"b": torch.zeros(2)}},
    ],
    ids=["int-and-str-key", "slash-in-key"],
)
def test_colliding_tensor_paths_keep_both_tensors(tmp_path: Path, tree: dict[str, tp.Any]) -> None:
    write_component(tmp_path, "c", tree)
    assert_identical(read_component(tmp_path, "c"), tree)


def test_a_tensor_referenced_twice_round_trips(tmp_path: Path) -> None:
    shared = torch.arange(4.0)
    tree = {"encoder": {"embed": shared}, "decoder": {"embed": shared}}
    write_component(tmp_path, "tied", tree)
    assert_identical(read_component(tmp_path, "tied"), tree)


def test_our_safetensors_writer_is_read_back_exactly_by_the_library(tmp_path: Path) -> None:
    """Every dtype the writer knows, 0-d, empty and mixed sizes (alignment), read by safetensors itself;
    the record is the XXH3-128 of the file as written."""
    import xxhash
    from safetensors.torch import load_file

    from radiodiff_resume.checkpoint.files import SAFETENSORS_DTYPES, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {f"t_{str(d).split('.')[-1]}": (torch.randn(3, 5, generator=g) * 50).to(d)
               for d in SAFETENSORS_DTYPES}
    tensors |= {"scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.zeros(0, 4),
                "odd": torch.arange(3, dtype=torch.uint8)}
    record = write_safetensors(tmp_path / "t.safetensors", tensors, {"component": "t"})
    data = (tmp_path / "t.safetensors").read_bytes()
    assert (record.bytes, record.algorithm) == (len(data), "xxh3_128")
    assert record.digest == xxhash.xxh3_128_hexdigest(data)
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k

    with pytest.raises(CodecError, match="'c' of dtype torch.complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)}, {})
