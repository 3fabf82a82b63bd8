"""Static int8 ONNX quantized in torch: edgepack's PT2E recipe (quant/), exported as QDQ ONNX.

    quantize(model, example, calibration, recipe_for(config))   # quant/calibrate.py, the x86 quantizer:
                                                                # clamp fusion, MSE ranges, bias correction,
                                                                # uint8 activations, int8 per-channel weights
    -> torch.export.export(converted) -> torch.onnx.export(dynamo=True)
       (quantized_decomposed q/dq ops become QuantizeLinear/DequantizeLinear, weights int8 initializers)
    -> fold_pads: a zero Pad between a DequantizeLinear and a Conv goes into the Conv's pads
    -> protect_float_layers: float_layers stay float under onnxruntime

Why in torch and not onnxruntime's quantize_static: the recipe the .pte and .tflite use is what
keeps trained weights accurate. EfficientNet-Lite0 (real weights, 16 held-out photo views, Xeon
with AVX-512 VNNI, onnxruntime, 2 threads): quantize_static u8s8 + reduce_range gave logits
cosine min 0.774, SQNR 8.1 dB, top-1 10/16 at 1.93x fp32 speed; this path 0.995, 20.6 dB, 16/16
at 1.94x. MobileNetV2: 0.963 / 13.7 dB -> 0.9935 / 20.6 dB. The same recipe also makes the
per-layer diagnosis and the fallback ranking (analysis/) describe this artifact.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..quant.calibrate import quantize
from ..quant.recipe import recipe_for, recipe_reason
from .base import ExportContext, data_dependent_control_flow


def _const(model, name: str):
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _consumers(graph) -> dict[str, list]:
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def fold_pads(model) -> int:
    """Pad(x, zeros) -> Q -> DQ -> Conv  becomes  Q(x) -> DQ -> Conv(pads += pad), in place.

    Exact: the zero the Pad inserts quantizes to the zero point, which is what the Conv's own
    padding of the dequantized input gives. EfficientNet-Lite's TF-"same" padding (F.pad, often
    asymmetric) otherwise stays a float Pad with an extra DQ/Q pair that onnxruntime cannot fuse
    (17 of them in EfficientNet-Lite0). Returns the number of Pads folded."""
    from onnx import helper

    graph = model.graph
    consumers, outputs = _consumers(graph), {o.name for o in graph.output}
    dead = []
    for pad in list(graph.node):
        if pad.op_type != "Pad":
            continue
        mode = next((helper.get_attribute_value(a) for a in pad.attribute if a.name == "mode"), b"constant")
        pads = _const(model, pad.input[1])
        value = _const(model, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        if mode not in (b"constant", "constant") or pads is None or value is None or np.any(value != 0) \
                or (len(pad.input) > 3 and pad.input[3]):
            continue
        pads = pads.astype(np.int64).tolist()
        rank = len(pads) // 2
        if rank < 3 or any(pads[d] or pads[rank + d] for d in (0, 1)) or min(pads) < 0:
            continue
        qs = consumers.get(pad.output[0], [])
        if pad.output[0] in outputs or len(qs) != 1 or qs[0].op_type != "QuantizeLinear":
            continue
        q = qs[0]
        dqs = consumers.get(q.output[0], [])
        if q.output[0] in outputs or not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs
                                                    for d in dqs):
            continue
        dq_outputs = {d.output[0] for d in dqs}
        convs = [c for d in dqs for c in consumers.get(d.output[0], [])]
        if any(c.op_type != "Conv" or c.input[0] not in dq_outputs for c in convs):
            continue
        if any(helper.get_attribute_value(a) not in (b"NOTSET", "NOTSET") for c in convs for a in c.attribute
               if a.name == "auto_pad"):
            continue
        spatial = rank - 2
        for conv in convs:
            attrs = {a.name: a for a in conv.attribute}
            old = list(helper.get_attribute_value(attrs["pads"])) if "pads" in attrs else [0] * (2 * spatial)
            new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i]
                                                                    for i in range(spatial)]
            if "pads" in attrs:
                conv.attribute.remove(attrs["pads"])
            conv.attribute.append(helper.make_attribute("pads", new))
        q.input[0] = pad.input[0]
        dead.append(pad)
    for node in dead:
        graph.node.remove(node)
    if dead:  # the exporter's value_info has the padded shapes of the Q/DQ outputs
        del graph.value_info[:]
    return len(dead)


def protect_float_layers(model) -> list[str]:
    """Keep Conv/Gemm nodes with a float weight (float_layers) float under onnxruntime, in place.

    onnxruntime's WeightBiasQuantization (>= 1.20) quantizes the float weight of any Conv/Gemm
    between a per-tensor DequantizeLinear and a QuantizeLinear to int8 *per tensor* and fuses it,
    undoing the fallback (measured: EfficientNet-Lite0 with its worst depthwise conv in float
    came out with it as a QLinearConv, cosine min 0.95). It fires only when the input DQ has a
    scalar scale, so such a node's input DQ gets per-channel (axis 1) copies of the same scale
    and zero point: numerically identical, but no longer a QDQ node unit. Returns the node names."""
    import onnx
    from onnx import helper, numpy_helper

    from .onnx_quant import sort_topologically

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    protected = []
    for node in list(graph.node):
        weight = initializers.get(node.input[1]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 else None
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT:
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        scale = _const(model, dq.input[1])
        zero_point = _const(model, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
        shape = shapes.get(dq.output[0]) or shapes.get(dq.input[0])
        if scale is None or scale.size != 1 or zero_point is None or not shape or len(shape) < 2 or not shape[1]:
            continue
        scale_name, zero_name = f"{node.name}_in_scale_pc", f"{node.name}_in_zp_pc"
        graph.initializer.append(numpy_helper.from_array(np.full(shape[1], scale.reshape(()), scale.dtype), scale_name))
        graph.initializer.append(numpy_helper.from_array(
            np.full(shape[1], zero_point.reshape(()), zero_point.dtype), zero_name))
        output = f"{dq.output[0]}_pc_{node.name}"
        graph.node.append(helper.make_node("DequantizeLinear", [dq.input[0], scale_name, zero_name], [output],
                                           name=f"{node.name}_input_dq_pc", axis=1))
        node.input[0] = output
        protected.append(node.name)
    if protected:
        sort_topologically(graph)
    return protected


def export_qdq(converted, example_inputs: tuple, path: Path, input_names: list[str], output_names: list[str],
               opset: int):
    """torch.export the converted graph, then torch.onnx.export(dynamo=True); the ModelProto."""
    import onnx
    import torch

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(torch.export.export(converted, tuple(example_inputs)), dynamo=True,
                                        input_names=list(input_names), output_names=list(output_names),
                                        opset_version=opset, optimize=True, verbose=False)
            program.save(str(path))
    except Exception as exc:  # torch.export / the ONNX exporter raise anything; re-raised with context
        untraceable = data_dependent_control_flow(exc)
        if untraceable is not None:
            raise untraceable from exc
        raise ExportError(f"onnx int8: exporting the torch-quantized graph failed: {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:400]}",
                          "set quantizer: onnxruntime on this artifact (onnxruntime's own quantizer), or "
                          "report the model (run with --debug for the traceback)") from exc
    return onnx.load(str(path))


def to_int8_torch(config, ctx: ExportContext, scratch: Path):
    """The static int8 QDQ ONNX made with the PT2E recipe: (ModelProto, recipe record)."""
    recipe = recipe_for(config)
    if not ctx.calibration:
        raise ExportError("onnx int8: no calibration samples", "give the spec real calibration inputs")
    training = ctx.model.training
    ctx.model.eval()
    try:
        converted, record = quantize(ctx.model, tuple(ctx.example_inputs), list(ctx.calibration), recipe,
                                     reason=recipe_reason(config))
    finally:
        ctx.model.train(training)
    model = export_qdq(converted, ctx.example_inputs, scratch / "int8_torch.onnx", ctx.input_names,
                       ctx.output_names, config.opset)
    folded = fold_pads(model)
    protected = protect_float_layers(model) if recipe.float_layers else []
    record.update({"method": "pt2e-ptq, torch.onnx.export(dynamo=True)", "format": "QDQ",
                   "activation_type": "uint8", "weight_type": "int8", "per_channel": config.per_channel,
                   "reduce_range": config.reduce_range, "pads_folded": folded, "float_nodes_protected": protected})
    return model, record
