"""Edits and facts read straight from a .tflite flatbuffer (ai_edge_litert's schema), after
conversion: float IO around int8 IO, the int32 bias scale repair, and the op/IO/memory facts the
manifest records. No conversion here: export/tflite.py converts and calls these."""

from __future__ import annotations

from typing import Any

from ..errors import ExportError

_QUANTIZED_IO = {9: 2, 3: 1}  # TensorType INT8 / UINT8 -> QUANTIZE/DEQUANTIZE op version


def float_io(buffer: bytes) -> bytes:
    """Give a model with int8 IO float32 IO: QUANTIZE after each int8 input, DEQUANTIZE before
    each int8 output, reusing the tensors' own scale/zero point (what TFLite's old converter
    emitted for inference_input_type=float). The float tensors take over the original names and
    signature entries, so a device feeds float32 under the same names."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(buffer))

    def opcode(code: int, version: int) -> int:
        for index, oc in enumerate(model.operatorCodes):
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code and oc.version == version:
                return index
        oc = fb.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), version
        model.operatorCodes.append(oc)
        return len(model.operatorCodes) - 1

    for sg_index, sg in enumerate(model.subgraphs):
        signatures = [s for s in (model.signatureDefs or []) if s.subgraphIndex == sg_index]
        if sg_index and not signatures:
            continue  # control-flow body subgraphs keep their internal int8 tensors
        added = {True: [], False: []}
        for is_input, indices in ((True, sg.inputs), (False, sg.outputs)):
            for pos, q_index in enumerate(indices):
                q = sg.tensors[q_index]
                if q.type not in _QUANTIZED_IO:
                    continue
                f = fb.TensorT()
                f.name, f.type, f.buffer, f.hasRank = q.name, fb.TensorType.FLOAT32, 0, q.hasRank
                f.shape = list(q.shape)
                f.shapeSignature = None if q.shapeSignature is None else list(q.shapeSignature)
                q.name = (q.name.decode() if isinstance(q.name, bytes) else q.name) + "_int8"
                sg.tensors.append(f)
                f_index = len(sg.tensors) - 1
                op = fb.OperatorT()
                if is_input:
                    op.opcodeIndex = opcode(fb.BuiltinOperator.QUANTIZE, _QUANTIZED_IO[q.type])
                    op.inputs, op.outputs = [f_index], [q_index]
                else:
                    op.opcodeIndex = opcode(fb.BuiltinOperator.DEQUANTIZE, _QUANTIZED_IO[q.type])
                    op.inputs, op.outputs = [q_index], [f_index]
                added[is_input].append(op)
                indices[pos] = f_index
                for signature in signatures:
                    for entry in (signature.inputs if is_input else signature.outputs):
                        if entry.tensorIndex == q_index:
                            entry.tensorIndex = f_index
        sg.operators = added[True] + list(sg.operators) + added[False]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


_BIASED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "CONV_3D")
_BIAS_SCALE_RTOL = 1e-4  # float32 rounding of the product is ~1e-7; the defect below is ~0.1-0.5


def repair_bias_scales(buffer: bytes) -> tuple[bytes, list[dict[str, Any]]]:
    """Make every int32 bias of an int8 conv / fully-connected op sit on the scale the kernel
    uses: input scale x weight scale (per channel). TFLite's int8 kernels assume that scale and
    ignore the bias tensor's own.

    litert-torch 0.10.0 breaks it when it folds a requantize chain (quantize -> dequantize ->
    quantize, which PT2E leaves where an op no quantizer annotates sits between a quantized
    producer and a conv/linear): the op keeps the first scale on its input while the bias is
    quantized with the second. Measured on MobileNetV2 224 (dropout before the classifier):
    the classifier's bias came out 1.43x too large, logit SQNR 14.2 dB where the quantized
    torch graph gives 21.5 dB; with the bias requantized, 21.7 dB. pt2e.capture removes the
    chain for eval-mode dropout; this repair covers any other op that leaves one.

    Returns (buffer, one record per bias requantized); the buffer is unchanged if none was."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(buffer))
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    repaired: list[dict[str, Any]] = []
    for sg_index, sg in enumerate(model.subgraphs):
        for op_index, op in enumerate(sg.operators):
            oc = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode))
            if name not in _BIASED_OPS or len(op.inputs) < 3 or op.inputs[2] < 0:
                continue
            x, w, b = (sg.tensors[i] for i in (op.inputs[0], op.inputs[1], op.inputs[2]))
            if b.type != fb.TensorType.INT32 or x.type not in (fb.TensorType.INT8, fb.TensorType.UINT8):
                continue
            if any(t.quantization is None or t.quantization.scale is None for t in (x, w, b)):
                continue
            want = np.asarray(x.quantization.scale, np.float64) * np.asarray(w.quantization.scale, np.float64)
            have = np.asarray(b.quantization.scale, np.float64)
            if have.size != want.size and 1 not in (have.size, want.size):
                continue  # not a layout this check understands; leave it as converted
            error = float(np.max(np.abs(have / want - 1.0)))
            if error <= _BIAS_SCALE_RTOL:
                continue
            data = model.buffers[b.buffer].data
            bias_name = b.name.decode() if isinstance(b.name, bytes) else b.name
            if data is None or len(data) == 0:
                raise ExportError(f"tflite int8: bias {bias_name} of {name} op {op_index} is on scale "
                                  f"{error:.1%} off input x weight scale and its data is not inline",
                                  "use quantizer: ai-edge-quantizer for this model")
            values = np.frombuffer(bytes(bytearray(data)), np.int32).astype(np.float64)
            fixed = np.clip(np.round(values * have / want), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
            model.buffers[b.buffer].data = np.frombuffer(fixed.tobytes(), np.uint8)
            b.quantization.scale = np.broadcast_to(want, np.broadcast_shapes(want.shape, have.shape)
                                                   ).astype(np.float32).tolist()
            b.quantization.zeroPoint = [0] * len(b.quantization.scale)
            repaired.append({"op": name, "subgraph": sg_index, "index": op_index, "bias": bias_name,
                             "scale_error": round(error, 4)})
    if not repaired:
        return buffer, []
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), repaired


_TYPE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8, 15: 4, 16: 2, 18: 2}
_NUMPY_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16",
                9: "int8", 10: "float64", 15: "uint32", 16: "uint16", 18: "bfloat16"}


def describe(buffer: bytes) -> dict[str, Any]:
    """Facts read from the flatbuffer itself (not the interpreter, which shows XNNPACK's
    DELEGATE node instead of the ops): builtin op counts, ops still computing in float, the
    EMBEDDING_LOOKUP tables (dtype, scales, a nonzero zero point), signature IO dtypes, and an
    upper bound on activation memory (ai-edge-litert 2.3's Interpreter does not expose its arena
    size; the arena reuses memory, so it is smaller)."""
    from ai_edge_litert import schema_py_generated as fb

    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    model = fb.Model.GetRootAs(buffer, 0)
    sg = model.Subgraphs(0)
    ops: dict[str, int] = {}
    float_ops: dict[str, int] = {}
    tables: list[dict[str, Any]] = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        name = names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), oc.CustomCode() or "CUSTOM")
        name = name.decode() if isinstance(name, bytes) else name
        ops[name] = ops.get(name, 0) + 1
        if name == "EMBEDDING_LOOKUP" and op.InputsLength() > 1:  # inputs: ids, table
            table = sg.Tensors(op.Inputs(1))
            quant = table.Quantization()
            zero_points = [quant.ZeroPoint(j) for j in range(quant.ZeroPointLength())] if quant else []
            # LiteRT's int8 lookup kernel requires zero point 0 (embedding_lookup.cc), else the model won't load
            tables.append({"dtype": _NUMPY_NAMES.get(table.Type(), "other"),
                           "scales": quant.ScaleLength() if quant else 0, "nonzero_zero_point": any(zero_points)})
        outputs = [sg.Tensors(op.Outputs(j)).Type() for j in range(op.OutputsLength()) if op.Outputs(j) >= 0]
        if name not in ("QUANTIZE", "DEQUANTIZE") and 0 in outputs:
            float_ops[name] = float_ops.get(name, 0) + 1
    activation_bytes = 0
    for i in range(sg.TensorsLength()):
        tensor = sg.Tensors(i)
        buf = model.Buffers(tensor.Buffer())
        if buf is not None and (buf.DataLength() or buf.Size()):
            continue  # constant
        numel = 1
        for d in range(tensor.ShapeLength()):
            numel *= max(1, tensor.Shape(d))
        activation_bytes += numel * _TYPE_BYTES.get(tensor.Type(), 4)
    io: dict[str, dict[str, str]] = {"inputs": {}, "outputs": {}}
    if model.SignatureDefsLength():
        sig = model.SignatureDefs(0)
        for key, count, get in (("inputs", sig.InputsLength(), sig.Inputs), ("outputs", sig.OutputsLength(), sig.Outputs)):
            for j in range(count):
                entry = get(j)
                io[key][entry.Name().decode()] = _NUMPY_NAMES.get(sg.Tensors(entry.TensorIndex()).Type(), "other")
    return {"ops": dict(sorted(ops.items())), "float_compute_ops": dict(sorted(float_ops.items())),
            "signature_io": io, "activation_bytes_upper_bound": activation_bytes, "lookup_tables": tables}
