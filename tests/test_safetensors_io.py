"""Tagged safetensors files: round trip, header-only reads, refusals."""

import pytest
import torch

from condlora.core.errors import DataError
from condlora.core.safetensors_io import read_weights, write_weights


def test_round_trip_and_header_only(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.tensor([1, 2])}  # a: strided
    write_weights(path, tensors, {"format": "demo-1", "note": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left
    meta, back = read_weights(path, "demo-1", "demo file", DataError)
    assert meta == {"format": "demo-1", "note": "x"}
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert read_weights(path, "demo-1", "demo file", DataError, tensors=False) == (meta, {})


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(DataError, match="demo file not found"):
        read_weights(tmp_path / "none.safetensors", "demo-1", "demo file", DataError)
    path = tmp_path / "w.safetensors"
    write_weights(path, {"a": torch.zeros(1)}, {"format": "other"})
    with pytest.raises(DataError, match="is not a demo file"):
        read_weights(path, "demo-1", "demo file", DataError)


def test_describe_mismatch():
    from condlora.core.safetensors_io import describe_mismatch

    expected = {f"k{i}": torch.zeros(2) for i in range(5)} | {"opt": torch.zeros(())}
    assert describe_mismatch(expected, dict(expected)) == ""
    given = {"k0": torch.zeros(3), "x": torch.zeros(1)}
    assert describe_mismatch(expected, given, optional=["opt"]) == (
        "missing (4): k1, k2, k3, ...; unexpected (1): x; shape mismatches (1): k0 (3,) != (2,)"
    )
    assert (
        describe_mismatch(expected, {k: v for k, v in expected.items() if k != "opt"}, ["opt"])
        == ""
    )
