"""analysis/qdq_profile.py: the ONNX int8 recipe's error along the network, measured in onnxruntime."""

from __future__ import annotations

from pathlib import Path

from edgepack.analysis.qdq_profile import profile_onnx_recipe
from edgepack.export.onnx import OnnxArtifact
from edgepack.spec import load_spec

TEST_MODELS = Path(__file__).resolve().parent / "models"


def test_profile_follows_the_qdq_model_tensor_by_tensor(tmp_path):
    spec = load_spec(str(TEST_MODELS / "conv_stack.py"))
    rows = profile_onnx_recipe(spec.model, spec, OnnxArtifact(precision="int8"), list(spec.calibration), 4, tmp_path)
    assert rows and [r["index"] for r in rows] == list(range(len(rows)))
    assert rows[0]["op"] == "input"  # the first activation quantized is the model input
    assert {"Conv", "Relu"} & {r["op"] for r in rows}
    for row in rows:
        assert 10.0 < row["sqnr_db"] < 200.0 and 0.9 < row["cosine"] <= 1.0 and row["max_abs_error"] >= 0.0
    # the error accumulates: the last activation is no cleaner than the input's quantization
    assert rows[-1]["sqnr_db"] <= rows[0]["sqnr_db"] + 1.0
    assert (tmp_path / "onnx" / "int8.onnx").is_file()
