"""quant/observers.py: every activation observer picks its own ranges; MSE clips a lone outlier."""

from __future__ import annotations

import math

import torch
from torch import nn

from edgepack.quant.observers import observer_classes
from edgepack.quant.recipe import ACTIVATION_OBSERVERS, Recipe
from int8_support import SeparableNet, images


def test_every_recipe_observer_has_a_class():
    assert set(observer_classes()) == set(ACTIVATION_OBSERVERS)


def test_mse_trades_a_clipped_outlier_for_finer_steps():
    """A Gaussian bulk with one value at 20 sigma: min/max stretches the range to it; MSE clips a
    little (its search always sees each sample's tails) and the int8 round trip loses less."""
    classes = observer_classes()
    data = torch.randn(8, 16384, generator=torch.Generator().manual_seed(0))
    data[0, 0] = 20.0
    figures = {}
    for name in ("minmax", "mse"):
        cls, arguments = classes[name]
        observer = cls(eps=2 ** -12, **arguments)
        for row in data:
            observer(row)
        scale, zero_point = observer.calculate_qparams()
        assert observer.calculate_qparams()[0] == scale  # asked again (bias correction, convert): same answer
        error = torch.fake_quantize_per_tensor_affine(data, float(scale), int(zero_point), 0, 255) - data
        figures[name] = (float(scale), float((error ** 2).mean()))
    assert figures["mse"][0] < 0.95 * figures["minmax"][0], figures  # measured 0.086 vs 0.096
    assert figures["mse"][1] < 0.9 * figures["minmax"][1], figures  # measured 15% less error


def test_every_observer_chooses_its_own_ranges():
    from edgepack.quant.calibrate import prepare_calibrated
    from edgepack.quant.emulate import is_observer

    model = SeparableNet(nn.ReLU6).eval()
    calibration = images(8, 1)
    chosen = {}
    for observer in ("minmax", "moving-average", "histogram", "percentile", "mse"):
        prepared, used = prepare_calibrated(model, calibration[0], calibration,
                                            Recipe(activation_observer=observer, calibration_samples=8))
        assert used == 8
        scales = [float(m.calculate_qparams()[0].flatten()[0]) for _, m in sorted(prepared.named_modules())
                  if is_observer(m) and m.qscheme == torch.per_tensor_affine]
        assert scales and all(math.isfinite(v) and v > 0 for v in scales), observer
        chosen[observer] = tuple(round(v, 7) for v in scales)
    assert len(set(chosen.values())) == 5, chosen


def test_mse_settle_keeps_the_searched_range_and_drops_the_kept_values():
    """settle() (end of calibration) runs the search once and frees the values it kept: the same
    qparams as searching at convert, also from a deep copy (the shared calibration, the bias
    correction's probe); observing after it is refused."""
    import copy

    import pytest

    cls, arguments = observer_classes()["mse"]
    data = torch.randn(6, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 3.0 + 0.5
    data[2, 0, 0, 0] = 40.0
    reference, settled = cls(eps=2 ** -12, **arguments), cls(eps=2 ** -12, **arguments)
    for sample in data:
        reference(sample)
        settled(sample)
    settled.settle()
    assert settled._kept == [] and reference._kept
    scale, zero_point = reference.calculate_qparams()
    for observer in (settled, copy.deepcopy(settled)):
        got_scale, got_zero = observer.calculate_qparams()
        assert torch.equal(got_scale, scale) and torch.equal(got_zero, zero_point)
    with pytest.raises(RuntimeError, match="settled"):
        settled(data[0])
    empty = cls(eps=2 ** -12, **arguments)  # never observed: the min/max fallback, as before
    empty.settle()
    assert torch.equal(empty.calculate_qparams()[0], cls(eps=2 ** -12, **arguments).calculate_qparams()[0])


def test_calibration_settles_the_mse_observers():
    from edgepack.quant.calibrate import prepare_calibrated

    model = SeparableNet(nn.ReLU6).eval()
    calibration = images(4, 1)
    prepared, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(calibration_samples=4))
    observers = [m for m in prepared.modules() if hasattr(m, "settle")]
    assert observers and all(m._settled and not m._kept and m._qparams is not None for m in observers)
