"""export/onnx_float.py: the float ONNX every ONNX artifact and the reference start from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgepack.errors import ExportError
from edgepack.export.onnx_float import DEFAULT_OPSET, export_float_onnx


def test_export_names_io_and_matches_torch(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    files = export_float_onnx(model, (x,), tmp_path / "m.onnx", ["image"], ["logits"])
    assert files == [tmp_path / "m.onnx"]
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["logits"]
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], model(x).detach().numpy(), rtol=1e-4,
                               atol=1e-5)
    import onnx

    assert onnx.load(str(files[0])).opset_import[0].version == DEFAULT_OPSET


def test_large_weights_go_to_external_data(tmp_path):
    model = nn.Linear(512, 512).eval()
    files = export_float_onnx(model, (torch.randn(1, 512),), tmp_path / "m.onnx", ["x"], ["y"], external_data_mb=0.5)
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    assert files[1].stat().st_size >= 512 * 512 * 4


def test_a_model_onnx_cannot_express_is_an_export_error(tmp_path):
    from edgepack.spec import load_spec

    spec = load_spec(str(Path(__file__).parent / "models" / "custom_op.py"))  # a torch.library op, no ONNX
    with pytest.raises(ExportError, match="onnx: torch.onnx.export failed") as caught:
        export_float_onnx(spec.model, spec.example_inputs, tmp_path / "m.onnx", ["x"], ["y"])
    assert "edgepack_test.wobble" in caught.value.message and not (tmp_path / "m.onnx").exists()


def test_the_same_spec_from_two_checkouts_gives_the_same_onnx_bytes(tmp_path):
    """The exporter records each op's Python stack (absolute file paths) and the spec module's
    name: both must not depend on where the spec file lies, or a checkout elsewhere (another CI
    runner, a fleet worker) writes different bytes for the same model."""
    import shutil

    from conftest import TEST_MODELS
    from edgepack.spec import load_spec

    files = []
    for where in ("a/checkout", "b/elsewhere/deeper"):
        folder = tmp_path / where
        folder.mkdir(parents=True)
        shutil.copy(TEST_MODELS / "two_io.py", folder / "two_io.py")
        spec = load_spec(str(folder / "two_io.py"))
        path = export_float_onnx(spec.model.eval(), spec.example_inputs, tmp_path / where / "model.onnx",
                                 spec.resolved_input_names(), spec.resolved_output_names(2))[0]
        files.append(path.read_bytes())
    assert files[0] == files[1]
    assert str(tmp_path).encode() not in files[0] and b"stack_trace" not in files[0]
