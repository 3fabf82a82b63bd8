"""Per-layer int8 diagnosis: which layers lose the accuracy, and how much of the output error
each one causes.

PT2E (what the int8 .pte computes, up to the integer rounding of the XNNPACK kernels): the
model is captured, annotated and calibrated with the artifact's own recipe (quant/recipe.py),
and its observers are swapped for int8-or-identity switches (quant/emulate.py, which also
says what a "layer" is), so one graph runs as the float model, as the int8 model, or with any
subset of layers in int8. Per layer:

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

An int8 ONNX artifact quantized in torch (the default) is made by this same recipe with the x86
quantizer, so its diagnosis is this one. run_diagnosis() adds, for a profile whose int8 ONNX
artifact uses onnxruntime's quantizer instead, the onnxruntime QDQ profile
(analysis/qdq_profile.py), and writes diagnosis.json and the chart (analysis/charts.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..compress import run_stages
from ..parity import sqnr_db
from ..quant.bias_correction import bias_correct, bias_nodes
from ..quant.calibrate import calibration_batches, prepare_calibrated
from ..quant.emulate import EmulatedLayer, instrument, passes_through
from ..quant.graph import attr
from ..quant.quantizers import quantizer_source
from ..quant.recipe import BIAS_CORRECTION_MAX_SAMPLES, Recipe, recipe_for, recipe_record
from ..spec import MAX_CALIBRATION, calibration_list
from ..stage import StageContext
from .charts import write_diagnosis_chart
from .qdq_profile import profile_onnx_recipe

InputTuple = tuple[torch.Tensor, ...]

DIAGNOSIS_SAMPLES = 8


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
    stats = {layer.key: LayerStats(index=layer.index, layer=layer.name, op=layer.op, float_layer=layer.float_layer)
             for layer in layers}
    float_biases = {path: attr(prepared, path).detach().clone() for path in (corrected_biases or {})}

    def set_all(enabled: bool) -> None:
        for s in switches:
            s.enabled = enabled
        for path, value in (corrected_biases if enabled else float_biases).items() if corrected_biases else ():
            attr(prepared, path).data.copy_(value)

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
        a, st = acc[layer.key], stats[layer.key]
        if layer.probe is not None:
            st.sqnr_db = round(sqnr_db(a["sig"], a["noise"]), 3)
            st.cosine = round(float(np.mean(a["cos"])), 6)
            st.max_abs_error = round(a["max"], 6)
            st.local_sqnr_db = round(sqnr_db(a["sig"], a["local_noise"]), 3)
        st.output_sqnr_db_alone = round(sqnr_db(out_sig, a["out_noise"]), 3)
        st.error_share = round(a["out_noise"] / total, 6) if total > 0 else 0.0
    for layer in sorted(layers, key=lambda l: -stats[l.key].error_share)[:split_top]:
        weights = layer.weight_switches
        activations = [s for s in layer.switches if s not in weights]
        if not weights:  # e.g. the model input, a residual add: its error is its activation's
            stats[layer.key].output_sqnr_db_activation_only = stats[layer.key].output_sqnr_db_alone
            continue
        if not activations:
            stats[layer.key].output_sqnr_db_weights_only = stats[layer.key].output_sqnr_db_alone
            continue
        for part, field_name in ((weights, "output_sqnr_db_weights_only"), (activations, "output_sqnr_db_activation_only")):
            noise = 0.0
            for sample, reference in zip(samples, references):
                set_all(False)
                for s in part:
                    s.enabled = True
                noise += float(((_flat_output(prepared(*sample)) - reference) ** 2).sum())
            setattr(stats[layer.key], field_name, round(sqnr_db(out_sig, noise), 3))
    set_all(False)
    rows = [asdict(stats[l.key]) for l in layers]
    ranked = sorted(layers, key=lambda l: -stats[l.key].error_share)
    groups, reasons = _float_groups(ranked, layers, stats)
    return {
        "samples": len(samples),
        "output": {"sqnr_db": round(sqnr_db(out_sig, out_noise), 3), "cosine_mean": round(float(np.mean(out_cos)), 6),
                   "cosine_min": round(float(np.min(out_cos)), 6)},
        "layers": rows,
        "ranked": [stats[l.key].layer for l in ranked],
        # What the fallback may keep in float, most harmful first, as groups: a layer whose
        # error is mostly its output activation comes with the layers that read that output
        # (an int8 consumer re-quantizes it whatever the producer's precision); ops without
        # a module of their own (a residual add, the model input) are represented by those
        # consumers alone.
        "float_groups": groups,
        "float_group_reasons": reasons,
        "float_candidates": list(dict.fromkeys(name for group in groups for name in group)),
    }


def _consumers(layer: EmulatedLayer, layers: list[EmulatedLayer]) -> list[str]:
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
        if passes_through(node):
            frontier.extend(node.users)
            continue
        target = by_anchor.get(node.name)
        if target is not None and target.float_layer:
            found.append(target.float_layer)
    return list(dict.fromkeys(found))


def _float_groups(ranked: list[EmulatedLayer], layers: list[EmulatedLayer],
                  stats: dict[str, LayerStats]) -> tuple[list[list[str]], list[str]]:
    """Fallback groups, most harmful first, and why each is one."""
    groups: list[list[str]] = []
    reasons: list[str] = []
    taken: set[str] = set()
    for layer in ranked:
        st = stats[layer.key]
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


def diagnose_pt2e(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
                  recipe: Any, samples: int = DIAGNOSIS_SAMPLES) -> dict[str, Any]:
    """Calibrate ``model`` with ``recipe`` (bias correction included) and diagnose it on the
    first ``samples`` calibration inputs."""
    prepared, used = prepare_calibrated(model, example_inputs, calibration, recipe)
    record = recipe_record(recipe, used)
    corrected = None
    if recipe.bias_correction and not recipe.dynamic:
        paths = [path for _, path in bias_nodes(prepared)]
        original = {path: attr(prepared, path).detach().clone() for path in paths}
        record["bias_correction"] = bias_correct(prepared, list(calibration_batches(
            calibration, example_inputs, min(used, BIAS_CORRECTION_MAX_SAMPLES))))
        corrected = {path: attr(prepared, path).detach().clone() for path in paths}
        for path, value in original.items():
            attr(prepared, path).data.copy_(value)
    probe_samples = list(calibration_batches(calibration, example_inputs, samples))
    report = diagnose_prepared(prepared, probe_samples, corrected_biases=corrected)
    report["recipe"] = record
    return report


def profile_recipe(profile) -> Recipe:
    """The PT2E recipe of the profile's int8 .pte artifact, else of its int8 .tflite artifact
    made by the pt2e quantizer (litert-torch's quantizer), else of its int8 .onnx artifact
    quantized in torch (the x86 quantizer, weight bits of the profile's CPU class), else the
    default recipe."""
    candidates = [c for c in profile.artifacts if c.format == "pte" and c.precision == "int8"]
    candidates += [c for c in profile.artifacts if c.format in ("tflite", "onnx") and c.precision == "int8"
                   and c.resolved_quantizer == "pt2e"]
    return recipe_for(candidates[0]) if candidates else Recipe()


def run_diagnosis(spec, profile, out_dir: Path, samples: int = DIAGNOSIS_SAMPLES,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Diagnose the profile's int8 recipe on the spec's model (after the profile's stages).

    Writes ``out_dir/diagnosis.json`` and ``out_dir/diagnosis.png``; returns the report
    (``layers`` rows in network order, ``ranked`` names, ``float_candidates``).
    """
    say = progress or (lambda message: None)
    example = spec.example_inputs
    calibration = calibration_list(spec.calibration, f"{spec.source}: calibration", example, MAX_CALIBRATION)
    model = spec.model
    if profile.stages:
        say(f"running {len(profile.stages)} stage(s)")
        ctx = StageContext(example_inputs=example, calibration=calibration, teacher=spec.model,
                           train_data=spec.train_data, loss=spec.loss, evaluate=None, student=spec.student)
        model, _ = run_stages(spec.model, list(profile.stages), ctx)
    recipe = profile_recipe(profile)
    say(f"calibrating ({recipe.activation_observer}) and diagnosing on {samples} sample(s)")
    report = diagnose_pt2e(model.eval(), example, calibration, recipe, samples)
    report["model"] = spec.name
    report["target"] = profile.name
    report["quantizer"] = quantizer_source()
    # The int8 gate this recipe must pass: how far the emulated output sits above or below it.
    tolerance = profile.tolerances.get("int8")
    report["thresholds"] = tolerance.model_dump(mode="json") if tolerance is not None else {}
    floor = report["thresholds"].get("min_sqnr_db")
    report["margin_db"] = None if floor is None else round(report["output"]["sqnr_db"] - floor, 3)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # onnxruntime's own quantizer makes a different int8 model: profile that one along the network.
    onnx_config = next((a for a in profile.artifacts if a.format == "onnx" and a.precision == "int8"
                        and a.resolved_quantizer == "onnxruntime"), None)
    if onnx_config is not None:
        say("profiling the onnxruntime QDQ int8 model along the network")
        report["onnx_qdq"] = profile_onnx_recipe(model.eval(), spec, onnx_config, calibration, samples, out_dir)
    (out_dir / "diagnosis.json").write_text(json.dumps(report, indent=2) + "\n")
    write_diagnosis_chart(report, out_dir / "diagnosis.png",
                f"{spec.name} on {profile.name}: int8 (PT2E, {recipe.activation_observer}) vs float, per layer")
    report["files"] = {"json": str(out_dir / "diagnosis.json"), "chart": str(out_dir / "diagnosis.png")}
    return report


