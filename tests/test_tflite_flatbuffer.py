"""export/tflite_flatbuffer.py: the int32 bias scale check and repair, and the facts read from a
.tflite's flatbuffer (ops, float compute ops, signature IO)."""

from __future__ import annotations

import numpy as np
import torch

from edgepack.export.tflite_flatbuffer import describe
from edgepack.runtimes import litert
from edgepack.runtimes.base import from_native, to_native
from test_tflite import DropoutHead, _bias_scale_errors, _compare, _export, _inputs


def test_describe_reads_ops_and_signature_io(tmp_path_factory):
    torch.manual_seed(0)
    model, shapes = DropoutHead().eval(), [(1, 3, 8, 8)]
    fp32 = describe(_export(tmp_path_factory, model, shapes, precision="fp32").files[0].read_bytes())
    int8 = describe(_export(tmp_path_factory, model, shapes, precision="int8", io="int8").files[0].read_bytes())
    assert fp32["ops"].get("CONV_2D") == 1 and fp32["ops"].get("FULLY_CONNECTED") == 1
    assert list(fp32["signature_io"]["inputs"].values()) == ["float32"]
    assert list(int8["signature_io"]["inputs"].values()) == ["int8"]
    assert set(int8["float_compute_ops"]) <= set(int8["ops"]) and "CONV_2D" not in int8["float_compute_ops"]
    assert fp32["activation_bytes_upper_bound"] >= 4 * 3 * 8 * 8  # at least the float input itself


def test_int8_bias_scales_match_the_kernel_scale(tmp_path_factory):
    torch.manual_seed(0)
    model = DropoutHead().eval()
    shapes = [(1, 3, 8, 8)]
    result = _export(tmp_path_factory, model, shapes, precision="int8")
    errors = _bias_scale_errors(result.files[0].read_bytes())
    assert len(errors) == 2 and max(errors) < 1e-4, errors
    assert result.details["bias_scales_repaired"] == []
    stats, _ = _compare(model, shapes, result.files[0])
    assert stats[0][1] >= 0.999, stats


def test_repair_bias_scales_requantizes_a_bias_on_the_wrong_scale(tmp_path_factory):
    """The converter defect, made by hand: the FC bias quantized for an input scale 1.3x the
    one the op reads. The kernel ignores the bias tensor's scale, so outputs drift until the
    repair puts the bias back on input scale x weight scale."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils
    from edgepack.export.tflite_flatbuffer import repair_bias_scales

    torch.manual_seed(0)
    model, shapes = DropoutHead().eval(), [(1, 3, 8, 8)]
    with torch.no_grad():
        model.fc.bias.uniform_(-2.0, 2.0)  # a bias that matters next to the output quantum
    result = _export(tmp_path_factory, model, shapes, precision="int8")
    good = result.files[0].read_bytes()
    assert repair_bias_scales(good) == (good, [])
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(good))
    sg = model.subgraphs[0]
    fc = next(op for op in sg.operators
              if model.operatorCodes[op.opcodeIndex].builtinCode == fb.BuiltinOperator.FULLY_CONNECTED)
    bias = sg.tensors[fc.inputs[2]]
    values = np.frombuffer(bytes(bytearray(model.buffers[bias.buffer].data)), np.int32)
    model.buffers[bias.buffer].data = np.frombuffer(np.round(values / 1.3).astype(np.int32).tobytes(), np.uint8)
    bias.quantization.scale = [s * 1.3 for s in bias.quantization.scale]
    broken = bytes(flatbuffer_utils.convert_object_to_bytearray(model))

    repaired, records = repair_bias_scales(broken)
    assert [(r["op"], r["scale_error"]) for r in records] == [("FULLY_CONNECTED", 0.3)]
    paths = {}
    for name, data in (("good", good), ("broken", broken), ("repaired", repaired)):
        paths[name] = tmp_path_factory.mktemp("bias") / "model.tflite"
        paths[name].write_bytes(data)
    outputs = {}
    for name, path in paths.items():
        runner = litert.load(str(path), threads=1)
        outputs[name] = np.stack([from_native(runner.run(to_native([t.numpy() for t in s], runner.inputs)),
                                              runner.outputs)[0] for s in _inputs(shapes, 8, seed=2)])
    quantum = float(np.abs(np.diff(np.unique(outputs["good"]))).min())
    assert np.abs(outputs["broken"] - outputs["good"]).max() > 3 * quantum
    assert np.abs(outputs["repaired"] - outputs["good"]).max() <= 1.01 * quantum
