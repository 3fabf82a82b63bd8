"""export/onnx_int4.py: GPTQ codes written into MatMulNBits, read back and run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from edgepack.export.base import ExportContext
from edgepack.export.onnx import OnnxArtifact, export, export_float_onnx
from edgepack.export.onnx_int4 import pack, unpack
from edgepack.quant.gptq import rtn
from edgepack.quant.int4 import calibrated_int4


class TwoLinears(nn.Module):
    """A 3-D input (MatMul in ONNX) and a 2-D one (Gemm, rewritten as MatMul)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Linear(64, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.tokens(x)
        return hidden, self.head(hidden.mean(dim=1))


def _case(tmp_path):
    torch.manual_seed(0)
    model = TwoLinears().eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(1, 6, 64, generator=gen),) for _ in range(8)]
    reference = export_float_onnx(model, calibration[0], tmp_path / "reference.onnx", ["x"], ["hidden", "out"])[0]
    ctx = ExportContext(model=model, example_inputs=calibration[0], calibration=calibration, input_names=["x"],
                        output_names=["hidden", "out"], workdir=tmp_path, reference_onnx=reference)
    return model, calibration, ctx


def test_pack_unpack_round_trip():
    weight = rtn(torch.randn(16, 64), 32)
    packed, scales = pack(weight)
    assert packed.shape == (16, 2, 16) and packed.dtype == np.uint8 and scales.shape == (16, 2)
    np.testing.assert_array_equal(unpack(packed, scales), weight.dequantized().numpy())


def test_the_onnx_holds_and_runs_the_gptq_codes(tmp_path):
    model, calibration, ctx = _case(tmp_path)
    result = export(OnnxArtifact(precision="int4-weight", calibration_samples=6), ctx)
    recipe = result.details["quantization"]
    assert recipe["weight_algorithm"] == "gptq" and recipe["calibration_samples"] == 6
    assert recipe["codes_carried"] == 2 and "rtn_layers" not in recipe
    # The same call the exporter made (deterministic): the codes it chose.
    weights, _ = calibrated_int4(model, ["head", "tokens"], calibration, calibration[0], 32, 6)
    onnx_model = onnx.load(str(result.files[0]))
    initializers = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    held = []
    for node in onnx_model.graph.node:
        if node.op_type == "MatMulNBits":
            dims = {a.name: a.i for a in node.attribute}
            stored = unpack(initializers[node.input[1]], initializers[node.input[2]])
            linear = "tokens" if dims["K"] == 64 else "head"
            np.testing.assert_array_equal(stored, weights[linear].dequantized().numpy())
            held.append(linear)
    assert sorted(held) == ["head", "tokens"]
    # onnxruntime reads them as written: one-hot rows give back the weight's columns plus the bias.
    session = ort.InferenceSession(str(result.files[0]), providers=["CPUExecutionProvider"])
    eye = np.eye(64, dtype=np.float32)[None, :6]
    hidden, _ = session.run(None, {"x": eye})
    want = (weights["tokens"].dequantized()[:, :6].T + model.tokens.bias).detach().numpy()
    np.testing.assert_allclose(hidden[0], want, rtol=1e-5, atol=1e-6)


def test_rtn_keeps_onnxruntimes_own_codes(tmp_path):
    model, _, ctx = _case(tmp_path)
    result = export(OnnxArtifact(precision="int4-weight", weight_algorithm="rtn"), ctx)
    recipe = result.details["quantization"]
    assert recipe["weight_algorithm"] == "rtn" and recipe["calibration_samples"] == 0
    assert recipe["algorithm"] == "RTN" and "codes_carried" not in recipe
    onnx_model = onnx.load(str(result.files[0]))
    initializers = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    (node,) = [n for n in onnx_model.graph.node if n.op_type == "MatMulNBits"
               and {a.name: a.i for a in n.attribute}["K"] == 32]
    stored = unpack(initializers[node.input[1]], initializers[node.input[2]])
    # onnxruntime's round to nearest: every value within a step of the float weight (half a step,
    # and a whole one for the group's extreme value, clamped at 7), most of them within half
    step = np.abs(np.repeat(initializers[node.input[2]].reshape(8, 1), 32, axis=1))
    error = np.abs(stored - model.head.weight.detach().numpy())
    assert np.all(error <= step + 1e-7) and np.mean(error <= 0.5 * step + 1e-7) > 0.9
    weights, _ = calibrated_int4(model, ["head", "tokens"], ctx.calibration, ctx.example_inputs, 32, 64)
    assert not np.array_equal(stored, weights["head"].dequantized().numpy())
