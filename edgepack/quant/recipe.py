"""The PT2E int8 recipe (XNNPACK for .pte, litert-torch for .tflite): one options block, one
mapping from an artifact config to a Recipe, and the record the manifest keeps.

Used by the ExecuTorch and LiteRT exporters (post-training quantization), the per-layer
diagnosis, the fallback ranking and the QAT stage, so all of them use exactly the same recipe.

Recipe (executorch 1.5.1, torchao 0.18, litert-torch 0.10):
  torch.export.export(model, example).module()
  -> prepare_pt2e(gm, <XNNPACKQuantizer | litert PT2EQuantizer, with the changes below>)
  -> run calibration batches (static) or the example once (dynamic: observers are placeholders)
  -> bias_correct(prepared, calibration)   # static, if bias_correction
  -> convert_pt2e(gm)   # q/dq pairs around each op, weights frozen as int8
The result is a float-in/float-out GraphModule; re-export it and lower it.

Changes to the stock recipe, measured on EfficientNet-Lite0 (real weights; 32 calibration and
16 held-out photo views; figures vs the float model on the held-out views: top-1 agreement,
logit cosine mean/min; "torch" = the converted graph in torch, then each artifact in its own
runtime):

  recipe                                         torch            .pte (ExecuTorch)     .tflite (LiteRT)
  stock (ReLU6 shares scale, histogram)          7/16 .837/.679   7/16 .839/.694        6/16 .816/.682
  stock, min/max                                 9/16 .854/.755
  + clamp fusion, histogram                      12/16 .973/.895
  + clamp fusion, min/max                        12/16 .972/.897  13/16 .973/.905       14/16 .974/.911
    (moving-average .975/.915, percentile .971/.916, MSE .976/.912, 8 / 16 calibration
     samples .973 / .975: without bias correction the observer is not what limits it)
  + clamp fusion, bias correction, min/max       16/16 .996/.988  16/16 .9965/.9926     16/16 .9966/.9914
                                   histogram     16/16 .996/.992  15/16 .9964/.9939     16/16 .9961/.9926
                                   moving-avg.   15/16 .997/.994
                                   percentile    15/16 .986/.977
                                   MSE           16/16 .997/.995  16/16 .9971/.9957     16/16 .9972/.9961
    MSE is the default (best output SQNR on both paths: 20.3 / 20.7 dB vs min/max 19.5 /
    19.7 dB; its grid search adds ~15 s of calibration on EfficientNet-Lite0). min/max with
    8 / 16 calibration samples: 15/16 .995/.983, 15/16 .996/.992. Bytes: .pte 0.267x,
    .tflite 0.285x the float artifact's (the recipe does not change them).

1. Clamp fusion (``fuse_clamp``, quantizers.py). The stock quantizers fuse conv/linear + ReLU,
   but not + ReLU6 (aten.hardtanh): hardtanh is a "share the observer" op, so a ReLU6 output is
   quantized with the scale of the *pre-activation* conv output (BN folded, often [-40, 30]),
   leaving ~20 of 256 levels for the [0, 6] values the next layer reads. We annotate
   conv/linear -> hardtanh like conv -> relu: the observer sits after the clamp. XNNPACK and
   TFLite fuse the clamp into the conv, so the lowered graph keeps its shape.
2. Bias correction (``bias_correction``, bias_correction.py; Nagel et al. 2019 sec. 4.2,
   empirical): after calibration every conv/linear bias absorbs the mean per-channel shift its
   int8 weights and inputs cause, layer by layer. The diagnosis showed the remaining error
   after (1) is dominated by weights (depthwise 3x3 filters with large, cancelling taps) whose
   error has a per-channel mean the global average pool accumulates; removing it is what
   brings EfficientNet-Lite0 to 16/16.
3. The activation observer is selectable (observers.py): MSE by default (the range, [min, max]
   scaled by a searched ratio, that minimises the int8 round-trip error on the calibration
   values); histogram is the stock choice.

4. One annotation for both formats where it can be (``annotate_as``, calibrate.py
   resolve_annotation): a .tflite recipe is annotated by XNNPACK's rules when they place the
   same observers as litert-torch's quantizer on the model (the CNNs), so the .pte's calibration
   serves it and residual adds stay int8 (litert-torch's rules leave an add that reads another
   add's output float).

Float layers: module names in ``float_layers`` are left unannotated, so their ops run in fp32
(inside the XNNPACK delegate / as float TFLite ops) between dequantize and quantize. Note
that an int8 consumer still quantizes a float layer's output.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ExportError

INSTALL_HINT = "pip install 'edgepack[executorch]' (executorch 1.5.1, torchao 0.18)"

ObserverName = Literal["minmax", "moving-average", "histogram", "percentile", "mse"]
ACTIVATION_OBSERVERS: tuple[str, ...] = typing.get_args(ObserverName)
# Chosen by measurement on EfficientNet-Lite0 (the table in the module docstring).
DEFAULT_ACTIVATION_OBSERVER: str = "mse"
DEFAULT_RECIPE_REASON = (
    "measured default (quant/recipe.py): ReLU6 fused before its output is observed, MSE-chosen "
    "activation ranges, empirical bias correction; on EfficientNet-Lite0 (16 held-out views) this "
    "takes the .pte from 7/16 top-1 agreement, logit cosine 0.84 (stock XNNPACK recipe) to 16/16, "
    "0.997, and the .tflite from 6/16, 0.82 to 16/16, 0.997")
# The same recipe for the x86 QDQ ONNX (export/onnx_qdq.py has the measurements).
DEFAULT_ONNX_RECIPE_REASON = (
    "measured default (export/onnx_qdq.py): the .pte/.tflite recipe with onnxruntime's x86 types (uint8 "
    "activations, int8 per-channel weights); on EfficientNet-Lite0 (16 held-out views, AVX-512 VNNI host) this "
    "takes logit cosine min from 0.774 (onnxruntime quantize_static, reduce_range) to 0.995, SQNR 8.1 -> 20.6 dB, "
    "at the same speed")
DEFAULT_BIAS_CORRECTION = True
# Samples the bias correction runs in lockstep (the int8 graph, all at once; the float figures
# are recorded while calibrating): memory grows with it (EfficientNet-Lite0: ~15 MB per sample
# and graph at the widest layer).
BIAS_CORRECTION_MAX_SAMPLES = 32
# Whose PT2E quantizer annotates each format's graph ("x86": XNNPACK's annotation rules with
# onnxruntime's x86 int8 types, for the QDQ ONNX; quantizers.py x86_quantizer).
QUANTIZER_FOR_FORMAT = {"pte": "xnnpack", "tflite": "litert", "onnx": "x86"}
# Why a .tflite may be annotated by XNNPACKQuantizer's rules (quant/calibrate.py resolve_annotation).
XNNPACK_ANNOTATION_NOTE = (
    "XNNPACKQuantizer's rules: they place the same observers as litert-torch's PT2EQuantizer on this model, and a "
    "residual add that reads another add's output reads it in int8, where litert-torch's leaves it float (a float "
    "ADD between DEQUANTIZE and QUANTIZE in the .tflite); in a build with a .pte, one calibration serves both")
# The options that change the numerics of the static recipe (granularity applies more widely).
RECIPE_OPTIONS = ("activation_observer", "fuse_clamp", "float_layers", "bias_correction")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the int8 numerics of a PT2E quantization."""

    per_channel: bool = True
    dynamic: bool = False
    activation_observer: str = DEFAULT_ACTIVATION_OBSERVER
    fuse_clamp: bool = True
    float_layers: tuple[str, ...] = ()
    calibration_samples: int = 64
    bias_correction: bool = DEFAULT_BIAS_CORRECTION
    # Whose quantizer annotates the graph: XNNPACKQuantizer (ExecuTorch), litert-torch's
    # PT2EQuantizer (LiteRT), or the x86 one (XNNPACK's rules, uint8 activations, for onnxruntime);
    # the recipe changes above apply to all three.
    quantizer: Literal["xnnpack", "litert", "x86"] = "xnnpack"
    # 8, or 7 ([-63, 63], onnxruntime's reduce_range): x86 CPUs without VNNI add pairs of u8 x s8
    # products in int16 with saturation (VPMADDUBSW); 7-bit weights keep the pair sums in range.
    weight_bits: Literal[7, 8] = 8
    # litert only: annotate with XNNPACKQuantizer's rules (quant/calibrate.py resolve_annotation
    # sets it where they place exactly the observers litert-torch's quantizer places; the .tflite
    # is still converted with litert-torch's). Then the .pte's calibration serves the .tflite too.
    annotate_as: Literal["xnnpack"] | None = None

    def __post_init__(self) -> None:
        if self.activation_observer not in ACTIVATION_OBSERVERS:
            raise ValueError(f"activation_observer {self.activation_observer!r}: "
                             f"expected one of {', '.join(ACTIVATION_OBSERVERS)}")
        if self.weight_bits not in (7, 8):
            raise ValueError(f"weight_bits {self.weight_bits}: expected 7 or 8")


class RecipeOptions(BaseModel):
    """The PT2E recipe changes an artifact config may set (.pte, .tflite and the torch-quantized
    .onnx share them). Defaults are the measured recipe (module docstring); each format's config
    says when they apply (``check_recipe_options``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    activation_observer: ObserverName = Field(
        default="mse", description="int8: how activation ranges are chosen from the calibration data (mse "
                                   "measured best, quant/recipe.py; histogram = the stock quantizers' choice)")
    fuse_clamp: bool = Field(default=True, description="int8: observe conv/linear + ReLU6 after the clamp "
                                                       "(false = the stock quantizer: ReLU6 shares the conv's scale)")
    float_layers: tuple[str, ...] = Field(
        default=(), description="int8: module names (model.named_modules()) kept fp32 between dequantize and "
                                "quantize (inside the XNNPACK delegate / as float TFLite ops)")
    bias_correction: bool = Field(default=True, description="int8: empirical bias correction of conv/linear "
                                                            "biases against the float model (Nagel et al. 2019)")

    def changed_options(self, names: Sequence[str] = RECIPE_OPTIONS) -> list[str]:
        """Which of ``names`` the profile set away from the measured defaults."""
        fields = type(self).model_fields
        return [name for name in names if getattr(self, name) != fields[name].default]

    def check_recipe_options(self, applies: bool, when: str) -> None:
        """Raise ValueError if a recipe option is set where it does not apply (``when`` says
        where it does), or float_layers names a module twice."""
        fmt = getattr(self, "format", "int8")
        for name in self.changed_options():
            if not applies:
                raise ValueError(f"{fmt} {name} only applies to {when}")
        if len(set(self.float_layers)) != len(self.float_layers):
            raise ValueError(f"{fmt} float_layers lists a module twice")


class Int8Options(RecipeOptions):
    """The int8 recipe options of a .pte or .tflite artifact config: the recipe changes, plus
    weight granularity and the calibration sample cap (the .onnx config has its own names)."""

    granularity: Literal["per-channel", "per-tensor"] = Field(
        default="per-channel", description="int8 weight scales: one per output channel, or one per tensor")
    calibration_samples: int = Field(default=64, ge=1, description="int8: calibration inputs used (the first N)")


def recipe_for(config: Any) -> Recipe:
    """The Recipe of a .pte, .tflite or (torch-quantized) .onnx artifact config: the only
    config -> recipe mapping. The .onnx config's weight bits follow its reduce_range, which the
    target profile sets from the device's CPU class (target.py)."""
    if config.format == "onnx":
        per_channel, weight_bits = config.per_channel, 7 if config.reduce_range else 8
    else:
        per_channel, weight_bits = config.granularity == "per-channel", 8
    return Recipe(per_channel=per_channel, dynamic=config.precision == "int8-dynamic",
                  activation_observer=config.activation_observer, fuse_clamp=config.fuse_clamp,
                  float_layers=tuple(config.float_layers), calibration_samples=config.calibration_samples,
                  bias_correction=config.bias_correction, quantizer=QUANTIZER_FOR_FORMAT[config.format],
                  weight_bits=weight_bits)


def recipe_reason(config: Any) -> str:
    """Why this int8 recipe, for the manifest: the measured default, or the profile's choice."""
    if config.precision == "int8-dynamic":
        return "int8-dynamic: activations quantized at run time, no calibration"
    changed = config.changed_options(tuple(name for name in ("activation_observer", "fuse_clamp", "bias_correction",
                                                             "granularity") if name in type(config).model_fields))
    default = DEFAULT_ONNX_RECIPE_REASON if config.format == "onnx" else DEFAULT_RECIPE_REASON
    reason = default if not changed else f"set in the profile: {', '.join(changed)}"
    if config.format == "onnx":
        reason += ("; 7-bit weights (reduce_range, for CPUs without VNNI)" if config.reduce_range
                   else "; 8-bit weights (no reduce_range: CPUs with VNNI)")
    if config.float_layers:
        reason += f"; {len(config.float_layers)} layer(s) kept fp32 (float_layers)"
    return reason


def check_float_layers(module_names: Sequence[str], float_layers: Sequence[str]) -> None:
    """Every name in ``float_layers`` must be a module of the model (ExportError otherwise)."""
    unknown = sorted(set(float_layers) - set(module_names))
    if unknown:
        raise ExportError(f"int8: float_layers names no module of the model: {', '.join(unknown[:5])}",
                          "use names from model.named_modules() (edgepack diagnose lists them)")


def describe(*, per_channel: bool, dynamic: bool, calibration_samples: int, qat: bool = False,
             activation_observer: str | None = None, fuse_clamp: bool | None = None,
             float_layers: Sequence[str] = (), reason: str | None = None) -> dict:
    """The recipe as a plain dict, for the manifest."""
    if dynamic:
        observer = "none (dynamic)"
    elif qat:
        observer = "FusedMovingAvgObsFakeQuantize (QAT)"
    else:
        observer = activation_observer or DEFAULT_ACTIVATION_OBSERVER
    record = {
        "method": "pt2e-qat" if qat else "pt2e-ptq",
        "quantizer": "XNNPACKQuantizer.get_symmetric_quantization_config",
        "granularity": "per-channel" if per_channel else "per-tensor",
        "dynamic": dynamic,
        "weights": "int8 symmetric [-127, 127]",
        "activations": "int8 affine per-tensor, " + ("dynamic (runtime)" if dynamic else "static (calibrated)"),
        "activation_observer": observer,
        "clamp_fusion": bool(fuse_clamp) if fuse_clamp is not None else (not qat and not dynamic),
        "float_layers": list(float_layers),
        "calibration_samples": calibration_samples,
    }
    if reason:
        record["reason"] = reason
    return record


def recipe_record(recipe: Recipe, used: int, reason: str | None = None) -> dict:
    """describe() of a Recipe that calibrated on ``used`` samples."""
    record = describe(per_channel=recipe.per_channel, dynamic=recipe.dynamic, calibration_samples=used,
                      activation_observer=recipe.activation_observer,
                      fuse_clamp=recipe.fuse_clamp and not recipe.dynamic,
                      float_layers=recipe.float_layers, reason=reason)
    record["bias_correction"] = bool(recipe.bias_correction and not recipe.dynamic)
    if recipe.quantizer == "litert":
        record["quantizer"] = "litert_torch PT2EQuantizer.get_symmetric_quantization_config"
        if recipe.annotate_as == "xnnpack":
            record["annotation"] = XNNPACK_ANNOTATION_NOTE
    elif recipe.quantizer == "x86":
        record["quantizer"] = "XNNPACKQuantizer annotation, onnxruntime x86 int8 types (quant/quantizers.py)"
        record["activations"] = "uint8 affine per-tensor, static (calibrated)"
        record["weight_bits"] = recipe.weight_bits
    if recipe.weight_bits == 7:
        record["weights"] = "int8 symmetric [-63, 63] (7-bit: reduce_range, x86 without VNNI)"
    return record
