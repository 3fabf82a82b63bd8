"""quant/emulate.py: observers become switches grouped into named layers in network order; a
switch is the identity when off and the observer's int8 fake-quantize when on."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.quant.calibrate import prepare_calibrated
from edgepack.quant.emulate import Switch, instrument, is_observer
from edgepack.quant.recipe import Recipe
from int8_support import SeparableNet, images


def test_layers_are_named_by_module_in_network_order():
    model = SeparableNet(nn.ReLU).eval()
    calibration = images(4, 1)
    prepared, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(calibration_samples=4))
    layers = instrument(prepared)
    names = [layer.name for layer in layers]
    weighted = [layer.float_layer for layer in layers if layer.float_layer]
    assert weighted == ["stem", "dw", "pw", "dw2", "pw2", "fc"]
    assert names[0].startswith("<input") and [layer.index for layer in layers] == list(range(len(layers)))
    assert not any(is_observer(m) for m in prepared.modules())  # every observer is a switch now
    assert all(isinstance(s, Switch) for layer in layers for s in layer.switches)
    assert instrument(prepared)[3].name == layers[3].name  # instrumenting twice finds the same layers


def test_switch_is_identity_off_and_int8_on():
    model = SeparableNet(nn.ReLU).eval()
    calibration = images(4, 1)
    prepared, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(calibration_samples=4))
    layers = instrument(prepared)
    x = calibration[0][0]
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)  # all off: the float model
        for layer in layers:
            for s in layer.switches:
                s.enabled = True
        quantized = prepared(x)
    assert not torch.equal(quantized, model(x))
    probe = layers[1].probe
    values = (probe.seen[1] / probe.scale).flatten()
    assert torch.allclose(values, values.round(), atol=1e-3)  # outputs sit on the int8 grid
