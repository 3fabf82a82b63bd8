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


class FloatMeanRecorder(torch.fx.Interpreter):
    """Runs a prepared graph as its forward does (the same ops on the same values: observers
    observe) and keeps, per conv/linear with a bias, each sample's per-channel output mean: the
    float figures bias_correct needs, taken during calibration instead of another float pass."""

    def __init__(self, prepared: torch.fx.GraphModule) -> None:
        super().__init__(prepared)
        self.targets = {node.name for node, _ in bias_nodes(prepared)}
        self.means: dict[str, list[torch.Tensor]] = {name: [] for name in self.targets}

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.targets:
            self.means[node.name].append(_channel_mean(value, _channel_axis(node, value)))
        return value


@torch.no_grad()
def bias_correct(prepared: torch.fx.GraphModule, samples: Sequence[InputTuple], *,
                 float_means: dict[str, list[torch.Tensor]] | None = None,
                 float_in_lockstep: bool = False) -> dict[str, Any]:
    """Empirical bias correction (Nagel et al. 2019, sec. 4.2) on a calibrated PT2E graph.

    For every conv/linear with a bias (batch norm folded into it), in network order, the
    mean per output channel of (int8 output - float output) over ``samples`` is subtracted
    from its bias, with every layer before it already corrected: quantization then no longer
    shifts the per-channel means that later layers and the global average pool accumulate.
    The int8 graph (every observer an int8 fake-quantize) runs node by node in lockstep over
    all samples (one pass). The float figures are each sample's per-channel means at those
    layers: ``float_means`` (FloatMeanRecorder.means, recorded while calibrating on the same
    samples), else a float pass first (the same graph, every observer the identity), one sample
    at a time. ``float_in_lockstep``, or a bias shared by two layers (a module called twice:
    the second must see the bias the first corrected), runs the float graph in the lockstep
    instead, holding twice the activations; all three give the same biases. Gives
    ``prepared`` new bias tensors (observers keep their calibrated ranges); the float model it
    was captured from, which shares the old ones, is left unchanged.
    """
    probe = copy.deepcopy(prepared)
    switches = [s for layer in instrument(probe) for s in layer.switches]
    for s in switches:
        s.keep_seen = False
    targets = dict(bias_nodes(probe))
    if not targets or not samples:
        return {"method": "empirical (Nagel et al. 2019)", "corrected_layers": 0, "samples": len(samples)}
    nodes = list(probe.graph.nodes)
    last_use: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    # A bias shared by two layers (a module called twice) is corrected at the first, so the float
    # run of the second must see the corrected one: then the float runs go in the lockstep too.
    paths = list(targets.values())
    per_node = None
    if len(set(paths)) == len(paths) and not float_in_lockstep:
        recorded = float_means or {}
        if all(len(recorded.get(node.name, ())) == len(samples) for node in targets):
            per_node = {node: list(recorded[node.name]) for node in targets}
        else:
            per_node = _float_means(probe, nodes, targets, samples, switches, last_use)
    runs = []  # (interpreter, quantized?) per sample and mode
    for sample in samples:
        for quantized in ((False, True) if per_node is None else (True,)):
            interpreter = torch.fx.Interpreter(probe)
            interpreter.args_iter = iter(sample)
            runs.append((interpreter, quantized))
    largest, mode = 0.0, None
    for node in nodes:
        if node.op == "output":
            break
        for interpreter, quantized in runs:
            if quantized is not mode:  # flipped only when it changes: a module attribute write is slow
                for s in switches:     # (EfficientNet-Lite0: 1.4 M writes, 5.4 s under cProfile, before)
                    s.enabled = quantized
                mode = quantized
            interpreter.env[node] = interpreter.run_node(node)
        if node in targets:
            axis = _channel_axis(node, interpreter.env[node])
            if per_node is None:
                float_mean = sum(_channel_mean(i.env[node], axis) for i, q in runs if not q) / len(samples)
            else:  # the same per-sample means, summed in the same order
                float_mean = sum(per_node.pop(node)) / len(samples)
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


def _float_means(probe: torch.fx.GraphModule, nodes: list[torch.fx.Node], targets: dict[torch.fx.Node, str],
                 samples: Sequence[InputTuple], switches: list, last_use: dict[torch.fx.Node, torch.fx.Node]
                 ) -> dict[torch.fx.Node, list[torch.Tensor]]:
    """Per target layer, the float graph's per-channel output mean of each sample (in sample
    order), one sample at a time: its activations are freed after their last use."""
    for s in switches:
        s.enabled = False
    means: dict[torch.fx.Node, list[torch.Tensor]] = {node: [] for node in targets}
    for sample in samples:
        interpreter = torch.fx.Interpreter(probe)
        interpreter.args_iter = iter(sample)
        for node in nodes:
            if node.op == "output":
                break
            value = interpreter.env[node] = interpreter.run_node(node)
            if node in targets:
                means[node].append(_channel_mean(value, _channel_axis(node, value)))
            for used in node.all_input_nodes:
                if last_use.get(used) is node:
                    interpreter.env.pop(used, None)
        del interpreter
    return means


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
