"""Estimated latency on the target device: a roofline over the float ONNX graph, and for an arm64
CPU whose profile names its cores (device.cpu), a calibrated estimate that replaces it.

For every node: MACs (Conv, ConvTranspose, Gemm, MatMul; elementwise and pooling ops count
one op per output element) and bytes moved (weights at the artifact's precision plus input
and output activations). Each node takes max(ops / peak ops/s, bytes / memory bandwidth);
the estimate is the sum. Assumptions, recorded with the figure: one batch-1 inference, no
overlap between nodes, peak throughput reachable at the profile's thread count, activations
round-trip memory between nodes (no fusion), every node runs at the artifact's precision.
It is an estimate to compare artifacts and targets, not a measurement.

The calibrated arm64 estimate (``calibrated_ms``; the fit and all its inputs are in
costmodel_fit.json, made by benchmarks/costmodel_fit.py): per op class (XNNPACK's kernel types:
gemm for 1x1 convs and matmuls, conv for spatial convs, depthwise, elementwise) and kernel family (fp32 FMLA, int8 SDOT, int8 NEON SMLAL), the
executed aarch64 instructions per MAC (or per output) that XNNPACK's kernels take, counted under
qemu; the instructions over the device's threads' clocks, scaled by the core's per-clock speed
relative to an A76 and by one instructions-per-cycle constant fitted on published phone
latencies. The roofline stays in the record (``roofline_ms``): on the android-arm64 device class
it said 2.59 ms for EfficientNet-Lite0 int8, where a Pixel 4 measured 6.5 ms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
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
    # XNNPACK's kernel types: gemm (1x1 conv, Gemm, MatMul), conv (a spatial conv: IGEMM), depthwise
    # (grouped conv: DWCONV), elementwise (everything else)
    op_class: str = "elementwise"


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
        op_class = "elementwise"
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in shapes:
            w = shapes[node.input[1]]  # [Cout, Cin/groups, kh, kw]
            per_output = int(np.prod(w[1:]))
            macs = out_elems * per_output if node.op_type == "Conv" else int(np.prod(shapes.get(node.input[0], [0]))) * w[1] * int(np.prod(w[2:]))
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            op_class = "depthwise" if groups > 1 else "gemm" if int(np.prod(w[2:])) == 1 else "conv"
        elif node.op_type in ("Gemm", "MatMul") and node.input[0] in shapes:
            k = shapes[node.input[0]][-1]
            macs = out_elems * k
            op_class = "gemm"
        else:
            other = out_elems
        costs.append(NodeCost(node.name or node.op_type, node.op_type, int(macs), int(other), weight_elems, act_elems,
                              op_class))
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
    roofline = {
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
    cpu = getattr(device, "cpu", None)
    described = None if cpu is None else cpu.model_dump() if hasattr(cpu, "model_dump") else dict(cpu)
    if described is None or kernel_family(precision, described) not in load_fit()["fitted"]["instructions_per"]:
        return roofline
    calibrated = calibrated_ms(class_counts(costs), precision, described)
    fit = load_fit()
    return {**{k: v for k, v in roofline.items() if k != "assumptions"},
            "latency_ms": round(calibrated, 4), "method": "calibrated arm64 estimate (costmodel_fit.json)",
            "roofline_ms": roofline["latency_ms"], "cpu": described, "kernel_family": kernel_family(precision, described),
            "fit_error_vs_published": {f"{r['model']} {r['precision']} {r['phone']}": r["error"]
                                       for r in fit.get("residuals", [])},
            "assumptions": CALIBRATED_ASSUMPTIONS}


CALIBRATED_ASSUMPTIONS = [
    "per op class and kernel family, the aarch64 instructions per MAC (gemm, conv, depthwise) or per output "
    "(elementwise) that XNNPACK's kernels executed under qemu (costmodel_fit.json)",
    "time = instructions / (instructions per cycle x the core's per-clock speed relative to an A76 x the sum of "
    "the threads' clocks): one constant fitted on published phone latencies",
    "int8 runs the device's int8 kernel family (sdot: dot product, smlal: NEON widening multiply); fp16 weights "
    "and weight-only precisions run fp32 or int8 kernels as the runtime does on a CPU",
    "no memory or cache model beyond what the fitted constant absorbs; batch 1",
]


MAC_CLASSES = ("gemm", "conv", "depthwise")


def class_counts(costs: list[NodeCost]) -> dict[str, int]:
    """MACs per op class and elementwise outputs (what the calibrated estimate needs of a graph)."""
    counts = {f"{name}_macs": sum(c.macs for c in costs if c.op_class == name) for name in MAC_CLASSES}
    return {**counts, "elementwise": sum(c.other_ops for c in costs)}


@lru_cache(maxsize=1)
def load_fit() -> dict:
    return json.loads((Path(__file__).resolve().parent / "costmodel_fit.json").read_text())


def kernel_family(precision: str, cpu: dict) -> str:
    if precision in ("fp32", "fp16"):
        return "fp32"
    return f"int8-{cpu['int8_kernels']}"


def calibrated_ms(classes: dict, precision: str, cpu: dict, fit: dict | None = None) -> float:
    """Milliseconds per inference on ``cpu`` (core, ghz per thread, int8_kernels) for a graph with
    ``classes`` (class_counts), from the fit's instructions per MAC and instructions per cycle."""
    fit = fit or load_fit()
    per = fit["fitted"]["instructions_per"][kernel_family(precision, cpu)]
    instructions = (sum(classes[f"{name}_macs"] * per[name] for name in MAC_CLASSES)
                    + classes["elementwise"] * per["elementwise"])
    speed = fit["cores"][cpu["core"]]["relative_per_clock"]
    cycles_per_s = fit["fitted"]["instructions_per_cycle"] * speed * sum(cpu["ghz"]) * 1e9
    return 1e3 * instructions / cycles_per_s
