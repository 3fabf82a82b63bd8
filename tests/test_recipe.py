"""quant/recipe.py: one options block for the .pte and .tflite configs, the only config ->
Recipe mapping, the reason and record the manifest keeps, the float_layers check."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from edgepack.analysis.fallback import with_float_layers
from edgepack.errors import ExportError
from edgepack.export import executorch as et_export
from edgepack.export import tflite
from edgepack.export.base import ExportContext
from edgepack.parity import compare
from edgepack.quant.recipe import (DEFAULT_RECIPE_REASON, RECIPE_OPTIONS, Int8Options, Recipe, check_float_layers,
                                   recipe_for, recipe_reason, recipe_record)
from edgepack.runtimes import executorch as et_runtime
from int8_support import INT8_TOLERANCE, SeparableNet, export_ctx, images, sqnr


def test_pte_and_tflite_share_one_options_block():
    """Both configs take the recipe options from Int8Options: same fields, same defaults."""
    for config in (et_export.ExecuTorchArtifact, tflite.TFLiteArtifact):
        assert issubclass(config, Int8Options)
        for name, field in Int8Options.model_fields.items():
            assert config.model_fields[name].default == field.default, (config, name)


@pytest.mark.parametrize("config, quantizer", [
    (et_export.ExecuTorchArtifact(precision="int8", granularity="per-tensor", activation_observer="minmax",
                                  fuse_clamp=False, float_layers=["a"], calibration_samples=8,
                                  bias_correction=False), "xnnpack"),
    (tflite.TFLiteArtifact(precision="int8", activation_observer="percentile", float_layers=["a", "b"]), "litert"),
])
def test_recipe_for_maps_every_option(config, quantizer):
    recipe = recipe_for(config)
    assert recipe == Recipe(per_channel=config.granularity == "per-channel", dynamic=False,
                            activation_observer=config.activation_observer, fuse_clamp=config.fuse_clamp,
                            float_layers=tuple(config.float_layers), calibration_samples=config.calibration_samples,
                            bias_correction=config.bias_correction, quantizer=quantizer)
    assert recipe_for(et_export.ExecuTorchArtifact(precision="int8-dynamic")).dynamic


def test_recipe_reason_says_default_or_what_the_profile_changed():
    assert recipe_reason(et_export.ExecuTorchArtifact(precision="int8")) == DEFAULT_RECIPE_REASON
    changed = recipe_reason(tflite.TFLiteArtifact(precision="int8", fuse_clamp=False, float_layers=["x"]))
    assert changed.startswith("set in the profile: fuse_clamp") and "1 layer(s) kept fp32" in changed
    assert "run time" in recipe_reason(et_export.ExecuTorchArtifact(precision="int8-dynamic"))


def test_recipe_options_apply_only_where_they_mean_something():
    for option, value in (("fuse_clamp", False), ("bias_correction", False), ("activation_observer", "minmax")):
        with pytest.raises(ValidationError, match=f"pte {option} only applies to precision int8"):
            et_export.ExecuTorchArtifact(precision="fp32", **{option: value})
        with pytest.raises(ValidationError, match=f"tflite {option} only applies to precision int8 with the pt2e"):
            tflite.TFLiteArtifact(precision="int8-dynamic", **{option: value})
    with pytest.raises(ValidationError, match="lists a module twice"):
        tflite.TFLiteArtifact(precision="int8", float_layers=["a", "a"])
    assert set(RECIPE_OPTIONS) <= set(Int8Options.model_fields)


def test_check_float_layers_names_the_unknown_modules():
    check_float_layers(["", "conv", "fc"], ["conv"])
    with pytest.raises(ExportError, match="float_layers names no module of the model: nope") as caught:
        check_float_layers(["", "conv"], ["conv", "nope"])
    assert "named_modules" in caught.value.hint


def test_recipe_record_names_the_quantizer():
    record = recipe_record(Recipe(quantizer="litert", float_layers=("a",)), used=12)
    assert record["quantizer"].startswith("litert_torch") and record["calibration_samples"] == 12
    assert record["float_layers"] == ["a"] and record["bias_correction"] is True
    assert recipe_record(Recipe(dynamic=True), used=0)["bias_correction"] is False


def test_recipe_options_round_trip():
    config = et_export.ExecuTorchArtifact(precision="int8", activation_observer="mse", fuse_clamp=False,
                                          float_layers=["a.b", "c"], bias_correction=False)
    assert et_export.ExecuTorchArtifact.model_validate(config.model_dump(mode="json")) == config
    assert with_float_layers(config, ["c", "d"]).float_layers == ("a.b", "c", "d")


def test_float_layers_must_name_modules(hostile, tmp_path):
    with pytest.raises(Exception, match="float_layers names no module"):
        et_export.export(et_export.ExecuTorchArtifact(precision="int8", float_layers=["nope"]),
                         export_ctx(hostile, tmp_path))
    with pytest.raises(ValidationError, match="only applies to precision int8"):
        et_export.ExecuTorchArtifact(precision="fp32", float_layers=["stem"])


def test_observer_options_give_different_valid_artifacts(tmp_path):
    model = SeparableNet(nn.ReLU6).eval()
    calibration, held_out = images(16, 1), images(8, 2)
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    files = {}
    for observer in ("minmax", "percentile", "mse"):
        config = et_export.ExecuTorchArtifact(precision="int8", activation_observer=observer, name=observer)
        ctx = ExportContext(model=model, example_inputs=calibration[0], calibration=calibration,
                            input_names=["x"], output_names=["y"], workdir=tmp_path)
        result = et_export.export(config, ctx)
        assert result.details["quantization"]["activation_observer"] == observer
        assert result.details["delegates"] >= 1
        runner = et_runtime.load(str(result.files[0]), threads=1)
        got = [torch.from_numpy(runner.run([x.numpy()])[0]) for (x,) in held_out]
        assert sqnr(reference, got) > 15.0, observer
        files[observer] = result.files[0].read_bytes()
    assert len(set(files.values())) == 3, "each observer should give its own activation scales"


def test_tflite_shares_the_recipe_and_float_layers(hostile, tmp_path):
    from edgepack.runtimes import litert

    config = tflite.TFLiteArtifact(precision="int8", float_layers=["hostile", "mix"])
    result = tflite.export(config, export_ctx(hostile, tmp_path))
    quantization = result.details["quantization"]
    assert quantization["float_layers"] == ["hostile", "mix"] and quantization["clamp_fusion"] is True
    assert quantization["bias_correction"]["corrected_layers"] >= 4
    assert result.details["float_compute_ops"] == {"CONV_2D": 2}  # exactly the two fp32 layers
    runner = litert.load(str(result.files[0]), threads=1)
    reference, outputs = [], []
    with torch.no_grad():
        for (x,) in hostile.holdout:
            reference.append([hostile.model(x).numpy()])
            outputs.append(runner.run([x.numpy()]))
    assert compare(reference, outputs, INT8_TOLERANCE, ["logits"]).passed
    with pytest.raises(ValidationError, match="only applies to precision int8 with the pt2e quantizer"):
        tflite.TFLiteArtifact(precision="int8", quantizer="ai-edge-quantizer", float_layers=["hostile"])
