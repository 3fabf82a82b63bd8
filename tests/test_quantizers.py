"""quant/quantizers.py: clamp fusion observes ReLU6 outputs after the clamp; float_layers leave
their modules unannotated; both quantizers take the same recipe changes."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.quant.calibrate import prepare_calibrated, quantize
from edgepack.quant.emulate import is_observer
from edgepack.quant.recipe import Recipe
from int8_support import SeparableNet, images, sqnr


def _observed_ops(prepared: torch.fx.GraphModule) -> list[str]:
    """The op each activation observer reads (its input node's target)."""
    found = []
    for node in prepared.graph.nodes:
        if node.op == "call_module" and is_observer(prepared.get_submodule(node.target)):
            source = node.args[0]
            if source.op == "call_function":
                found.append(str(source.target))
    return found


def test_clamp_fusion_moves_the_observer_after_relu6():
    model = SeparableNet(nn.ReLU6).eval()
    calibration = images(4, 1)
    stock, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(fuse_clamp=False, calibration_samples=4))
    fused, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(calibration_samples=4))
    # stock: every conv output is observed before the clamp and ReLU6 re-uses that range
    assert sum("conv2d" in op for op in _observed_ops(stock)) == 5
    # fused: the only observer of each conv + ReLU6 pair sits after the clamp
    assert sum("conv2d" in op for op in _observed_ops(fused)) == 0
    assert sum("hardtanh" in op for op in _observed_ops(fused)) == 5


def test_float_layers_stay_unannotated_in_both_quantizers():
    model = SeparableNet(nn.ReLU).eval()
    calibration = images(4, 1)
    for quantizer in ("xnnpack", "litert"):
        everything, _ = prepare_calibrated(model, calibration[0], calibration,
                                           Recipe(quantizer=quantizer, calibration_samples=4))
        kept, _ = prepare_calibrated(model, calibration[0], calibration,
                                     Recipe(quantizer=quantizer, calibration_samples=4, float_layers=("pw",)))
        count = lambda g: sum(is_observer(m) for m in g.modules())  # noqa: E731
        assert count(kept) < count(everything), quantizer


def test_clamp_fusion_and_bias_correction_help_relu6_nets():
    """The stock XNNPACK recipe observes ReLU6 outputs with the conv's pre-activation scale."""
    model = SeparableNet(nn.ReLU6).eval()
    calibration, held_out = images(32, 1), images(16, 2)
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    figures = {}
    for name, options in (("stock", {"fuse_clamp": False, "activation_observer": "histogram",
                                     "bias_correction": False}),
                          ("fused", {"bias_correction": False}), ("default", {})):
        converted, record = quantize(model, calibration[0], calibration, Recipe(**options))
        with torch.no_grad():
            figures[name] = sqnr(reference, [converted(x) for (x,) in held_out])
    assert figures["fused"] > figures["stock"], figures
    assert figures["default"] >= figures["fused"] - 0.5, figures
    assert record["bias_correction"]["corrected_layers"] >= 4
