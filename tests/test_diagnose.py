"""analysis/diagnose.py: the per-layer int8 diagnosis ranks the layer that hurts and its
emulation computes what the converted graph computes."""

from __future__ import annotations

import json

import pytest
import torch

from edgepack.analysis.diagnose import diagnose_pt2e, profile_recipe
from edgepack.quant.calibrate import quantize
from edgepack.quant.recipe import Recipe
from edgepack.target import load_target
from int8_support import TEST_MODELS, sqnr


def test_diagnosis_ranks_the_hostile_layer_first(tmp_path):
    """`edgepack diagnose` prints the worst layers and writes diagnosis.json and the chart."""
    from conftest import run_cli

    proc = run_cli("diagnose", str(TEST_MODELS / "hostile.py"), "--target", "android-arm64", "--out", str(tmp_path),
                   "--samples", "4", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if "conv2d" in line or "linear" in line]
    assert len(table) == 3 and "hostile" in table[0]
    assert "float_layers: ['hostile', 'mix']" in proc.stderr
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["ranked"][0] == "hostile"
    worst = next(r for r in report["layers"] if r["layer"] == "hostile")
    assert worst["error_share"] > 0.5
    # its output activation is the problem, not its weights, so the layer reading it comes along
    assert worst["output_sqnr_db_activation_only"] < worst["output_sqnr_db_weights_only"]
    assert report["float_groups"][0] == ["hostile", "mix"]
    assert (tmp_path / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # layers come in network order with every figure filled for the quantized ones
    names = [r["layer"] for r in report["layers"]]
    assert names.index("stem") < names.index("hostile") < names.index("mix") < names.index("head")
    bad = run_cli("diagnose", str(TEST_MODELS / "hostile.py"), "--target", "android-arm64", "--samples", "0")
    assert bad.returncode == 2 and "--samples" in bad.stderr


def test_diagnosis_emulation_matches_the_converted_graph(hostile):
    """The switch-instrumented graph with everything int8 computes what convert_pt2e emits."""
    recipe = Recipe(bias_correction=False)
    report = diagnose_pt2e(hostile.model, hostile.example_inputs, hostile.calibration, recipe, samples=4)
    converted, _ = quantize(hostile.model, hostile.example_inputs, hostile.calibration, recipe)
    with torch.no_grad():
        samples = list(hostile.calibration)[:4]
        reference = [hostile.model(*x) for x in samples]
        actual = [converted(*x) for x in samples]
    assert sqnr(reference, actual) == pytest.approx(report["output"]["sqnr_db"], abs=0.05)


def test_profile_recipe_is_the_artifacts_own():
    """The diagnosis uses the recipe of the profile's int8 .pte, else its pt2e .tflite or torch-quantized
    .onnx, else the default."""
    arm = profile_recipe(load_target("android-arm64"))
    assert arm.quantizer == "xnnpack" and arm.activation_observer == "mse" and arm.bias_correction
    assert profile_recipe(load_target("x86-64")) == Recipe(quantizer="x86", weight_bits=8)
    assert profile_recipe(load_target("x86-64-avx2")) == Recipe(quantizer="x86", weight_bits=7)
    assert profile_recipe(load_target("android-gpu")) == Recipe()


def test_x86_diagnosis_is_the_onnx_artifacts_recipe(hostile, tmp_path):
    """x86-64's int8 .onnx is made by the PT2E recipe (x86 quantizer), so the diagnosis of that
    recipe predicts what onnxruntime computes with the artifact."""
    import onnxruntime as ort

    from edgepack.export.base import ExportContext
    from edgepack.export.onnx import export
    from edgepack.quant.recipe import recipe_for

    config = next(a for a in load_target("x86-64").artifacts if a.precision == "int8")
    config = config.model_copy(update={"float_layers": ("hostile", "mix")})
    calibration = list(hostile.calibration)
    report = diagnose_pt2e(hostile.model, hostile.example_inputs, calibration, recipe_for(config), samples=8)
    assert report["recipe"]["weight_bits"] == 8 and "x86" in report["recipe"]["quantizer"]
    assert report["recipe"]["float_layers"] == ["hostile", "mix"]
    result = export(config, ExportContext(model=hostile.model, example_inputs=hostile.example_inputs,
                                          calibration=calibration, input_names=["image"], output_names=["logits"],
                                          workdir=tmp_path))
    session = ort.InferenceSession(str(result.files[0]), providers=["CPUExecutionProvider"])
    samples = calibration[:8]
    with torch.no_grad():
        reference = [hostile.model(*x) for x in samples]
    actual = [torch.from_numpy(session.run(None, {"image": x[0].numpy()})[0]) for x in samples]
    assert sqnr(reference, actual) == pytest.approx(report["output"]["sqnr_db"], abs=1.0)
