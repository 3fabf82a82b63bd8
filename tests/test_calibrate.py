"""quant/calibrate.py: capture (eval dropout removed), calibration batches split to the example's
shape and capped, static int8 needs calibration data, and the converted graph tracks float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgepack.quant.calibrate import calibration_batches, capture, prepare_calibrated, quantize
from edgepack.quant.recipe import Recipe
from int8_support import ChainedResidual, SeparableNet, images, sqnr
from test_tflite import DropoutHead, _inputs


def test_calibration_batches_split_a_batch_and_stop_at_the_limit():
    example = (torch.zeros(1, 3, 4, 4),)
    batch = (torch.randn(5, 3, 4, 4),)
    got = list(calibration_batches([example, batch, batch], example, limit=4))
    assert len(got) == 4 and all(t[0].shape == (1, 3, 4, 4) for t in got)
    torch.testing.assert_close(got[1][0], batch[0][:1])
    with pytest.raises(ValueError, match="calibration sample 1 has input shapes"):
        list(calibration_batches([example, (torch.zeros(2, 3, 5, 5),)], example, limit=8))
    with pytest.raises(ValueError, match="has 2 inputs"):
        list(calibration_batches([(example[0], example[0])], example, limit=8))


def test_static_int8_needs_calibration_and_dynamic_does_not():
    model = SeparableNet(nn.ReLU).eval()
    example = images(1, 1)[0]
    with pytest.raises(ValueError, match="needs calibration data"):
        prepare_calibrated(model, example, [], Recipe())
    _, used = prepare_calibrated(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(1, 4),), [],
                                 Recipe(dynamic=True))
    assert used == 0


def test_quantize_tracks_the_float_model():
    model = SeparableNet(nn.ReLU).eval()
    calibration, held_out = images(16, 1), images(8, 2)
    converted, record = quantize(model, calibration[0], calibration, Recipe(calibration_samples=16), reason="test")
    with torch.no_grad():
        assert sqnr([model(x) for (x,) in held_out], [converted(x) for (x,) in held_out]) > 25.0
    assert record["calibration_samples"] == 16 and record["reason"] == "test"
    assert record["method"] == "pt2e-ptq" and record["bias_correction"]["corrected_layers"] >= 4


def test_eval_dropout_leaves_no_requantize_chain():


    model = DropoutHead().eval()
    graph = capture(model, _inputs([(1, 3, 8, 8)], 1, seed=0)[0])
    assert not [n for n in graph.graph.nodes if "dropout" in str(n.target)]
    sample = _inputs([(1, 3, 8, 8)], 1, seed=1)[0]
    torch.testing.assert_close(graph(*sample), model(*sample))


def test_one_calibration_per_recipe_within_a_build():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgepack.quant.calibrate import prepare_corrected, shared_calibration
    from edgepack.quant.recipe import Recipe

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 4)).eval()
    samples = [(torch.randn(1, 3, 8, 8),) for _ in range(8)]
    recipe = Recipe(bias_correction=True)
    outside = prepare_corrected(model, samples[0], list(samples), recipe)[1]
    assert "calibration_shared" not in outside
    with shared_calibration():
        first, record = prepare_corrected(model, samples[0], list(samples), recipe)
        again, shared = prepare_corrected(model, samples[0], list(samples), recipe)  # a new list, same inputs
        other = prepare_corrected(model, samples[0], list(samples), Recipe(bias_correction=False))[1]
    assert "calibration_shared" not in record and shared["calibration_shared"] is True
    assert "calibration_shared" not in other  # another recipe calibrates on its own
    assert again is not first
    x = samples[3][0]
    assert torch.equal(convert_pt2e(first)(x), convert_pt2e(again)(x))


def test_shared_calibration_keys_a_model_with_int8_embedding_tables():
    # The .pte's int8 tables (quant/weight_only.py) are torchao tensor subclasses, which refuse the
    # reshape/view a digest of plain tensors does: every int8 .pte of a model with nn.Embedding failed
    # at "quantize" inside a build (all-MiniLM-L6-v2 for android-arm64). Their inner tensors are keyed.
    from edgepack.cache import weights_digest
    from edgepack.quant.calibrate import prepare_corrected, shared_calibration
    from edgepack.quant.weight_only import embedding_tables

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 4)

        def forward(self, ids):
            return self.head(self.table(ids))

    torch.manual_seed(0)
    model, _ = embedding_tables(Tagger().eval(), "int8", 32)
    other, _ = embedding_tables(Tagger().eval(), "int8", 32)
    assert weights_digest(model) == weights_digest(model) != weights_digest(other)
    samples = [(torch.randint(0, 50, (1, 6)),) for _ in range(4)]
    with shared_calibration():
        prepare_corrected(model, samples[0], samples, Recipe())
        assert prepare_corrected(model, samples[0], samples, Recipe())[1]["calibration_shared"] is True


class PooledHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(self.conv(x), 2).flatten(1))


def test_a_tflite_recipe_is_annotated_by_xnnpack_rules_only_where_they_place_the_same_observers():
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from edgepack.quant.calibrate import resolve_annotation, same_observers
    from edgepack.quant.quantizers import make_quantizer

    torch.manual_seed(0)
    model, example = ChainedResidual().eval(), (torch.randn(1, 3, 8, 8),)
    litert = Recipe(quantizer="litert", calibration_samples=8)
    assert resolve_annotation(model, example, litert).annotate_as == "xnnpack"
    assert resolve_annotation(model, example, Recipe()) == Recipe()  # only a litert recipe changes
    assert resolve_annotation(model, example, Recipe(quantizer="litert", dynamic=True)).annotate_as is None
    # conv, max pool, flatten, linear (the digits CNN's shape): litert-torch observes the pooled value
    # after the flatten, XNNPACK before it; different observers, so litert-torch's annotation stays
    assert resolve_annotation(PooledHead().eval(), (torch.randn(1, 1, 8, 8),), litert).annotate_as is None

    ours = prepare_pt2e(capture(model, example), make_quantizer(litert))
    theirs = prepare_pt2e(capture(model, example), make_quantizer(Recipe()))
    assert same_observers(ours, ours) and same_observers(ours, theirs)
    assert not same_observers(theirs, ours)  # theirs reads the adds' inputs through observers; not the reverse
    altered = copy.deepcopy(theirs)
    altered.get_submodule("activation_post_process_3").quant_min = -127
    assert not same_observers(ours, altered)


def test_one_calibration_serves_the_pte_and_the_tflite():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from edgepack.quant.calibrate import prepare_corrected, shared_calibration
    from edgepack.quant.recipe import XNNPACK_ANNOTATION_NOTE

    torch.manual_seed(0)
    model = ChainedResidual().eval()
    samples = [(torch.randn(1, 3, 8, 8),) for _ in range(8)]
    pte_recipe, tflite_recipe = Recipe(calibration_samples=8), Recipe(quantizer="litert", calibration_samples=8)
    with shared_calibration():
        pte, pte_record = prepare_corrected(model, samples[0], samples, pte_recipe)
        tflite, tflite_record = prepare_corrected(model, samples[0], samples, tflite_recipe)
    assert "calibration_shared" not in pte_record and tflite_record["calibration_shared"] is True
    assert tflite_record["quantizer"].startswith("litert_torch") and pte_record["quantizer"].startswith("XNNPACK")
    assert tflite_record["annotation"] == XNNPACK_ANNOTATION_NOTE and "annotation" not in pte_record
    assert tflite_record["bias_correction"] == pte_record["bias_correction"]
    alone, alone_record = prepare_corrected(model, samples[0], samples, tflite_recipe)  # outside a build
    assert "calibration_shared" not in alone_record and alone_record["annotation"] == XNNPACK_ANNOTATION_NOTE
    x = samples[5][0]
    want = convert_pt2e(tflite)(x)  # convert_pt2e works in place: once per graph
    assert torch.equal(convert_pt2e(pte)(x), want) and torch.equal(convert_pt2e(alone)(x), want)
