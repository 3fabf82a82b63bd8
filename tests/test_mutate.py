"""fuzz/mutate.py: byte and JSON damage, replayable from a seed."""

from __future__ import annotations

import json
import random

import pytest

from edgepack.fuzz.mutate import JSON_MUTATIONS, MUTATIONS, mutate, mutate_json

DOC = json.dumps({"a": {"b": [1, 2, {"c": "x"}]}, "d": 3.5, "e": "text"})


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_byte_mutations_change_data_and_replay(mutation):
    data = bytes(range(256)) * 4
    first = mutate(data, mutation, random.Random(5))
    assert first == mutate(data, mutation, random.Random(5))  # same seed, same damage
    assert first[0] != data and first[1]


@pytest.mark.parametrize("mutation", JSON_MUTATIONS)
def test_json_mutations_change_one_value_and_replay(mutation):
    text, detail = mutate_json(DOC, mutation, random.Random(2))
    assert (text, detail) == mutate_json(DOC, mutation, random.Random(2))
    assert text != DOC and detail
    if mutation == "non-finite":
        assert any(word in text for word in ("NaN", "Infinity"))
    if mutation == "deep-nesting":
        assert text.count("[") >= 100
