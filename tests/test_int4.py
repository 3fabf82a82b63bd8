"""quant/int4.py: the int4-weight recipe's weights, GPTQ then mixed int8, shared within a build."""

from __future__ import annotations

import pytest
import torch

from int4_support import mlp, random_samples

from edgepack.errors import ExportError
from edgepack.quant.calibrate import shared_calibration
from edgepack.quant.int4 import calibrated_int4


def test_calibrated_int4_caps_the_samples_and_is_shared_within_a_build():
    model = mlp()
    samples = random_samples(12, seed=5)
    with shared_calibration():
        weights, record = calibrated_int4(model, ["2", "0"], samples, samples[0], 32, calibration_samples=8)
        again, shared = calibrated_int4(model, ["0", "2"], samples, samples[0], 32, calibration_samples=8)
    assert record["weight_algorithm"] == "gptq" and record["calibration_samples"] == 8
    assert "calibration_shared" not in record and shared["calibration_shared"] is True
    assert torch.equal(weights["0"].codes, again["0"].codes)
    with pytest.raises(ExportError, match="no calibration samples"):
        calibrated_int4(model, ["0"], [], samples[0], 32, calibration_samples=8)
    with pytest.raises(ExportError, match="weight_algorithm: rtn"):
        calibrated_int4(model, ["0"], [(torch.zeros(4, 32),)], samples[0], 32, calibration_samples=8)


def test_calibrated_int4_selects_on_the_samples_gptq_did_not_use():
    model, names = mlp(), ["0", "2", "4"]
    calibration = random_samples(12, seed=3)
    _, record = calibrated_int4(model, names, calibration, calibration[0], 32, 8,
                                {"min_cosine": 1.0, "min_sqnr_db": 99.0})
    assert record["calibration_samples"] == 8
    assert record["mixed_int8"]["selection_samples"] == 4
    assert record["mixed_int8"]["selection"] == "calibration samples after GPTQ's"
    _, alone = calibrated_int4(model, names, calibration[:8], calibration[0], 32, 8,
                               {"min_cosine": 1.0, "min_sqnr_db": 99.0})
    assert alone["mixed_int8"]["selection_samples"] == 8 and "optimistic" in alone["mixed_int8"]["selection"]
