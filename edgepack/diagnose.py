"""Per-layer int8 diagnosis: which layers lose the accuracy, and how much of the output error
each one causes.

PT2E (what the int8 .pte computes, up to the integer rounding of the XNNPACK kernels): the
model is captured, annotated and calibrated with the artifact's own recipe
(compress/pt2e.py). Every observer of the calibrated graph is then replaced by a switch that
is either the identity (float) or the int8 fake-quantize with the observer's qparams, so one
graph runs as the float model, as the int8 model, or with any subset of layers in int8 -
and intermediate values match exactly by node, without matching two graphs by name. A
"layer" is one quantized op (conv/linear/add/...) with its weight observer and the observer
of the value it delivers (after a fused clamp, a pad or a reshape); its name is the module
that owns the op (``model.named_modules()`` name), usable in ``float_layers``. Per layer:

  sqnr_db, cosine, max_abs_error   the layer's output in the fully int8 model vs float
                                   (accumulated error along the network)
  local_sqnr_db                    the layer's output when only this layer is int8
  output_sqnr_db_alone             the model output when only this layer is int8
  error_share                      this layer's output noise power (only it int8) over the
                                   sum of all layers' (the ranking the fallback uses)
  output_sqnr_db_weights_only /    for the worst layers: only its weights / only its output
  output_sqnr_db_activation_only   activation int8 - which of the two to fix
With bias correction in the recipe, the whole-model figures use the corrected biases; the
per-layer attribution uses the float biases (a layer's correction also compensates the
layers before it, so it cannot be attributed to one layer).

``float_groups`` ranks what the fallback may keep in fp32: a layer whose output activation is
the problem comes with the layers that read it (an int8 consumer re-quantizes that output
whatever the producer's precision). On the shipped models the emulation matches the runtimes:
EfficientNet-Lite0's per-layer profile agrees with onnxruntime's QDQ model to 0.01 dB, and the
emulated int8 output with the converted graph exactly.

ONNX QDQ (``onnx_qdq_profile``): every activation QuantizeLinear input of the QDQ model is
compared, after its DequantizeLinear, with the same tensor in the preprocessed float model
(both run in onnxruntime with the tensors exposed as graph outputs): the accumulated SQNR
along the network, no attribution.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

InputTuple = tuple[torch.Tensor, ...]

DIAGNOSIS_SAMPLES = 8
SQNR_CAP_DB = 200.0
# Ops whose output is the (re-quantized) value of their input: an observer after them belongs
# to the op that produced the value.
_PASS_THROUGH = {
    "hardtanh", "hardtanh_", "relu", "relu_", "pad", "constant_pad_nd", "view", "view_copy", "reshape",
    "flatten", "permute", "permute_copy", "transpose", "squeeze", "squeeze_copy", "unsqueeze", "dropout",
    "dropout_", "clone", "contiguous", "max_pool2d", "adaptive_avg_pool2d", "mean", "slice", "slice_copy",
    "_to_copy", "alias", "identity", "detach",
}
_WEIGHTED = {"conv1d", "conv2d", "convolution", "linear"}


@dataclass
class LayerStats:
    index: int
    layer: str  # display name: module name, or module name + ":" + op for unweighted ops
    op: str
    float_layer: str | None  # the module name to put in float_layers, if this op has its own module
    sqnr_db: float | None = None
    cosine: float | None = None
    max_abs_error: float | None = None
    local_sqnr_db: float | None = None
    output_sqnr_db_alone: float | None = None
    error_share: float = 0.0
    # For the worst layers only (split_top): model output SQNR with only this layer's weights,
    # or only its output activation, in int8: says which of the two to fix.
    output_sqnr_db_weights_only: float | None = None
    output_sqnr_db_activation_only: float | None = None


@dataclass
class _Layer:
    key: str
    stats: LayerStats
    switches: list = field(default_factory=list)  # all its observers (weights + activations)
    weight_switches: list = field(default_factory=list)
    probe: Any = None  # the switch whose input is the layer's delivered value
    probe_node: Any = None  # its graph node


class _Switch(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            y = x
        elif self.per_channel:
            y = torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)
        else:
            y = torch.fake_quantize_per_tensor_affine(x, float(self.scale), int(self.zero_point), self.qmin, self.qmax)
        self.seen[:] = [x, y]
        return y


def _op(node: torch.fx.Node) -> str:
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def _module_of(node: torch.fx.Node) -> tuple[str, str]:
    """(fully qualified module name, module type name) of the innermost module owning the node."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    path = path[len("L['self']."):] if path.startswith("L['self'].") else path
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return path, kind.rsplit(".", 1)[-1]


def _anchor(node: torch.fx.Node) -> torch.fx.Node:
    """The op that produced the value an activation observer sees (skipping pass-through ops
    and other observers: a value re-quantized for another consumer belongs to its producer)."""
    while node.args and isinstance(node.args[0], torch.fx.Node) and (
            node.op == "call_module" or (node.op == "call_function" and _op(node) in _PASS_THROUGH)):
        node = node.args[0]
    return node


def _is_observer(module: nn.Module) -> bool:
    from torchao.quantization.pt2e import ObserverBase

    return isinstance(module, ObserverBase)


def instrument(prepared: torch.fx.GraphModule) -> list[_Layer]:
    """Swap every observer of a calibrated PT2E graph for a _Switch; group them into layers
    in network order."""
    layers: dict[str, _Layer] = {}
    order: list[str] = []
    for node in list(prepared.graph.nodes):
        if node.op != "call_module":
            continue
        observer = prepared.get_submodule(node.target)
        if isinstance(observer, _Switch):
            switch = observer
        elif _is_observer(observer):
            switch = _Switch(observer)
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
                stats = LayerStats(index=0, layer=f"<input {anchor.name}>", op="input", float_layer=None)
            else:
                module, kind = _module_of(anchor)
                op = _op(anchor)
                own_module = op in _WEIGHTED and module
                display = module if own_module else f"{module or '<root>'}:{op}"
                stats = LayerStats(index=0, layer=display, op=op, float_layer=module if own_module else None)
            layers[key] = _Layer(key=key, stats=stats)
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
        layer.stats.index = index
        name = layer.stats.layer
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # a module called twice: keep names unique
            layer.stats.layer = f"{name}#{seen[name]}"
    return result


def _sqnr(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return SQNR_CAP_DB
    if signal <= 0.0:
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise)))


def _flat_output(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return torch.cat([torch.as_tensor(o).float().flatten() for o in out])
    return out.float().flatten()


@torch.no_grad()
def diagnose_prepared(prepared: torch.fx.GraphModule, samples: Sequence[InputTuple], split_top: int = 8,
                      corrected_biases: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Per-layer statistics of a calibrated PT2E graph on ``samples`` (see the module docstring).

    ``split_top``: for that many of the worst layers, also measure weights and activation alone.
    ``corrected_biases`` (attribute path -> tensor, from bias correction): used when the whole
    model runs int8; float runs and the per-layer attribution use the graph's own (float)
    biases, since a layer's correction also compensates the error of the layers before it.
    """
    layers = instrument(prepared)
    switches = [s for layer in layers for s in layer.switches]
    if not layers:
        raise ValueError("the prepared graph has no observers: nothing is quantized")
    float_biases = {path: _attr(prepared, path).detach().clone() for path in (corrected_biases or {})}

    def set_all(enabled: bool) -> None:
        for s in switches:
            s.enabled = enabled
        for path, value in (corrected_biases if enabled else float_biases).items() if corrected_biases else ():
            _attr(prepared, path).data.copy_(value)

    acc = {layer.key: {"sig": 0.0, "noise": 0.0, "local_noise": 0.0, "out_noise": 0.0, "cos": [], "max": 0.0}
           for layer in layers}
    out_sig = out_noise = 0.0
    out_cos: list[float] = []
    references = []
    for sample in samples:
        set_all(False)
        reference = _flat_output(prepared(*sample))
        references.append(reference)
        float_values = {l.key: l.probe.seen[0].detach().clone() for l in layers if l.probe is not None}
        set_all(True)
        quantized = _flat_output(prepared(*sample))
        out_sig += float((reference ** 2).sum())
        out_noise += float(((quantized - reference) ** 2).sum())
        out_cos.append(float(torch.nn.functional.cosine_similarity(quantized, reference, dim=0)))
        for layer in layers:
            if layer.probe is None:
                continue
            ref, got = float_values[layer.key].float(), layer.probe.seen[1].float()
            a = acc[layer.key]
            a["sig"] += float((ref ** 2).sum())
            a["noise"] += float(((got - ref) ** 2).sum())
            a["max"] = max(a["max"], float((got - ref).abs().max()))
            a["cos"].append(float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)))
        for layer in layers:
            set_all(False)
            for s in layer.switches:
                s.enabled = True
            alone = _flat_output(prepared(*sample))
            a = acc[layer.key]
            a["out_noise"] += float(((alone - reference) ** 2).sum())
            if layer.probe is not None:
                a["local_noise"] += float(((layer.probe.seen[1].float() - float_values[layer.key].float()) ** 2).sum())
    set_all(False)
    total = sum(a["out_noise"] for a in acc.values())
    for layer in layers:
        a, st = acc[layer.key], layer.stats
        if layer.probe is not None:
            st.sqnr_db = round(_sqnr(a["sig"], a["noise"]), 3)
            st.cosine = round(float(np.mean(a["cos"])), 6)
            st.max_abs_error = round(a["max"], 6)
            st.local_sqnr_db = round(_sqnr(a["sig"], a["local_noise"]), 3)
        st.output_sqnr_db_alone = round(_sqnr(out_sig, a["out_noise"]), 3)
        st.error_share = round(a["out_noise"] / total, 6) if total > 0 else 0.0
    for layer in sorted(layers, key=lambda l: -l.stats.error_share)[:split_top]:
        weights = layer.weight_switches
        activations = [s for s in layer.switches if s not in weights]
        if not weights:  # e.g. the model input, a residual add: its error is its activation's
            layer.stats.output_sqnr_db_activation_only = layer.stats.output_sqnr_db_alone
            continue
        if not activations:
            layer.stats.output_sqnr_db_weights_only = layer.stats.output_sqnr_db_alone
            continue
        for part, attr in ((weights, "output_sqnr_db_weights_only"), (activations, "output_sqnr_db_activation_only")):
            noise = 0.0
            for sample, reference in zip(samples, references):
                set_all(False)
                for s in part:
                    s.enabled = True
                noise += float(((_flat_output(prepared(*sample)) - reference) ** 2).sum())
            setattr(layer.stats, attr, round(_sqnr(out_sig, noise), 3))
    set_all(False)
    rows = [asdict(l.stats) for l in layers]
    ranked = sorted(layers, key=lambda l: -l.stats.error_share)
    groups, reasons = _float_groups(ranked, layers)
    return {
        "samples": len(samples),
        "output": {"sqnr_db": round(_sqnr(out_sig, out_noise), 3), "cosine_mean": round(float(np.mean(out_cos)), 6),
                   "cosine_min": round(float(np.min(out_cos)), 6)},
        "layers": rows,
        "ranked": [l.stats.layer for l in ranked],
        # What the fallback may keep in float, most harmful first, as groups: a layer whose
        # error is mostly its output activation comes with the layers that read that output
        # (an int8 consumer re-quantizes it whatever the producer's precision); ops without
        # a module of their own (a residual add, the model input) are represented by those
        # consumers alone.
        "float_groups": groups,
        "float_group_reasons": reasons,
        "float_candidates": list(dict.fromkeys(name for group in groups for name in group)),
    }


def _consumers(layer: _Layer, layers: list[_Layer]) -> list[str]:
    """float_layer names of the weighted ops that read the value ``layer`` delivers."""
    if layer.probe_node is None:
        return []
    by_anchor = {l.key: l for l in layers}
    found: list[str] = []
    frontier = list(layer.probe_node.users)
    seen = set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" or (node.op == "call_function" and _op(node) in _PASS_THROUGH):
            frontier.extend(node.users)
            continue
        target = by_anchor.get(node.name)
        if target is not None and target.stats.float_layer:
            found.append(target.stats.float_layer)
    return list(dict.fromkeys(found))


def _float_groups(ranked: list[_Layer], layers: list[_Layer]) -> tuple[list[list[str]], list[str]]:
    """Fallback groups, most harmful first, and why each is one."""
    groups: list[list[str]] = []
    reasons: list[str] = []
    taken: set[str] = set()
    for layer in ranked:
        st = layer.stats
        if st.error_share <= 0:
            continue
        activation_bound = (st.output_sqnr_db_activation_only is not None and st.output_sqnr_db_weights_only is not None
                            and st.output_sqnr_db_activation_only < st.output_sqnr_db_weights_only)
        own = [st.float_layer] if st.float_layer else []
        if activation_bound or not st.float_layer:
            own += _consumers(layer, layers)
        group = [name for name in dict.fromkeys(own) if name not in taken]
        if group:
            groups.append(group)
            taken.update(group)
            reason = (f"{st.layer}: {100 * st.error_share:.1f}% of the int8 output error (output SQNR "
                      f"{st.output_sqnr_db_alone:.1f} dB with only it int8)")
            if activation_bound:
                reason += (f"; its output activation is the problem ({st.output_sqnr_db_activation_only:.1f} dB "
                           f"vs weights {st.output_sqnr_db_weights_only:.1f} dB), so the layers reading it go too")
            elif not st.float_layer:
                reason += "; no module of its own, so the layers reading its output go"
            reasons.append(reason)
    return groups, reasons


def _attr(module: nn.Module, path: str) -> torch.Tensor:
    for part in path.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def diagnose_pt2e(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
                  recipe: Any, samples: int = DIAGNOSIS_SAMPLES) -> dict[str, Any]:
    """Calibrate ``model`` with ``recipe`` (compress.pt2e.Recipe, bias correction included)
    and diagnose it on the first ``samples`` calibration inputs."""
    from .compress.pt2e import (BIAS_CORRECTION_MAX_SAMPLES, _bias_nodes, bias_correct, calibration_batches,
                                prepare_calibrated, recipe_record)

    prepared, used = prepare_calibrated(model, example_inputs, calibration, recipe)
    record = recipe_record(recipe, used)
    corrected = None
    if recipe.bias_correction and not recipe.dynamic:
        paths = [path for _, path in _bias_nodes(prepared)]
        original = {path: _attr(prepared, path).detach().clone() for path in paths}
        record["bias_correction"] = bias_correct(prepared, list(calibration_batches(
            calibration, example_inputs, min(used, BIAS_CORRECTION_MAX_SAMPLES))))
        corrected = {path: _attr(prepared, path).detach().clone() for path in paths}
        for path, value in original.items():
            _attr(prepared, path).data.copy_(value)
    probe_samples = list(calibration_batches(calibration, example_inputs, samples))
    report = diagnose_prepared(prepared, probe_samples, corrected_biases=corrected)
    report["recipe"] = record
    return report


# --------------------------------------------------------------------------- ONNX QDQ


def onnx_qdq_profile(float_onnx: Path, qdq_onnx: Path, samples: Sequence[dict[str, np.ndarray]]) -> list[dict]:
    """Accumulated error along a QDQ ONNX model: for each activation QuantizeLinear, its
    dequantized value in the QDQ model vs the same tensor in the float model."""
    import onnx
    import onnxruntime as ort

    qdq = onnx.load(str(qdq_onnx))
    ref = onnx.load(str(float_onnx))
    initializers = {i.name for i in qdq.graph.initializer}
    producers = {o: n for n in qdq.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in qdq.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ref_tensors = {o for n in ref.graph.node for o in n.output} | {i.name for i in ref.graph.input}
    pairs = []  # (float tensor, dequantized tensor, op that produced the float tensor)
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers or node.input[0] not in ref_tensors:
            continue
        dq = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        if dq:
            producer = producers.get(node.input[0])
            pairs.append((node.input[0], dq[0].output[0], producer.op_type if producer is not None else "input"))

    def with_outputs(model, names):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        have = {o.name for o in model.graph.output}
        for name in names:
            if name not in have:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    f_sess = with_outputs(ref, [p[0] for p in pairs])
    q_sess = with_outputs(qdq, [p[1] for p in pairs])
    stats = {p[0]: {"sig": 0.0, "noise": 0.0, "cos": [], "max": 0.0} for p in pairs}
    for feed in samples:
        f_out = dict(zip([o.name for o in f_sess.get_outputs()], f_sess.run(None, feed)))
        q_out = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feed)))
        for f_name, q_name, _ in pairs:
            r = np.asarray(f_out[f_name], dtype=np.float64).ravel()
            g = np.asarray(q_out[q_name], dtype=np.float64).ravel()
            s = stats[f_name]
            s["sig"] += float(r @ r)
            s["noise"] += float((g - r) @ (g - r))
            s["max"] = max(s["max"], float(np.max(np.abs(g - r))) if r.size else 0.0)
            nr, ng = float(np.linalg.norm(r)), float(np.linalg.norm(g))
            s["cos"].append(float(r @ g / (nr * ng)) if nr and ng else float(nr == ng))
    return [{"index": i, "tensor": f, "op": op, "sqnr_db": round(_sqnr(stats[f]["sig"], stats[f]["noise"]), 3),
             "cosine": round(float(np.mean(stats[f]["cos"])), 6), "max_abs_error": round(stats[f]["max"], 6)}
            for i, (f, _, op) in enumerate(pairs)]


# --------------------------------------------------------------------------- report files


def write_chart(report: dict[str, Any], path: Path, title: str) -> Path:
    """Per-layer SQNR along the network (int8 model vs float, and each layer alone) and each
    layer's share of the output error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    x = [r["index"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.18 * len(rows)), 5.0), dpi=110)
    ax.plot(x, [r["sqnr_db"] if r["sqnr_db"] is not None else np.nan for r in rows], marker=".",
            label="layer output, whole model int8 (accumulated)")
    ax.plot(x, [r["local_sqnr_db"] if r["local_sqnr_db"] is not None else np.nan for r in rows], marker=".",
            alpha=0.7, label="layer output, only this layer int8")
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("SQNR vs float (dB)")
    ax.grid(alpha=0.3)
    if report.get("onnx_qdq"):
        onnx_rows = report["onnx_qdq"]
        span = max(x) if x else 1
        ax.plot([span * r["index"] / max(1, len(onnx_rows) - 1) for r in onnx_rows], [r["sqnr_db"] for r in onnx_rows],
                linestyle="--", alpha=0.7, label="onnxruntime QDQ, accumulated (position rescaled)")
    share = ax.twinx()
    share.bar(x, [100 * r["error_share"] for r in rows], alpha=0.25, color="tab:red", label="share of output error")
    share.set_ylabel("share of output error (%)")
    worst = sorted(rows, key=lambda r: -r["error_share"])[:3]
    for r in worst:
        share.annotate(r["layer"], (r["index"], 100 * r["error_share"]), fontsize=7, rotation=30)
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = share.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
              fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def recipe_for(profile) -> Any:
    """The PT2E recipe of the profile's int8 .pte artifact, else of its int8 .tflite artifact
    made by the pt2e quantizer (litert-torch's quantizer), else the default recipe."""
    from .compress.pt2e import Recipe

    candidates = [(c, "xnnpack") for c in profile.artifacts if c.format == "pte" and c.precision == "int8"]
    candidates += [(c, "litert") for c in profile.artifacts if c.format == "tflite" and c.precision == "int8"
                   and c.resolved_quantizer == "pt2e"]
    if not candidates:
        return Recipe()
    config, quantizer = candidates[0]
    return Recipe(per_channel=config.granularity == "per-channel",
                  activation_observer=config.activation_observer, fuse_clamp=config.fuse_clamp,
                  float_layers=tuple(config.float_layers), calibration_samples=config.calibration_samples,
                  bias_correction=config.bias_correction, quantizer=quantizer)


def run_diagnosis(spec, profile, out_dir: Path, samples: int = DIAGNOSIS_SAMPLES,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Diagnose the profile's int8 recipe on the spec's model (after the profile's stages).

    Writes ``out_dir/diagnosis.json`` and ``out_dir/diagnosis.png``; returns the report
    (``layers`` rows in network order, ``ranked`` names, ``float_candidates``).
    """
    from .pipeline import MAX_CALIBRATION
    from .spec import calibration_list
    from .stage import StageContext, run_stages

    say = progress or (lambda message: None)
    example = spec.example_inputs
    calibration = calibration_list(spec.calibration, f"{spec.source}: calibration", example, MAX_CALIBRATION)
    model = spec.model
    if profile.stages:
        say(f"running {len(profile.stages)} stage(s)")
        ctx = StageContext(example_inputs=example, calibration=calibration, teacher=spec.model,
                           train_data=spec.train_data, loss=spec.loss, evaluate=None, student=spec.student)
        model, _ = run_stages(spec.model, list(profile.stages), ctx)
    recipe = recipe_for(profile)
    say(f"calibrating ({recipe.activation_observer}) and diagnosing on {samples} sample(s)")
    report = diagnose_pt2e(model.eval(), example, calibration, recipe, samples)
    report["model"] = spec.name
    report["target"] = profile.name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_config = next((a for a in profile.artifacts if a.format == "onnx" and a.precision == "int8"), None)
    if onnx_config is not None:
        say("profiling the onnxruntime QDQ int8 model along the network")
        report["onnx_qdq"] = _onnx_profile(model.eval(), spec, onnx_config, calibration, samples, out_dir)
    (out_dir / "diagnosis.json").write_text(json.dumps(report, indent=2) + "\n")
    write_chart(report, out_dir / "diagnosis.png",
                f"{spec.name} on {profile.name}: int8 (PT2E, {recipe.activation_observer}) vs float, per layer")
    report["files"] = {"json": str(out_dir / "diagnosis.json"), "chart": str(out_dir / "diagnosis.png")}
    return report


def _onnx_profile(model: nn.Module, spec, config, calibration: list, samples: int, out_dir: Path) -> list[dict]:
    """onnx_qdq_profile of the profile's onnx int8 recipe (onnx_quant.to_int8_static)."""
    from .export.onnx import export_float_onnx
    from .export.onnx_quant import save_onnx, to_int8_static

    work = out_dir / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    names = spec.resolved_input_names()
    with torch.no_grad():
        first = model(*spec.example_inputs)
    n_outputs = len(first) if isinstance(first, (tuple, list)) else 1
    source = export_float_onnx(model, spec.example_inputs, work / "float.onnx", names,
                               spec.resolved_output_names(n_outputs))[0]
    quantized, _ = to_int8_static(config, source, work, calibration)
    qdq = save_onnx(quantized, work / "int8.onnx", 1024.0)[0]
    feeds = [{name: t.detach().numpy() for name, t in zip(names, sample)} for sample in calibration[:samples]]
    return onnx_qdq_profile(work / "preprocessed.onnx", qdq, feeds)


def cmd_diagnose(args) -> int:
    """edgepack diagnose SPEC --target T [--out DIR] [--samples N] [--top K] [--json]"""
    from rich.console import Console
    from rich.table import Table

    from .errors import EdgepackError, ExportError
    from .spec import load_spec
    from .target import load_target

    err = Console(stderr=True, highlight=False)
    profile = load_target(args.target)
    spec = load_spec(args.spec)
    out_dir = Path(getattr(args, "out", None) or Path("dist") / spec.name / f"{profile.name}.diagnosis")
    quiet = getattr(args, "quiet", False)
    try:
        report = run_diagnosis(spec, profile, out_dir, samples=getattr(args, "samples", None) or DIAGNOSIS_SAMPLES,
                               progress=None if quiet else (lambda m: err.print(f"[dim]{m}[/]")))
    except EdgepackError:
        raise
    except Exception as exc:  # torch.export / PT2E on user models: name the step, keep the cause for --debug
        raise ExportError(f"diagnose {spec.name} on {profile.name}: quantizing the model with the profile's int8 "
                          f"recipe (torch.export + PT2E) failed: {type(exc).__name__}: {str(exc)[:300]}",
                          "run `edgepack build` to see which format fails, or --debug for the traceback") from exc
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    top = getattr(args, "top", None) or 10
    out = report["output"]
    table = Table(title=f"{spec.name} on {profile.name}: worst int8 layers (output SQNR {out['sqnr_db']:.1f} dB, "
                        f"cosine {out['cosine_mean']:.4f})")
    for column in ("#", "layer", "op", "error share", "out SQNR alone", "cause", "SQNR (accum.)", "local SQNR",
                   "cosine", "max|err|"):
        table.add_column(column, justify="left" if column in ("layer", "op", "cause") else "right")

    def fmt(value: float | None, spec_: str) -> str:
        return "-" if value is None else format(value, spec_)

    def cause(row: dict) -> str:
        weights, activation = row["output_sqnr_db_weights_only"], row["output_sqnr_db_activation_only"]
        if weights is None and activation is None:
            return "-"
        if activation is None or (weights is not None and weights < activation):
            return f"weights ({weights:.0f} dB)"
        return f"activation ({activation:.0f} dB)"

    for row in sorted(report["layers"], key=lambda r: -r["error_share"])[:top]:
        table.add_row(str(row["index"]), row["layer"], row["op"], f"{100 * row['error_share']:.1f}%",
                      fmt(row["output_sqnr_db_alone"], ".1f"), cause(row), fmt(row["sqnr_db"], ".1f"),
                      fmt(row["local_sqnr_db"], ".1f"), fmt(row["cosine"], ".4f"), fmt(row["max_abs_error"], ".3g"))
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)
    if report["float_groups"]:
        err.print(f"to keep the worst in fp32: float_layers: {report['float_groups'][0]}  "
                  f"({report['float_group_reasons'][0]})")
    err.print(f"report: {report['files']['json']}  chart: {report['files']['chart']}")
    return 0
