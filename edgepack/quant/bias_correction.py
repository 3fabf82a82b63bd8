"""Empirical bias correction (Nagel et al. 2019, sec. 4.2) of a calibrated PT2E graph; why it
is part of the recipe: quant/recipe.py."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from .emulate import instrument
from .graph import attr, is_op, replace_attr

InputTuple = tuple[torch.Tensor, ...]

def bias_nodes(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str]]:
    """(conv/linear node, its bias attribute path) for every weighted op with a bias tensor."""
    found = []
    for node in graph_module.graph.nodes:
        if not is_op(node, ("conv1d.default", "conv2d.default", "linear.default", "convolution.default")):
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
            found.append((node, bias.target))
    return found


@torch.no_grad()
def bias_correct(prepared: torch.fx.GraphModule, samples: Sequence[InputTuple]) -> dict[str, Any]:
    """Empirical bias correction (Nagel et al. 2019, sec. 4.2) on a calibrated PT2E graph.

    For every conv/linear with a bias (batch norm folded into it), in network order, the
    mean per output channel of (int8 output - float output) over ``samples`` is subtracted
    from its bias, with every layer before it already corrected: quantization then no longer
    shifts the per-channel means that later layers and the global average pool accumulate.
    The int8 and float graphs run node by node in lockstep over all samples (one pass), the
    float one being the same graph with every observer replaced by the identity. Gives
    ``prepared`` new bias tensors (observers keep their calibrated ranges); the float model it
    was captured from, which shares the old ones, is left unchanged.
    """
    probe = copy.deepcopy(prepared)
    switches = [s for layer in instrument(probe) for s in layer.switches]
    targets = dict(bias_nodes(probe))
    if not targets or not samples:
        return {"method": "empirical (Nagel et al. 2019)", "corrected_layers": 0, "samples": len(samples)}
    nodes = list(probe.graph.nodes)
    last_use: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    runs = []  # (interpreter, quantized?) per sample and mode
    for sample in samples:
        for quantized in (False, True):
            interpreter = torch.fx.Interpreter(probe)
            interpreter.args_iter = iter(sample)
            runs.append((interpreter, quantized))
    largest = 0.0
    for node in nodes:
        if node.op == "output":
            break
        for interpreter, quantized in runs:
            for s in switches:
                s.enabled = quantized
            interpreter.env[node] = interpreter.run_node(node)
        if node in targets:
            axis = _channel_axis(node, interpreter.env[node])
            float_mean = sum(_channel_mean(i.env[node], axis) for i, q in runs if not q) / len(samples)
            int8_mean = sum(_channel_mean(i.env[node], axis) for i, q in runs if q) / len(samples)
            delta = int8_mean - float_mean
            bias = attr(probe, targets[node])
            bias.data -= delta.to(bias.dtype)
            shape = [1] * interpreter.env[node].dim()
            shape[axis] = -1
            for interpreter, quantized in runs:
                if quantized:  # the same as re-running the op with the corrected bias
                    interpreter.env[node] = interpreter.env[node] - delta.view(shape)
            largest = max(largest, float(delta.abs().max()))
        for used in node.all_input_nodes:
            if last_use.get(used) is node:
                for interpreter, _ in runs:
                    interpreter.env.pop(used, None)
    for s in switches:
        s.enabled = False
    for node, path in bias_nodes(prepared):
        replace_attr(prepared, path, attr(probe, path).detach().clone())
    return {"method": "empirical (Nagel et al. 2019)", "corrected_layers": len(targets), "samples": len(samples),
            "largest_mean_shift_removed": round(largest, 6)}


def _channel_axis(node: torch.fx.Node, value: torch.Tensor) -> int:
    """The output-channel axis of a conv/linear result: dim 1 for a convolution ([N, C, ...]),
    the last dim for a linear, which maps the last dim of an input of any rank ([..., in] ->
    [..., out]; a transformer's [B, S, hidden]). The bias is indexed along this axis."""
    if value.dim() <= 1:
        return 0
    return value.dim() - 1 if is_op(node, ("linear.default",)) else 1


def _channel_mean(value: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean over every dim but the channel ``axis``."""
    value = value.float()
    if value.dim() <= 1:
        return value
    return value.mean(dim=[d for d in range(value.dim()) if d != axis])
