"""export/onnx_qdq.py: static int8 ONNX quantized in torch with edgepack's PT2E recipe, run in
onnxruntime; the weight bits of the x86 CPU classes (x86-64: VNNI, 8 bits; x86-64-avx2: 7 bits);
the Pad folding; float_layers kept float under onnxruntime, by hand and by the build's fallback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from conftest import run_cli, write_profile
from edgepack.analysis.diagnose import profile_recipe
from edgepack.export.base import ExportContext
from edgepack.export.onnx import OnnxArtifact, export
from edgepack.parity import compare
from edgepack.quant.recipe import Recipe, recipe_for
from edgepack.target import load_target
from int8_support import TEST_MODELS


def _ctx(spec, workdir, input_names=("image",)) -> ExportContext:
    return ExportContext(model=spec.model, example_inputs=spec.example_inputs, calibration=list(spec.calibration),
                         input_names=list(input_names), output_names=["logits"], workdir=workdir)


def _int8_config(target: str) -> OnnxArtifact:
    return next(a for a in load_target(target).artifacts if a.format == "onnx" and a.precision == "int8")


def _weights(path) -> list[np.ndarray]:
    """The int8 weight initializers (activations are uint8)."""
    model = onnx.load(str(path))
    return [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]


def _parity(spec, path, tolerance):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    reference, outputs = [], []
    with torch.no_grad():
        for (x,) in spec.holdout:
            reference.append([spec.model(x).numpy()])
            outputs.append(session.run(None, {name: x.numpy()}))
    return compare(reference, outputs, tolerance, ["logits"])


def _session_ops(path, tmp_path) -> list[tuple[str, int | None]]:
    """(op type, weight initializer type) of each node of the graph onnxruntime actually runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimized.onnx"))
    types = {i.name: i.data_type for i in model.graph.initializer}
    return [(n.op_type, types.get(n.input[1]) if len(n.input) > 1 else None) for n in model.graph.node]


def test_the_recipe_follows_the_profiles_cpu_class():
    vnni, avx2 = _int8_config("x86-64"), _int8_config("x86-64-avx2")
    assert load_target("x86-64").device.has_vnni and not load_target("x86-64-avx2").device.has_vnni
    assert (vnni.quantizer, vnni.reduce_range, avx2.quantizer, avx2.reduce_range) == ("torch", False, "torch", True)
    assert recipe_for(vnni) == Recipe(quantizer="x86", weight_bits=8)
    assert recipe_for(avx2) == Recipe(quantizer="x86", weight_bits=7)
    # the diagnosis uses the recipe the artifact is made with
    assert profile_recipe(load_target("x86-64-avx2")) == recipe_for(avx2)
    # a profile that sets reduce_range keeps it, whatever the class
    assert OnnxArtifact(precision="int8").reduce_range  # without a profile: the conservative 7 bits


def test_weight_bits_follow_the_class_and_both_pass_parity_in_onnxruntime(hostile, tmp_path):
    tolerance = {"min_cosine": 0.98, "min_sqnr_db": 14.0}
    found = {}
    for target in ("x86-64", "x86-64-avx2"):
        config = _int8_config(target).model_copy(update={"float_layers": ("hostile", "mix")})
        workdir = tmp_path / target
        workdir.mkdir()
        result = export(config, _ctx(hostile, workdir))
        weights = _weights(result.files[0])
        found[target] = max(int(np.abs(w).max()) for w in weights)
        assert result.details["quantization"]["weight_bits"] == (8 if target == "x86-64" else 7)
        report = _parity(hostile, result.files[0], tolerance)
        assert report.passed, (target, report.summary())
    assert found["x86-64-avx2"] <= 63 < found["x86-64"] <= 127


class _PaddedNet(nn.Module):
    """TF-"same" style asymmetric F.pad before a strided conv, as EfficientNet-Lite has."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        x = F.relu6(self.down(F.pad(x, (0, 1, 0, 1))))
        return self.head(x.mean((2, 3)))


def test_pads_fold_into_the_conv_exactly(tmp_path):
    torch.manual_seed(0)
    model = _PaddedNet().eval()
    samples = [(torch.randn(1, 3, 16, 16),) for _ in range(8)]
    ctx = ExportContext(model=model, example_inputs=samples[0], calibration=samples, input_names=["image"],
                        output_names=["logits"], workdir=tmp_path)
    result = export(OnnxArtifact(precision="int8", reduce_range=False), ctx)
    assert result.details["quantization"]["pads_folded"] == 1
    graph = onnx.load(str(result.files[0])).graph
    assert not [n for n in graph.node if n.op_type == "Pad"]
    pads = [list(a.ints) for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert [0, 0, 1, 1] in pads
    # the folded model computes what the quantized torch graph does
    session = ort.InferenceSession(str(result.files[0]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = [[model(*s).numpy()] for s in samples]
    outputs = [session.run(None, {"image": s[0].numpy()}) for s in samples]
    assert compare(reference, outputs, {"min_cosine": 0.99}, ["logits"]).passed


def test_float_layers_stay_float_in_onnxruntime(hostile, tmp_path):
    config = _int8_config("x86-64").model_copy(update={"float_layers": ("hostile",)})
    result = export(config, _ctx(hostile, tmp_path))
    record = result.details["quantization"]
    assert record["float_layers"] == ["hostile"] and len(record["float_nodes_protected"]) == 1
    ops = _session_ops(result.files[0], tmp_path)
    # onnxruntime would otherwise quantize that float weight per tensor and fuse a QLinearConv
    assert ops.count(("Conv", onnx.TensorProto.FLOAT)) == 1
    assert sum(op == "QLinearConv" for op, _ in ops) >= 3  # the other convs stay int8


def test_build_with_fallback_on_onnx_keeps_the_hostile_layer_float(tmp_path):
    profile = write_profile(tmp_path, "x86-64", name="x86-fallback", artifacts=[
        {"name": "model_int8", "format": "onnx", "precision": "int8"}],
        tolerances={"int8": {"min_cosine": 0.98, "min_sqnr_db": 14.0}},
        on_parity_failure="fallback", fallback={"group_size": 1, "max_steps": 3})
    proc = run_cli("build", str(TEST_MODELS / "hostile.py"), "--target", str(profile), "--out", str(tmp_path / "d"),
                   "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["artifacts"][0]
    assert entry["status"] == "ok" and entry["parity"]["passed"]
    fallback = entry["export"]["fallback"]
    assert fallback["passed"] and fallback["ranked_layers"][0] == "hostile"
    assert "hostile" in fallback["float_layers"] and not fallback["steps"][0]["passed"]
    assert entry["config"]["float_layers"] == fallback["float_layers"]
    assert entry["export"]["quantization"]["float_layers"] == fallback["float_layers"]
    assert entry["export"]["quantization"]["float_nodes_protected"]
