"""Estimated latency on the target device: a roofline over the float ONNX graph.

For every node: MACs (Conv, ConvTranspose, Gemm, MatMul; elementwise and pooling ops count
one op per output element) and bytes moved (weights at the artifact's precision plus input
and output activations). Each node takes max(ops / peak ops/s, bytes / memory bandwidth);
the estimate is the sum. Assumptions, recorded with the figure: one batch-1 inference, no
overlap between nodes, peak throughput reachable at the profile's thread count, activations
round-trip memory between nodes (no fusion), every node runs at the artifact's precision.
It is an estimate to compare artifacts and targets, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BYTES_PER_ELEMENT = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int8-dynamic": 1.0, "int4-weight": 0.5}
# Which peak figure of the device applies to each artifact precision.
PEAK_KEY = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8-dynamic": "int8", "int4-weight": "int8"}
# Activation bytes: dynamic and weight-only paths keep float activations.
ACTIVATION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int8-dynamic": 4.0, "int4-weight": 4.0}
# Ops that only reinterpret a tensor: no compute, no copy in an optimised runtime.
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant", "Dropout"}
ASSUMPTIONS = [
    "roofline per ONNX node of the float graph: max(ops / peak ops/s, bytes moved / memory bandwidth)",
    "ops = 2 per MAC for Conv/Gemm/MatMul, 1 per output element for other ops; reshapes are free",
    "nodes run one after another, no fusion: activations round-trip memory",
    "peak ops/s of the profile's device for the artifact's precision, reached at the profile's threads",
    "weights at the artifact's precision; activations int8 for static int8, else float",
]


@dataclass
class NodeCost:
    name: str
    op_type: str
    macs: int
    other_ops: int  # elementwise / pooling / normalisation: one op per output element
    weight_elements: int
    activation_elements: int


def _shape_map(model) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def node_costs(onnx_path: Path) -> list[NodeCost]:
    import onnx

    model = onnx.load(str(onnx_path))
    model = onnx.shape_inference.infer_shapes(model)
    shapes = _shape_map(model)
    initializers = {init.name for init in model.graph.initializer}
    costs = []
    for node in model.graph.node:
        if node.op_type in VIEW_OPS:
            continue
        out_shape = shapes.get(node.output[0]) if node.output else None
        out_elems = int(np.prod(out_shape)) if out_shape is not None else 0
        weight_elems = sum(int(np.prod(shapes[i])) for i in node.input if i in initializers and i in shapes)
        act_elems = out_elems + sum(int(np.prod(shapes[i])) for i in node.input
                                    if i and i not in initializers and i in shapes)
        macs = other = 0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in shapes:
            w = shapes[node.input[1]]  # [Cout, Cin/groups, kh, kw]
            per_output = int(np.prod(w[1:]))
            macs = out_elems * per_output if node.op_type == "Conv" else int(np.prod(shapes.get(node.input[0], [0]))) * w[1] * int(np.prod(w[2:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[0] in shapes:
            k = shapes[node.input[0]][-1]
            macs = out_elems * k
        else:
            other = out_elems
        costs.append(NodeCost(node.name or node.op_type, node.op_type, int(macs), int(other), weight_elems, act_elems))
    return costs


def estimate_latency(onnx_path: Path, precision: str, device) -> dict:
    """device: the profile's DeviceSpec (peak_gops per precision, memory_gbps)."""
    costs = node_costs(onnx_path)
    peak_key = PEAK_KEY[precision]
    peak_gops = device.peak_gops.get(peak_key) or device.peak_gops["fp32"]
    weight_bytes_per = BYTES_PER_ELEMENT[precision]
    act_bytes_per = ACTIVATION_BYTES[precision]
    total_s = compute_s = memory_s = 0.0
    macs = 0
    moved = 0.0
    for cost in costs:
        ops = 2.0 * cost.macs + cost.other_ops
        bytes_moved = cost.weight_elements * weight_bytes_per + cost.activation_elements * act_bytes_per
        t_compute = ops / (peak_gops * 1e9)
        t_memory = bytes_moved / (device.memory_gbps * 1e9)
        total_s += max(t_compute, t_memory)
        compute_s += t_compute
        memory_s += t_memory
        macs += cost.macs
        moved += bytes_moved
    return {
        "source": "estimate",
        "latency_ms": round(total_s * 1e3, 4),
        "compute_bound_ms": round(compute_s * 1e3, 4),
        "memory_bound_ms": round(memory_s * 1e3, 4),
        "macs": int(macs),
        "bytes_moved": int(moved),
        "peak_gops": float(peak_gops),
        "peak_precision": peak_key,
        "memory_gbps": float(device.memory_gbps),
        "nodes": len(costs),
        "assumptions": ASSUMPTIONS,
    }
