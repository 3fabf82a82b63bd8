"""ONNX precision paths (fp16, int8 static, int8 dynamic, int4 weights) in the real onnxruntime.

Each model's float ONNX is exported once per module and handed to the exporter as the build's
reference (as the pipeline does); outputs are compared with that float model under the
x86-64 profile's int8 tolerance or the thresholds stated in each test.
"""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import numpy_helper

from conftest import MODELS, TEST_MODELS, write_profile
from edgepack.errors import ConfigError, ExportError
from edgepack.export.base import ExportContext
from edgepack.export.onnx import OnnxArtifact, export, export_float_onnx
from edgepack.parity import compare
from edgepack.pipeline import BuildOptions, build
from edgepack.spec import load_spec
from edgepack.target import dump_profile, load_target, parse_profile

PARITY_SAMPLES = 24


class Model:
    """A spec, its float ONNX, and the float outputs on the parity inputs."""

    def __init__(self, spec, workdir):
        self.spec = spec
        self.calibration = list(spec.calibration)
        self.input_names = spec.resolved_input_names()
        with torch.no_grad():
            out = spec.model(*spec.example_inputs)
        self.output_names = spec.resolved_output_names(len(out) if isinstance(out, tuple) else 1)
        self.workdir = workdir
        self.float_path = export_float_onnx(spec.model, spec.example_inputs, workdir / "reference.onnx",
                                            self.input_names, self.output_names)[0]
        samples = self.calibration[:PARITY_SAMPLES // 2] + list(spec.holdout or [])[:PARITY_SAMPLES // 2]
        self.inputs = [[t.numpy() for t in sample] for sample in samples]
        self.reference = run(self.float_path, self.inputs)

    def export(self, calibration=None, **options):
        config = OnnxArtifact(name=f"m{len(list(self.workdir.glob('*.onnx')))}", **options)
        ctx = ExportContext(model=self.spec.model, example_inputs=self.spec.example_inputs,
                            calibration=self.calibration if calibration is None else calibration,
                            input_names=self.input_names, output_names=self.output_names,
                            workdir=self.workdir, threads=2, reference_onnx=self.float_path)
        return export(config, ctx)

    def parity(self, path, tolerance):
        return compare(self.reference, run(path, self.inputs), tolerance, self.output_names, self.spec.score_outputs)

    @property
    def float_bytes(self) -> int:
        return self.float_path.stat().st_size


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(path, inputs):
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, dict(zip(names, sample))) for sample in inputs]


def session_fn(path):
    sess = session(path)
    names = [i.name for i in sess.get_inputs()]
    return lambda inputs: tuple(torch.from_numpy(o) for o in sess.run(None, dict(zip(names, (t.numpy() for t in inputs)))))


def int8_tolerance() -> dict:
    return load_target("x86-64").tolerance_for("int8").model_dump()


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.fixture(scope="module")
def digits(digits_spec, tmp_path_factory):
    return Model(digits_spec, tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return Model(load_spec(str(MODELS / "tiny_encoder.py")), tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def tiny_mnv2(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEPACK_MNV2_RES", "64")
        patch.setenv("EDGEPACK_MNV2_WIDTH", "0.35")
        spec = load_spec(str(MODELS / "mobilenet_v2.py"))
    return Model(spec, tmp_path_factory.mktemp("mnv2"))


# -- config --------------------------------------------------------------------------------

def test_int8_defaults_are_the_measured_ones():
    config = OnnxArtifact(precision="int8")
    assert (config.quantizer, config.activation_type, config.weight_type, config.per_channel, config.reduce_range,
            config.calibration_method, config.calibration_samples) == ("torch", "uint8", "int8", True, True, "minmax", 64)
    assert (config.activation_observer, config.fuse_clamp, config.bias_correction) == ("mse", True, True)
    assert OnnxArtifact(precision="int4-weight").group_size == 32


@pytest.mark.parametrize("artifact, message", [
    ({"precision": "int8-dynamic", "calibration_method": "entropy"}, "calibration_method only applies to precision int8"),
    ({"precision": "fp16", "per_channel": False}, "per_channel only applies to precisions int8 and int8-dynamic"),
    ({"precision": "int8", "group_size": 64}, "group_size only applies to precision int4-weight"),
    ({"precision": "int4-weight", "group_size": 48}, "power of two"),
    ({"precision": "int8", "weight_algorithm": "rtn"}, "weight_algorithm only applies to precision int4-weight"),
    ({"precision": "int4-weight", "weight_algorithm": "rtn", "calibration_samples": 8},
     "calibration_samples only applies to precision int8 (and int4-weight with weight_algorithm gptq)"),
    ({"precision": "int8", "activation_type": "int8", "weight_type": "uint8"}, "S8U8"),
    ({"precision": "int8", "calibration_samples": 0}, "calibration_samples"),
    ({"precision": "int8", "calibraton_method": "minmax"}, "unknown key"),
    ({"precision": "int8", "calibration_method": "entropy"}, "calibration_method only applies to quantizer onnxruntime"),
    ({"precision": "int8-dynamic", "quantizer": "onnxruntime"}, "quantizer only applies to precision int8"),
    ({"precision": "int8", "quantizer": "onnxruntime", "float_layers": ["conv1"]},
     "float_layers only applies to precision int8 with quantizer torch"),
    ({"precision": "int8-dynamic", "bias_correction": False}, "bias_correction only applies to precision int8"),
    ({"precision": "int2"}, "precision"),
])
def test_bad_onnx_options_fail_at_profile_load(tmp_path, artifact, message):
    path = write_profile(tmp_path, "x86-64", name="bad", artifacts=[{"format": "onnx", **artifact}],
                         tolerances={p: {"min_cosine": 0.5} for p in ("fp32", "fp16", "int8", "int8-dynamic", "int4-weight")})
    with pytest.raises(ConfigError) as info:
        load_target(str(path))
    assert message in info.value.message and "artifacts[0]" in info.value.message


def test_profile_with_every_precision_round_trips(tmp_path):
    artifacts = [{"name": p.replace("-", "_"), "format": "onnx", "precision": p}
                 for p in ("fp32", "fp16", "int8", "int8-dynamic", "int4-weight")]
    artifacts[2].update(quantizer="onnxruntime", calibration_method="percentile", per_channel=False, reduce_range=False)
    artifacts[4].update(group_size=64)
    path = write_profile(tmp_path, "x86-64", name="every", artifacts=artifacts,
                         tolerances={p["precision"]: {"min_cosine": 0.9} for p in artifacts})
    profile = load_target(str(path))
    again = parse_profile(yaml.safe_load(dump_profile(profile)), "round-trip")
    # the same profile, read from text (where it was read from is not part of it)
    assert again.model_dump() == profile.model_dump() and again.sha256() == profile.sha256()
    assert again.artifacts[4].group_size == 64 and again.artifacts[3].reduce_range is False  # VNNI class


# -- int8 static ---------------------------------------------------------------------------

def _int8_digits_passing(digits, **config):
    """Export digits static int8 with ``config``; it must pass int8 parity tightly. Returns (result, path)."""
    result = digits.export(precision="int8", **config)
    path = result.files[0]
    parity = digits.parity(path, int8_tolerance())
    assert parity.passed, parity.summary()
    logits = parity.outputs[0]
    assert logits.cosine_min > 0.999 and logits.sqnr_db > 30 and logits.top1_agreement == 1.0
    return result, path


def test_int8_static_digits_quantized_in_torch_passes_and_keeps_accuracy(digits):
    result, path = _int8_digits_passing(digits)
    recipe = result.details["quantization"]
    assert recipe["method"].startswith("pt2e-ptq") and recipe["format"] == "QDQ"
    assert (recipe["activation_type"], recipe["weight_type"], recipe["per_channel"]) == ("uint8", "int8", True)
    assert recipe["activation_observer"] == "mse" and recipe["clamp_fusion"] and recipe["bias_correction"]
    assert recipe["calibration_samples"] == 64 and recipe["quantized_op_counts"].get("Conv") == 2
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    activations = [types.get(n.output[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activations and set(activations) == {onnx.TensorProto.UINT8}  # the fast u8s8 kernels' input
    assert path.stat().st_size < 0.3 * digits.float_bytes
    float_top1 = digits.spec.evaluate(session_fn(digits.float_path))["top1"]
    int8_top1 = digits.spec.evaluate(session_fn(path))["top1"]
    assert abs(int8_top1 - float_top1) <= 0.01, (int8_top1, float_top1)


def test_int8_static_digits_onnxruntime_quantizer_passes(digits):
    result, path = _int8_digits_passing(digits, quantizer="onnxruntime")
    recipe = result.details["quantization"]
    assert recipe["method"] == "onnxruntime.quantize_static" and recipe["format"] == "QDQ"
    assert (recipe["activation_type"], recipe["weight_type"], recipe["per_channel"]) == ("uint8", "int8", True)
    assert recipe["calibration_samples"] == 64 and recipe["calibration_method"] == "minmax"
    assert recipe["quantized_op_counts"].get("Conv") == 2 and recipe["nodes_quantized"] >= 4
    assert path.stat().st_size < 0.3 * digits.float_bytes
    counts = op_counts(path)
    assert counts["QuantizeLinear"] >= 3 and counts["DequantizeLinear"] >= 6
    # Accuracy on the held-out digits (the spec's evaluate), run in onnxruntime: within 1 point.
    float_top1 = digits.spec.evaluate(session_fn(digits.float_path))["top1"]
    int8_top1 = digits.spec.evaluate(session_fn(path))["top1"]
    assert abs(int8_top1 - float_top1) <= 0.01, (int8_top1, float_top1)


def test_int8_calibrated_on_zeros_fails_thresholds(digits, tiny_mnv2):
    tolerance = int8_tolerance()
    for model in (digits, tiny_mnv2):
        zeros = [tuple(torch.zeros_like(t) for t in sample) for sample in model.calibration]
        broken = model.export(precision="int8", calibration=zeros)
        parity = model.parity(broken.files[0], tolerance)
        assert not parity.passed
        failures = " ".join(parity.outputs[0].failures)
        assert "cosine min" in failures and "SQNR" in failures


def test_int8_corrupted_scale_fails_thresholds(digits, tmp_path):
    good = digits.export(precision="int8").files[0]
    model = onnx.load(str(good))
    # Give the QuantizeLinear after the first conv its own scale, 8x the one its DequantizeLinear
    # uses: the tensor comes out 8x too small, as with a scale corrupted in the file.
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][1]
    scale = next(i for i in model.graph.initializer if i.name == quantize.input[1])
    model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale) * 8, "corrupt_scale"))
    quantize.input[1] = "corrupt_scale"
    onnx.save(model, str(tmp_path / "corrupt.onnx"))
    parity = digits.parity(tmp_path / "corrupt.onnx", int8_tolerance())
    assert not parity.passed, parity.summary()


def test_int8_tiny_mobilenet_v2_quantizes_every_conv(tiny_mnv2):
    result = tiny_mnv2.export(precision="int8", calibration_samples=32)
    recipe = result.details["quantization"]
    assert recipe["calibration_samples"] == 32
    assert recipe["quantized_op_counts"]["Conv"] == 52  # BN folded by quant_pre_process
    parity = tiny_mnv2.parity(result.files[0], {})
    good = parity.outputs[0]
    zeros = [tuple(torch.zeros_like(t) for t in sample) for sample in tiny_mnv2.calibration]
    broken = tiny_mnv2.parity(tiny_mnv2.export(precision="int8", calibration=zeros).files[0], {}).outputs[0]
    # At 64 px / width 0.35 noise is averaged over few channels and pixels, so int8 parity is
    # modest (measured: SQNR 8.2 dB, top-1 96%); a broken calibration is far worse (-1.2 dB, 12%).
    assert good.top1_agreement >= 0.85 and good.sqnr_db >= 6.0 and good.cosine_mean >= 0.85
    assert good.sqnr_db > broken.sqnr_db + 5 and good.top1_agreement > broken.top1_agreement + 0.5
    assert result.files[0].stat().st_size < 0.4 * tiny_mnv2.float_bytes


# -- fp16 ------------------------------------------------------------------------------------

def test_fp16_halves_size_keeps_float32_io(tiny_mnv2):
    result = tiny_mnv2.export(precision="fp16")
    path = result.files[0]
    sess = session(path)
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)"]
    ratio = path.stat().st_size / tiny_mnv2.float_bytes
    assert 0.45 < ratio < 0.6, ratio
    parity = tiny_mnv2.parity(path, {"min_cosine": 0.999})
    assert parity.passed, parity.summary()
    assert result.details["quantization"]["keep_io_types"] is True
    assert result.details["quantization"]["float16_initializers"] > 50


# -- int8 dynamic and int4 weights on the encoder ---------------------------------------------

def test_int8_dynamic_encoder(encoder):
    result = encoder.export(precision="int8-dynamic")
    path = result.files[0]
    recipe = result.details["quantization"]
    assert recipe["quantized_op_counts"]["MatMulInteger"] == 25  # 4 layers x 6 Linear + pooler
    parity = encoder.parity(path, {"min_cosine": 0.999, "min_sqnr_db": 30.0})
    assert parity.passed, parity.summary()
    assert parity.outputs[0].top1_agreement is None  # an embedding, not class scores
    assert path.stat().st_size < 0.3 * encoder.float_bytes


def test_int4_weight_encoder_size_and_parity(encoder):
    result = encoder.export(precision="int4-weight")
    path = result.files[0]
    recipe = result.details["quantization"]
    assert recipe["group_size"] == 32 and recipe["bits"] == 4 and recipe["symmetric"] is True
    assert recipe["quantized_op_counts"] == {"MatMulNBits": 25}
    assert recipe["gemm_rewritten_as_matmul"] == 1  # the pooler's 2-D Linear
    assert path.stat().st_size <= 0.35 * encoder.float_bytes
    parity = encoder.parity(path, {"min_cosine": 0.99, "min_sqnr_db": 17.0})
    assert parity.passed, parity.summary()


def test_int4_weight_digits_rewrites_gemm(digits):
    result = digits.export(precision="int4-weight", group_size=64)
    assert result.details["quantization"]["quantized_op_counts"] == {"MatMulNBits": 2}
    parity = digits.parity(result.files[0], int8_tolerance())
    assert parity.passed, parity.summary()


def test_int4_weight_without_matmul_is_a_clear_export_error(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    example = (torch.rand(1, 3, 8, 8),)
    ctx = ExportContext(model=model, example_inputs=example, calibration=[example], input_names=["x"],
                        output_names=["y"], workdir=tmp_path)
    with pytest.raises(ExportError) as info:
        export(OnnxArtifact(precision="int4-weight"), ctx)
    assert "onnx int4-weight" in info.value.message and "MatMul" in info.value.message
    assert not (tmp_path / "model.onnx").exists()


# -- through the pipeline ---------------------------------------------------------------------

def test_encoder_build_fp32_int8_dynamic_int4(tmp_path):
    spec = load_spec(str(MODELS / "tiny_encoder.py"))
    profile = write_profile(
        tmp_path, "x86-64", name="x86-encoder",
        artifacts=[{"name": "model", "format": "onnx", "precision": "fp32"},
                   {"name": "model_int8_dynamic", "format": "onnx", "precision": "int8-dynamic"},
                   {"name": "model_int4", "format": "onnx", "precision": "int4-weight"}],
        tolerances={"fp32": {"atol": 1.0e-4, "rtol": 1.0e-3, "min_cosine": 0.9999},
                    "int8-dynamic": {"min_cosine": 0.999, "min_sqnr_db": 30.0},
                    "int4-weight": {"min_cosine": 0.99, "min_sqnr_db": 17.0}},
        latency={"warmup": 2, "runs": 20})
    result = build(spec, load_target(str(profile)), str(profile), BuildOptions(out_dir=tmp_path / "dist"))
    assert result.exit_code == 0, result.messages
    manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
    assert [i["dtype"] for i in manifest["io"]["inputs"]] == ["int64", "int64"]
    fp32, dynamic, int4 = manifest["artifacts"]
    assert dynamic["export"]["quantization"]["method"] == "onnxruntime.quantize_dynamic"
    assert int4["export"]["quantization"]["method"] == "onnxruntime.MatMulNBitsQuantizer"
    assert int4["bytes"] <= 0.35 * fp32["bytes"] and dynamic["bytes"] < 0.3 * fp32["bytes"]
    assert all(a["parity"]["passed"] for a in manifest["artifacts"])


def test_int8_with_external_data_in_and_out(tmp_path):
    spec = load_spec(str(TEST_MODELS / "wide_mlp.py"))
    reference = export_float_onnx(spec.model, spec.example_inputs, tmp_path / "ref" / "reference.onnx",
                                  ["input_0"], ["output_0"], external_data_mb=1)
    assert len(reference) == 2  # the source keeps its weights outside the protobuf too
    (tmp_path / "out").mkdir()
    calibration = list(spec.calibration)
    ctx = ExportContext(model=spec.model, example_inputs=spec.example_inputs, calibration=calibration,
                        input_names=["input_0"], output_names=["output_0"], workdir=tmp_path / "out",
                        reference_onnx=reference[0])
    result = export(OnnxArtifact(name="model", precision="int8", external_data_mb=1), ctx)
    assert [f.name for f in result.files] == ["model.onnx", "model.onnx.data"]
    assert result.details["external_data"] is True
    moved = tmp_path / "moved"
    (tmp_path / "out").rename(moved)  # the artifact must not depend on where it was written
    inputs = [[t.numpy() for t in sample] for sample in calibration]
    parity = compare(run(reference[0], inputs), run(moved / "model.onnx", inputs), int8_tolerance(), ["output_0"])
    assert parity.passed, parity.summary()


def test_int8_survives_symbolic_shape_inference_failing_on_an_l2_norm(tmp_path):
    model = Model(load_spec(str(TEST_MODELS / "l2_pooled.py")), tmp_path)
    for precision in ("int8", "int8-dynamic"):  # onnxruntime's quantizers run quant_pre_process
        result = model.export(precision=precision, **({"quantizer": "onnxruntime"} if precision == "int8" else {}))
        preprocess = result.details["quantization"]["preprocess"]
        assert preprocess.startswith("quant_pre_process without symbolic shape inference (it failed: TypeError")
        report = model.parity(result.files[0], {"min_cosine": 0.99})
        assert report.passed, report.summary()
