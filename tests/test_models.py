"""The shipped model specs: MobileNetV2 (small via env vars), the tiny encoder, the photo loader."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import MODELS
from edgepack.errors import SpecError
from edgepack.spec import load_spec


@pytest.fixture(scope="module")
def mnv2_spec():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEPACK_MNV2_RES", "64")
        patch.setenv("EDGEPACK_MNV2_WIDTH", "0.35")
        return load_spec(str(MODELS / "mobilenet_v2.py"))


@pytest.fixture(scope="module")
def encoder_spec():
    return load_spec(str(MODELS / "tiny_encoder.py"))


def _module(spec):
    """The loaded spec file as a module (load_spec registers it in sys.modules)."""
    return sys.modules[type(spec.model).__module__]


# -- MobileNetV2 ------------------------------------------------------------------------------

def test_mobilenet_v2_small_spec(mnv2_spec):
    spec = mnv2_spec
    assert spec.name == "mobilenet-v2-w0.35-r64"
    assert spec.example_inputs[0].shape == (1, 3, 64, 64)
    calibration, holdout = list(spec.calibration), list(spec.holdout)
    assert len(calibration) == 64 and len(holdout) == 16
    with torch.no_grad():
        logits = spec.model(*spec.example_inputs)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    # ImageNet-normalised photos: roughly zero mean, unit spread.
    pixels = torch.cat([x for (x,) in calibration])
    assert abs(float(pixels.mean())) < 0.5 and 0.5 < float(pixels.std()) < 1.5
    # Held-out views are different images from the calibration views.
    assert not any(torch.equal(h, c) for (h,) in holdout for (c,) in calibration[:16])


def test_mobilenet_v2_structure_and_batchnorm_statistics(mnv2_spec):
    module = _module(mnv2_spec)
    full = module.MobileNetV2(width_mult=1.0)
    assert 3.4e6 < sum(p.numel() for p in full.parameters()) < 3.6e6  # the paper's 3.4M + BN
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 52 and sum(m.groups > 1 for m in convs) == 17
    assert sum(isinstance(m, torch.nn.ReLU6) for m in full.modules()) == 35
    bns = [m for m in mnv2_spec.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    # Statistics measured on photos, not the (0, 1) of a fresh layer.
    assert all(float(bn.running_mean.abs().mean()) > 1e-3 for bn in bns)
    assert all(not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)
    assert not mnv2_spec.model.training


def test_mobilenet_v2_is_deterministic(mnv2_spec):
    module = _module(mnv2_spec)
    a, b = module.build_model(32, 0.35), module.build_model(32, 0.35)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_mobilenet_v2_evaluate_reports_agreement(mnv2_spec):
    model = mnv2_spec.model
    with torch.no_grad():
        assert mnv2_spec.evaluate(lambda inputs: (model(*inputs),)) == {"top1_agreement_vs_float": 1.0}


@pytest.mark.parametrize("env, message", [
    ({"EDGEPACK_MNV2_RES": "100"}, "multiple of 32"),
    ({"EDGEPACK_MNV2_WIDTH": "wide"}, "not numbers"),
    ({"EDGEPACK_MNV2_WIDTH": "5"}, "within [0.1, 2.0]"),
])
def test_mobilenet_v2_bad_options(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SpecError) as info:
        load_spec(str(MODELS / "mobilenet_v2.py"))
    assert message in info.value.message


# -- tiny encoder -------------------------------------------------------------------------------

def test_encoder_spec_inputs(encoder_spec):
    spec = encoder_spec
    ids, mask = spec.example_inputs
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (1, 32)
    samples = list(spec.calibration)
    lengths = {int(m.sum()) for _, m in samples}
    assert len(lengths) > 5 and min(lengths) < 32  # varying lengths, with padding
    for ids, mask in samples:
        n = int(mask.sum())
        assert int(ids[0, 0]) == 1 and int(ids[0, n - 1]) == 2 and bool((ids[0, n:] == 0).all())
        assert bool((mask[0, :n] == 1).all()) and bool((mask[0, n:] == 0).all())
        assert int(ids.max()) < 1000
    with torch.no_grad():
        pooled = spec.model(*spec.example_inputs)
    assert pooled.shape == (1, 128)
    assert spec.score_outputs == []  # an embedding: no top-1


def test_encoder_ignores_padded_tokens(encoder_spec):
    ids, mask = next(pair for pair in encoder_spec.calibration if int(pair[1].sum()) < 32)
    n = int(mask.sum())
    other = ids.clone()
    other[0, n:] = 777  # garbage where the mask says padding
    with torch.no_grad():
        assert torch.allclose(encoder_spec.model(ids, mask), encoder_spec.model(other, mask), atol=1e-6)
        changed = ids.clone()
        changed[0, 1] = 778  # a real token does matter
        assert not torch.allclose(encoder_spec.model(ids, mask), encoder_spec.model(changed, mask), atol=1e-4)


def test_encoder_exports_with_torch_export(encoder_spec):
    program = torch.export.export(encoder_spec.model, encoder_spec.example_inputs, strict=True)
    with torch.no_grad():
        expected = encoder_spec.model(*encoder_spec.example_inputs)
        assert torch.allclose(program.module()(*encoder_spec.example_inputs), expected, atol=1e-5)
    assert "scaled_dot_product" not in str(program.graph)


def test_encoder_holdout_differs_from_calibration(encoder_spec):
    calibration = {tuple(ids[0].tolist()) for ids, _ in encoder_spec.calibration}
    assert not any(tuple(ids[0].tolist()) in calibration for ids, _ in encoder_spec.holdout)


# -- photos -----------------------------------------------------------------------------------

def test_photo_sets_are_disjoint_and_load(mnv2_spec):
    photos = sys.modules[_module(mnv2_spec).calibration_views.__module__]
    assert not set(photos.CALIBRATION_PHOTOS) & set(photos.HOLDOUT_PHOTOS)
    for name in photos.CALIBRATION_PHOTOS + photos.HOLDOUT_PHOTOS:
        image = photos.load_photo(name)
        assert image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1 and image.shape[1] >= 128
