"""quant/mixed.py: mixed int4/int8 Linears, chosen on held-back calibration samples, carried by the
.onnx (8-bit MatMulNBits) and the .pte (XNNPACK dynamic int8 linear) and run in their runtimes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from int4_support import mlp, random_samples

from edgepack.export.base import ExportContext
from edgepack.export.onnx import OnnxArtifact, export, export_float_onnx
from edgepack.export.onnx_int4 import pack, unpack
from edgepack.quant.gptq import gptq_model
from edgepack.quant.int4 import calibrated_int4
from edgepack.quant.mixed import _per_token_int8, choose_int8, int8_weight, mixed_note


def test_int8_weight_is_symmetric_per_output_channel():
    weight = torch.tensor([[0.5, -1.27, 0.0], [2.54, 0.01, -2.54]])
    result = int8_weight(weight)
    assert result.bits == 8 and result.scales.shape == (2, 1)
    torch.testing.assert_close(result.scales, torch.tensor([[0.01], [0.02]]))
    assert result.codes.tolist() == [[50, -127, 0], [127, 0, -127]]
    torch.testing.assert_close(result.dequantized(), torch.tensor([[0.5, -1.27, 0.0], [2.54, 0.0, -2.54]]))


def test_per_token_int8_keeps_zero_and_each_rows_range():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-4.0, 0.0, 0.5, 4.0]])
    y = _per_token_int8(x)
    assert y[0, 0] == 0 and y[1, 1] == 0  # zero exactly representable
    step = (x.amax(1) - x.amin(1).clamp(max=0)) / 255
    assert torch.all((y - x).abs() <= step[:, None] / 2 + 1e-6)


def test_choose_int8_takes_the_fewest_most_harmful_linears_that_reach_the_target():
    model, names = mlp(), ["0", "2", "4"]
    int4 = gptq_model(model, names, random_samples(8, seed=1), 32)
    selection = random_samples(8, seed=2)
    # No target reachable by int4: every step is recorded, and it ends all-int8.
    everything, record = choose_int8(model, int4, selection, min_cosine=1.0, min_sqnr_db=99.0)
    assert not record["reached"] and sorted(record["int8_layers"]) == names and record["int8_weight_share"] == 1.0
    assert all(everything[name].bits == 8 for name in names)
    sqnr = [step["sqnr_db"] for step in record["steps"]]
    assert sqnr[0] == record["all_int4"]["sqnr_db"] and sqnr[-1] == record["all_int8"]["sqnr_db"]
    assert sqnr[-1] > sqnr[0] + 10  # 8-bit weights: far less error than 4-bit
    # The first step's figure (rounded to 0.01 dB) as the target: exactly the Linear that step added.
    first = record["steps"][1]
    chosen, one = choose_int8(model, int4, selection, min_cosine=0.0, min_sqnr_db=first["sqnr_db"] - 0.01)
    assert one["reached"] and one["int8_layers"] == [first["added"]]
    assert [name for name in names if chosen[name].bits == 8] == [first["added"]]
    assert all(torch.equal(chosen[n].codes, int4[n].codes) for n in names if n != first["added"])
    # Already reached with int4: nothing moves.
    same, none = choose_int8(model, int4, selection, min_cosine=0.0, min_sqnr_db=sqnr[0] - 1)
    assert none["reached"] and none["int8_layers"] == [] and all(same[n] is int4[n] for n in names)
    assert "0 Linear(s) int8" in mixed_note({**none, "selection_samples": 8})


def test_pack_8bit_repeats_the_channel_scale_over_blocks():
    weight = int8_weight(torch.randn(4, 64))
    packed, scales = pack(weight, 32)
    assert packed.shape == (4, 2, 32) and scales.shape == (4, 2)
    np.testing.assert_array_equal(unpack(packed, scales, bits=8), weight.dequantized().numpy())
    with pytest.raises(ValueError, match="do not divide"):
        pack(int8_weight(torch.randn(4, 48)), 32)


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Linear(64, 32)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.tokens(x)))


def _case(tmp_path):
    torch.manual_seed(0)
    model = TwoLinears().eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(1, 6, 64, generator=gen),) for _ in range(10)]
    reference = export_float_onnx(model, calibration[0], tmp_path / "reference.onnx", ["x"], ["out"])[0]
    ctx = ExportContext(model=model, example_inputs=calibration[0], calibration=calibration, input_names=["x"],
                        output_names=["out"], workdir=tmp_path, reference_onnx=reference)
    return model, calibration, ctx


def _one_int8_target(model, calibration) -> tuple[dict, str]:
    """The target its first step reaches: exactly one Linear int8."""
    _, record = calibrated_int4(model, ["head", "tokens"], calibration, calibration[0], 32, 6,
                                {"min_cosine": 1.0, "min_sqnr_db": 99.0})
    step = record["mixed_int8"]["steps"][1]
    return {"min_cosine": 0.0, "min_sqnr_db": step["sqnr_db"] - 0.01}, step["added"]  # figures rounded to 0.01


def test_the_onnx_carries_int8_and_int4_matmuls_and_runs_them(tmp_path):
    model, calibration, ctx = _case(tmp_path)
    target, added = _one_int8_target(model, calibration)
    result = export(OnnxArtifact(precision="int4-weight", calibration_samples=6, mixed_int8=target), ctx)
    recipe = result.details["quantization"]
    assert recipe["int8_matmuls"] == 1 and recipe["codes_carried"] == 2
    assert recipe["mixed_int8"]["int8_layers"] == [added]
    assert any(note.startswith("mixed_int8: 1 Linear(s) int8") for note in result.notes)
    weights, _ = calibrated_int4(model, ["head", "tokens"], calibration, calibration[0], 32, 6, target)
    onnx_model = onnx.load(str(result.files[0]))
    initializers = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    bits = {}
    for node in onnx_model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            linear = "tokens" if attrs["K"] == 64 else "head"
            bits[linear] = attrs["bits"]
            stored = unpack(initializers[node.input[1]], initializers[node.input[2]], attrs["bits"])
            np.testing.assert_array_equal(stored, weights[linear].dequantized().numpy())
    assert bits == {added: 8, ({"head", "tokens"} - {added}).pop(): 4}
    session = ort.InferenceSession(str(result.files[0]), providers=["CPUExecutionProvider"])
    x = calibration[7][0]
    with torch.no_grad():
        model.tokens.weight.copy_(weights["tokens"].dequantized())
        model.head.weight.copy_(weights["head"].dequantized())
        want = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, rtol=1e-4, atol=1e-5)


def test_the_pte_carries_int8_and_int4_linears_and_runs_them(tmp_path):
    pytest.importorskip("executorch")
    from executorch.runtime import Runtime

    from edgepack.export.executorch import ExecuTorchArtifact
    from edgepack.export.executorch import export as export_pte

    model, calibration, ctx = _case(tmp_path)
    target, added = _one_int8_target(model, calibration)
    result = export_pte(ExecuTorchArtifact(precision="int4-weight", calibration_samples=6, mixed_int8=target), ctx)
    quantization = result.details["quantization"]
    assert quantization["int8_layers"] == [added] and quantization["mixed_int8"]["int8_layers"] == [added]
    assert any(note.startswith("mixed_int8: 1 Linear(s) int8") for note in result.notes)
    weights, _ = calibrated_int4(model, ["head", "tokens"], calibration, calibration[0], 32, 6, target)
    method = Runtime.get().load_program(str(result.files[0])).load_method("forward")
    x = calibration[7][0]
    got = method.execute((x,))[0]
    with torch.no_grad():  # the shipped weights, inputs int8 per token: what XNNPACK computes
        hidden = torch.relu(nn.functional.linear(_per_token_int8(x), weights["tokens"].dequantized(),
                                                 model.tokens.bias))
        want = nn.functional.linear(_per_token_int8(hidden), weights["head"].dequantized(), model.head.bias)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)
