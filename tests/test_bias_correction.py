"""quant/bias_correction.py: the int8 graph's biases absorb the mean shift quantization causes,
per output channel (the last dim for linears over a sequence), and only the quantized graph's."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.quant.bias_correction import bias_correct, bias_nodes
from edgepack.quant.calibrate import prepare_calibrated, quantize
from edgepack.quant.graph import attr
from edgepack.quant.recipe import Recipe
from int8_support import SeparableNet, images, sqnr
from test_tiny_encoder import SequenceMLP, _sequences


def test_bias_correct_changes_only_the_prepared_graph_biases():
    model = SeparableNet(nn.ReLU).eval()
    calibration = images(8, 1)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    prepared, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(per_channel=False,
                                                                                calibration_samples=8))
    paths = [path for _, path in bias_nodes(prepared)]
    original = {path: attr(prepared, path).detach().clone() for path in paths}
    record = bias_correct(prepared, calibration)
    assert record["corrected_layers"] == len(paths) >= 4 and record["samples"] == 8
    moved = [path for path in paths if not torch.equal(attr(prepared, path), original[path])]
    assert moved and record["largest_mean_shift_removed"] > 0
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


def test_bias_correction_on_linears_over_a_sequence():
    """Linears over [B, S, H] have their bias on the last dim: bias correction must average
    over batch and sequence (it once averaged over dim 1 and crashed on a BERT encoder)."""
    model = SequenceMLP().eval()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    calibration, held_out = _sequences(16, 1), _sequences(8, 2)
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    figures = {}
    for corrected in (False, True):
        converted, record = quantize(model, calibration[0], calibration,
                                     Recipe(per_channel=False, activation_observer="minmax", bias_correction=corrected))
        with torch.no_grad():
            got = [converted(x) for (x,) in held_out]
        # the mean error per output feature, over samples and positions: what bias correction removes
        shift = torch.stack([(g - r).mean(dim=(0, 1)) for g, r in zip(got, reference)]).mean(dim=0)
        figures[corrected] = (float(shift.abs().max()), sqnr(reference, got))
        if corrected:
            assert record["bias_correction"]["corrected_layers"] == 2
            assert converted.state_dict()[next(k for k in converted.state_dict() if k.endswith("bias"))].dim() == 1
    assert figures[True][0] < figures[False][0], figures
    assert figures[True][1] > 25.0, figures
    # the corrected biases live in the quantized graph only: the float model is untouched (they
    # share tensors, and the correction once wrote into them, shifting every later export)
    assert all(torch.equal(tensor, original[name]) for name, tensor in model.state_dict().items())


def test_every_way_to_get_the_float_means_gives_the_lockstep_biases_bit_for_bit():
    """The float figures recorded while calibrating, or a float pass before the int8 lockstep (each
    holding half the activations at once), correct the biases exactly as running float and int8
    in lockstep does."""
    import copy

    from edgepack.quant.calibrate import _calibrated

    model = SeparableNet(nn.ReLU6).eval()
    calibration = images(6, 3)
    recipe = Recipe(calibration_samples=6)
    recorded, used, means = _calibrated(model, calibration[0], calibration, recipe, record_means=6)
    assert used == 6 and means and all(len(v) == 6 for v in means.values())
    float_first, _ = prepare_calibrated(model, calibration[0], calibration, recipe)
    lockstep = copy.deepcopy(float_first)
    records = [bias_correct(recorded, calibration, float_means=means), bias_correct(float_first, calibration),
               bias_correct(lockstep, calibration, float_in_lockstep=True)]
    assert records[0] == records[1] == records[2] and records[0]["corrected_layers"] >= 4
    paths = [path for _, path in bias_nodes(lockstep)]
    for graph in (recorded, float_first):
        assert all(torch.equal(attr(graph, p), attr(lockstep, p)) for p in paths)
