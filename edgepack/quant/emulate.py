"""Observer emulation: every observer of a calibrated PT2E graph becomes a switch that is either
the identity (float) or the int8 fake-quantize with the observer's qparams, so one graph runs as
the float model, as the int8 model, or with any subset of layers in int8, and intermediate
values match exactly by node, without matching two graphs by name.

A "layer" is one quantized op (conv/linear/add/...) with its weight observer and the observer
of the value it delivers (after a fused clamp, a pad or a reshape); its name is the module that
owns the op (``model.named_modules()`` name), usable in ``float_layers``. Used by the bias
correction (float and int8 in lockstep) and the per-layer diagnosis (analysis/diagnose.py). On
the shipped models the emulated int8 output matches the converted graph exactly.

Why not torchao's PT2E numeric debugger: it captures and matches activations of a float and a
converted graph, which says where the error is but cannot run "only this layer int8" or "only
its weights int8"; the attribution and the fallback ranking need exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .graph import op_name

# Ops whose output is the (re-quantized) value of their input: an observer after them belongs
# to the op that produced the value.
PASS_THROUGH = {
    "hardtanh", "hardtanh_", "relu", "relu_", "pad", "constant_pad_nd", "view", "view_copy", "reshape",
    "flatten", "permute", "permute_copy", "transpose", "squeeze", "squeeze_copy", "unsqueeze", "dropout",
    "dropout_", "clone", "contiguous", "max_pool2d", "adaptive_avg_pool2d", "mean", "slice", "slice_copy",
    "_to_copy", "alias", "identity", "detach",
}
WEIGHTED = {"conv1d", "conv2d", "convolution", "linear"}


@dataclass
class EmulatedLayer:
    key: str  # the graph node name of the op
    index: int  # position in network order
    name: str  # display name: module name, or module name + ":" + op for unweighted ops (unique)
    op: str
    float_layer: str | None  # the module name to put in float_layers, if this op has its own module
    switches: list = field(default_factory=list)  # all its observers (weights + activations)
    weight_switches: list = field(default_factory=list)
    probe: Any = None  # the switch whose input is the layer's delivered value
    probe_node: Any = None  # its graph node


class Switch(nn.Module):
    """Stands in for one calibrated PT2E observer: identity or int8 fake-quantize."""

    def __init__(self, observer: nn.Module) -> None:
        super().__init__()
        if getattr(observer, "is_dynamic", False) or not hasattr(observer, "calculate_qparams"):
            raise ValueError("the diagnosis needs a static int8 recipe (calibrated observers)")
        scale, zero_point = observer.calculate_qparams()
        self.scale, self.zero_point = scale.float(), zero_point.int()
        self.qmin, self.qmax = int(observer.quant_min), int(observer.quant_max)
        self.per_channel = observer.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.axis = int(getattr(observer, "ch_axis", 0))
        self.enabled = False
        self.seen: list[torch.Tensor] = []  # [input, output] of the last call (a list: not registered)
        # False: keep nothing (the bias correction reads values from its interpreters; kept, the
        # last sample's activations at every observer stayed alive to the end of its pass)
        self.keep_seen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            y = x
        elif self.per_channel:
            y = torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)
        else:
            y = torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), self.qmin, self.qmax)
        if self.keep_seen:
            self.seen[:] = [x, y]
        return y


def module_of(node: torch.fx.Node) -> tuple[str, str]:
    """(fully qualified module name, module type name) of the innermost module owning the node."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    path = path[len("L['self']."):] if path.startswith("L['self'].") else path
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return path, kind.rsplit(".", 1)[-1]


def passes_through(node: torch.fx.Node) -> bool:
    """An observer (call_module) or an op that only moves its input's value along."""
    return node.op == "call_module" or (node.op == "call_function" and op_name(node) in PASS_THROUGH)


def _anchor(node: torch.fx.Node) -> torch.fx.Node:
    """The op that produced the value an activation observer sees (skipping pass-through ops
    and other observers: a value re-quantized for another consumer belongs to its producer)."""
    while node.args and isinstance(node.args[0], torch.fx.Node) and passes_through(node):
        node = node.args[0]
    return node


def is_observer(module: nn.Module) -> bool:
    from torchao.quantization.pt2e import ObserverBase

    return isinstance(module, ObserverBase)


def instrument(prepared: torch.fx.GraphModule) -> list[EmulatedLayer]:
    """Swap every observer of a calibrated PT2E graph for a Switch; group them into layers in
    network order."""
    layers: dict[str, EmulatedLayer] = {}
    order: list[str] = []
    for node in list(prepared.graph.nodes):
        if node.op != "call_module":
            continue
        observer = prepared.get_submodule(node.target)
        if isinstance(observer, Switch):
            switch = observer
        elif is_observer(observer):
            switch = Switch(observer)
            setattr(prepared, node.target, switch)  # observers are top-level attributes
        else:
            continue
        source = node.args[0]
        is_weight = isinstance(source, torch.fx.Node) and source.op == "get_attr"
        if is_weight:
            users = [u for u in node.users if u.op == "call_function"]
            if not users:
                continue
            anchor = users[0]
        else:
            anchor = _anchor(source) if isinstance(source, torch.fx.Node) else source
        key = anchor.name
        if key not in layers:
            if anchor.op == "placeholder":
                layers[key] = EmulatedLayer(key=key, index=0, name=f"<input {anchor.name}>", op="input",
                                            float_layer=None)
            else:
                module, _ = module_of(anchor)
                op = op_name(anchor)
                own_module = op in WEIGHTED and module
                display = module if own_module else f"{module or '<root>'}:{op}"
                layers[key] = EmulatedLayer(key=key, index=0, name=display, op=op,
                                            float_layer=module if own_module else None)
            order.append(key)
        layer = layers[key]
        layer.switches.append(switch)
        if is_weight:
            layer.weight_switches.append(switch)
        if not is_weight and layer.probe is None:
            layer.probe, layer.probe_node = switch, node
    position = {node.name: index for index, node in enumerate(prepared.graph.nodes)}
    result = sorted((layers[k] for k in order), key=lambda l: position.get(l.key, -1))
    seen: dict[str, int] = {}
    for index, layer in enumerate(result):
        layer.index = index
        seen[layer.name] = seen.get(layer.name, 0) + 1
        if seen[layer.name] > 1:  # a module called twice: keep names unique
            layer.name = f"{layer.name}#{seen[layer.name]}"
    return result
