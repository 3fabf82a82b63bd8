"""Judging outputs computed elsewhere against a bundle's golden data: bit-for-bit agreement with the
build host's outputs (validate and the arm64 check share it)."""

from __future__ import annotations

import numpy as np

from edgepack.runtimes.base import TensorIO
from edgepack.steps.golden import agreement

SPECS = [TensorIO(name="logits", shape=[1, 3], dtype="int8", scale=0.1, zero_point=0)]


def _rows(values):
    return [[np.asarray(v, dtype=np.int8).reshape(1, 3)] for v in values]


def test_identical_outputs_are_identical_every_value():
    host = {"logits": np.asarray([[[1, 2, 3]], [[4, 5, 6]]], dtype=np.int8)}
    result = agreement(_rows([[1, 2, 3], [4, 5, 6]]), host, SPECS)
    assert result == {"identical": True, "outputs": [{"name": "logits", "identical": True, "max_abs_diff": 0.0,
                                                      "non_finite_diffs": 0, "mismatched_values": 0, "values": 6}]}


def test_one_value_off_by_one_step_is_not_identical_and_says_how_far():
    host = {"logits": np.asarray([[[1, 2, 3]], [[4, 5, 6]]], dtype=np.int8)}
    (row,) = agreement(_rows([[1, 2, 3], [4, 5, 7]]), host, SPECS)["outputs"]
    assert not row["identical"] and row["max_abs_diff"] == 1.0 and row["mismatched_values"] == 1


def test_a_shape_change_and_non_finite_values_are_reported_not_raised():
    host = {"logits": np.zeros((2, 1, 3), dtype=np.int8)}
    (row,) = agreement(_rows([[0, 0, 0]]), host, SPECS)["outputs"]
    assert not row["identical"] and "shape" in row["detail"]
    floats = [TensorIO(name="y", shape=[2], dtype="float32")]
    (row,) = agreement([[np.asarray([np.nan, 1.0], dtype=np.float32)]], {"y": np.asarray([[0.0, 1.0]])}, floats)["outputs"]
    assert not row["identical"] and row["non_finite_diffs"] == 1 and row["max_abs_diff"] == 0.0
