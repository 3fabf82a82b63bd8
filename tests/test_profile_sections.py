"""profile_sections.py: the strict sections a target profile is made of."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgepack.profile_sections import Budgets, DeviceSpec, Tolerance

DEVICE = {"arch": "x86_64", "cores": 2, "threads": 2, "peak_gops": {"fp32": 10.0}, "memory_gbps": 10.0,
          "ram_mb": 1000}


def test_device_int8_isa_is_a_known_word_and_says_whether_vnni_is_there():
    assert DeviceSpec(**DEVICE, int8_isa=["avx2", "avx512_vnni"]).has_vnni
    assert not DeviceSpec(**DEVICE, int8_isa=["avx2"]).has_vnni
    assert not DeviceSpec(**DEVICE).has_vnni
    with pytest.raises(ValidationError, match="int8_isa"):
        DeviceSpec(**DEVICE, int8_isa=["sse9"])


def test_a_tolerance_sets_a_threshold_and_atol_goes_with_rtol():
    with pytest.raises(ValidationError, match="at least one threshold"):
        Tolerance()
    with pytest.raises(ValidationError):
        Tolerance(atol=1e-4)
    assert Tolerance(min_cosine=0.99).min_cosine == 0.99


def test_unknown_keys_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        Budgets(max_bytes=10, bogus=1)
