"""int4-weight ONNX helpers: Gemm rewritten as MatMul, and given 4-bit codes written into MatMulNBits.

onnxruntime's MatMulNBitsQuantizer chooses its codes by round-to-nearest. To ship codes chosen
otherwise (GPTQ, quant/gptq.py) the quantizer still builds the graph, and then each MatMulNBits'
packed weight B and scales are overwritten with the given ones. MatMulNBits (com.microsoft) stores,
for a weight [K, N] with blocks of ``block_size`` along K: B uint8 [N, K / block_size, block_size / 2],
two 4-bit values per byte (the lower index in the low nibble), each value code + 8 (no zero-point
input: the zero point is 8), and scales float [N, K / block_size]. So weight[k, n] =
(nibble - 8) * scale[n, k // block_size], the transpose of nn.Linear's [out, in] layout.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..quant.gptq import IntWeight

def gemm_to_matmul(model) -> int:
    """Rewrite Gemm(A, W, C) with a constant 2-D W, alpha = beta = 1, transA = 0 as MatMul(A, W') + C,
    in place, so weight-only quantizers that handle MatMul also take Linear layers. Returns the count."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    made: dict[tuple[str, bool], str] = {}  # (weight, transposed) -> MatMul weight, when shared
    rewritten, nodes = 0, []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (weight is None or len(weight.dims) != 2 or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)):
            nodes.append(node)
            continue
        transposed = bool(attrs.get("transB", 0))
        name = made.get((weight.name, transposed))
        if name is None:  # the weight as [in, out], as MatMul wants it; the Gemm one is pruned if unused
            name = made[(weight.name, transposed)] = f"{weight.name}_kn{'_t' if transposed else ''}"
            array = numpy_helper.to_array(weight)
            model.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(array.T if transposed else array), name))
        has_bias = len(node.input) > 2 and bool(node.input[2])
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        used = {name for node in model.graph.node for name in node.input}
        replaced = {weight for weight, _ in made}
        kept = [init for init in model.graph.initializer if init.name in used or init.name not in replaced]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return rewritten


def _value_key(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).hexdigest()


def matmul_weights_of(model, torch_model: nn.Module, names: list[str]) -> dict[str, str]:
    """ONNX MatMul weight initializer -> the nn.Linear in ``names`` it holds (found by value: the
    initializer is the Linear's weight transposed, [in, out])."""
    from onnx import numpy_helper

    by_value = {}
    for name in names:
        weight = torch_model.get_submodule(name).weight.detach().float().T.numpy()
        by_value.setdefault(_value_key(weight), name)
    initializers = {init.name: init for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in initializers:
            init = initializers[node.input[1]]
            if len(init.dims) == 2:
                linear = by_value.get(_value_key(numpy_helper.to_array(init)))
                if linear is not None:
                    found[init.name] = linear
    return found


def pack(weight: IntWeight, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(B, scales) as MatMulNBits stores them (module docstring) for one Linear's codes. 8-bit codes
    (one scale per output channel) take one byte each, code + 128, the row's scale repeated over
    its ``block_size`` blocks."""
    out, inp = weight.codes.shape
    if weight.bits == 8:
        block = block_size or inp
        if inp % block:
            raise ValueError(f"MatMulNBits blocks of {block} do not divide {inp} input channels")
        packed = (weight.codes.to(torch.int16) + 128).to(torch.uint8).numpy().reshape(out, inp // block, block)
        return packed, weight.scales.float().expand(out, inp // block).contiguous().numpy()
    group = weight.group_size
    if group % 2:
        raise ValueError(f"MatMulNBits packs two 4-bit values per byte: block size {group} must be even")
    nibbles = (weight.codes.to(torch.int16) + 8).to(torch.uint8).numpy().reshape(out, inp // group, group)
    packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
    return packed, weight.scales.float().numpy()


def unpack(packed: np.ndarray, scales: np.ndarray, bits: int = 4) -> np.ndarray:
    """The dequantized weight [out, in] (nn.Linear layout) a MatMulNBits' B and scales hold."""
    out, blocks, width = packed.shape
    if bits == 8:
        return ((packed.astype(np.float32) - 128.0) * scales.reshape(out, blocks, 1)).reshape(out, blocks * width)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(out, blocks, 2 * width).astype(np.float32)
    return ((nibbles - 8.0) * scales.reshape(out, blocks, 1)).reshape(out, blocks * 2 * width)


def carry_codes(model, linears: dict[str, str], weights: dict[str, IntWeight]) -> dict[str, str]:
    """Overwrite, in place, the B and scales of every MatMulNBits whose weight was one of
    ``linears`` (initializer -> Linear, before quantization) with that Linear's given codes
    (4-bit: the quantizer named B ``{initializer}_Q4``; 8-bit: ``{initializer}_Q8``).
    Returns MatMulNBits node -> Linear for the nodes rewritten."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    by_packed = {f"{source}_Q{weights[linear].bits}": linear for source, linear in linears.items()}
    carried = {}
    for node in model.graph.node:
        linear = by_packed.get(node.input[1]) if node.op_type == "MatMulNBits" else None
        if linear is None:
            continue
        given = weights[linear]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 3 and node.input[3]:
            raise ExportError(f"onnx int4-weight: MatMulNBits {node.name} has a zero-point input; the GPTQ codes "
                              f"are symmetric", "report this with the model, or set weight_algorithm: rtn")
        b, scales = initializers[node.input[1]], initializers[node.input[2]]
        block = attrs.get("block_size")
        try:
            packed, scale_values = pack(given, block)
        except ValueError as exc:
            raise ExportError(f"onnx int4-weight: MatMulNBits {node.name}: {exc}",
                              "report this with the model, or set weight_algorithm: rtn") from exc
        if (tuple(b.dims) != packed.shape or int(np.prod(scales.dims)) != scale_values.size
                or (given.bits == 4 and block != given.group_size) or attrs.get("bits") != given.bits):
            raise ExportError(f"onnx int4-weight: MatMulNBits {node.name} (B {list(b.dims)}, {attrs.get('bits')} "
                              f"bits, block {block}) does not fit the {given.bits}-bit codes of {linear} "
                              f"{tuple(packed.shape)}", "report this with the model, or set weight_algorithm: rtn")
        b.CopyFrom(numpy_helper.from_array(packed, b.name))
        scales.CopyFrom(numpy_helper.from_array(
            scale_values.astype(numpy_helper.to_array(scales).dtype).reshape(tuple(scales.dims)), scales.name))
        carried[node.name] = linear
    return carried
