"""compress/equalize.py: cross-layer equalization keeps the float function and helps int8."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from edgepack.compress import registry
from edgepack.compress.equalize import EqualizeConfig
from edgepack.compress.equalize import run as equalize
from edgepack.quant.calibrate import quantize
from edgepack.quant.recipe import Recipe
from int8_support import SeparableNet, images, sqnr, stage_ctx


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_equalize_preserves_float_outputs(act):
    model = SeparableNet(act).eval()
    calibration, held_out = images(16, 1), images(16, 2)
    equalized, details = equalize(EqualizeConfig(), model, stage_ctx(calibration))
    with torch.no_grad():
        for (x,) in held_out:
            before, after = model(x), equalized(x)
            assert float((after - before).abs().max()) <= 1e-4 * float(before.abs().max())
    if act is nn.ReLU:
        assert len(details["pairs"]) == 5, details  # stem-dw, dw-pw, pw-dw2, dw2-pw2, pw2-fc (via the pool)
    else:  # exact mode leaves pairs joined by ReLU6 alone and says so
        assert details["pairs"] == [] and len(details["skipped"]) == 5
        assert all("clip at 6" in reason for reason in details["skipped"])
    assert model.dw.weight is not equalized.dw.weight  # the stage works on a copy


def test_equalize_improves_int8():
    model = SeparableNet(nn.ReLU).eval()
    calibration, held_out = images(32, 1), images(16, 2)
    equalized, _ = equalize(EqualizeConfig(), model, stage_ctx(calibration))
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    figures = {}
    for name, candidate in (("plain", model), ("equalized", equalized)):
        converted, _ = quantize(candidate, calibration[0], calibration, Recipe(per_channel=False,
                                                                               bias_correction=False))
        with torch.no_grad():
            figures[name] = sqnr(reference, [converted(x) for (x,) in held_out])
    assert figures["equalized"] > figures["plain"] + 1.5, figures  # measured: 32.1 -> 35.0 dB


def test_equalize_is_registered_validated_and_round_trips():
    entry = registry()["equalize"]
    assert entry.config is EqualizeConfig
    with pytest.raises(ValidationError, match="headroom only applies"):
        EqualizeConfig(headroom=0.5)
    config = EqualizeConfig(relu6="calibrated", headroom=0.5, iterations=2)
    assert EqualizeConfig.model_validate(config.model_dump(mode="json")) == config
    with pytest.raises(ValidationError):
        EqualizeConfig.model_validate({"type": "equalize", "unknown": 1})


def test_equalize_calibrated_relu6_keeps_calibration_outputs():
    model = SeparableNet(nn.ReLU6).eval()
    calibration = images(16, 1)
    equalized, details = equalize(EqualizeConfig(relu6="calibrated"), model, stage_ctx(calibration))
    assert any(p["activation"] == "relu6" for p in details["pairs"])
    with torch.no_grad():
        for (x,) in calibration:
            before, after = model(x), equalized(x)
            assert float((after - before).abs().max()) <= 1e-4 * float(before.abs().max())
