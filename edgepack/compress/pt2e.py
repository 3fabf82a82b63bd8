"""PT2E int8 quantization (XNNPACK for .pte, litert-torch for .tflite): quantizer config,
capture, calibrate, bias-correct, convert.

Shared by the ExecuTorch and LiteRT exporters (post-training quantization), the per-layer
diagnosis (edgepack/diagnose.py), the fallback ranking and the QAT stage, so all of them use
exactly the same recipe. Not a stage itself (no CONFIG/run), so the compress registry never
imports it; executorch/torchao/litert are imported inside the functions.

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

1. Clamp fusion (``fuse_clamp``). The stock quantizers fuse conv/linear + ReLU, but not
   + ReLU6 (aten.hardtanh): hardtanh is a "share the observer" op, so a ReLU6 output is
   quantized with the scale of the *pre-activation* conv output (BN folded, often
   [-40, 30]), leaving ~20 of 256 levels for the [0, 6] values the next layer reads. We
   annotate conv/linear -> hardtanh like conv -> relu: the observer sits after the clamp.
   XNNPACK and TFLite fuse the clamp into the conv, so the lowered graph keeps its shape.
2. Bias correction (``bias_correction``, Nagel et al. 2019 sec. 4.2, empirical): after
   calibration every conv/linear bias absorbs the mean per-channel shift its int8 weights
   and inputs cause, layer by layer. The diagnosis showed the remaining error after (1) is
   dominated by weights (depthwise 3x3 filters with large, cancelling taps) whose error has
   a per-channel mean the global average pool accumulates; removing it is what brings
   EfficientNet-Lite0 to 16/16.
3. The activation observer is selectable: MSE by default (the range, [min, max] scaled by
   a searched ratio, that minimises the int8 round-trip error on the calibration values);
   histogram is the stock choice.

Float layers: module names in ``float_layers`` are left unannotated, so their ops run in fp32
(inside the XNNPACK delegate / as float TFLite ops) between dequantize and quantize. Note
that an int8 consumer still quantizes a float layer's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn

from ..errors import RuntimeUnavailable

InputTuple = tuple[torch.Tensor, ...]

_INSTALL_HINT = "pip install executorch==1.5.1 (brings torchao 0.18)"

ACTIVATION_OBSERVERS: tuple[str, ...] = ("minmax", "moving-average", "histogram", "percentile", "mse")
# Chosen by measurement on EfficientNet-Lite0 (the table in the module docstring).
DEFAULT_ACTIVATION_OBSERVER: str = "mse"
DEFAULT_RECIPE_REASON = (
    "measured default (compress/pt2e.py): ReLU6 fused before its output is observed, MSE-chosen "
    "activation ranges, empirical bias correction; on EfficientNet-Lite0 (16 held-out views) this "
    "takes the .pte from 7/16 top-1 agreement, logit cosine 0.84 (stock XNNPACK recipe) to 16/16, "
    "0.997, and the .tflite from 6/16, 0.82 to 16/16, 0.997")
DEFAULT_BIAS_CORRECTION = True
# Samples the bias correction runs in lockstep (float and int8 graph, all at once): memory
# grows with it (EfficientNet-Lite0: ~15 MB per sample at the widest layer).
BIAS_CORRECTION_MAX_SAMPLES = 32
PERCENTILE = 99.99  # percentile observer: per-sample percentile of the low/high tail, averaged
MOVING_AVERAGE_CONSTANT = 0.01  # torch's default averaging constant
_MSE_KEEP_PER_SAMPLE = 1 << 14  # values kept per calibration sample for the MSE search
_MSE_TAIL = 32  # plus the largest/smallest values of each sample, so outliers are seen
_MSE_GRID = 33  # candidate clipping ratios in [0.2, 1], then as many around the best one


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
    # Whose quantizer annotates the graph: XNNPACKQuantizer (ExecuTorch) or litert-torch's
    # PT2EQuantizer (LiteRT); the recipe changes above apply to both.
    quantizer: Literal["xnnpack", "litert"] = "xnnpack"

    def __post_init__(self) -> None:
        if self.activation_observer not in ACTIVATION_OBSERVERS:
            raise ValueError(f"activation_observer {self.activation_observer!r}: "
                             f"expected one of {', '.join(ACTIVATION_OBSERVERS)}")


# --------------------------------------------------------------------------- observers


def _observer_classes() -> dict[str, tuple[type, dict]]:
    """name -> activation observer class and arguments (torchao observers + two of ours)."""
    try:
        from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", _INSTALL_HINT) from exc
    percentile, mse = _custom_observers()
    return {  # name -> (class, constructor arguments besides eps)
        "minmax": (MinMaxObserver, {}),
        "moving-average": (MovingAverageMinMaxObserver, {"averaging_constant": MOVING_AVERAGE_CONSTANT}),
        "histogram": (HistogramObserver, {}),
        "percentile": (percentile, {}),
        "mse": (mse, {}),
    }


@lru_cache(maxsize=1)
def _custom_observers() -> tuple[type, type]:
    from torchao.quantization.pt2e import MinMaxObserver

    class PercentileObserver(MinMaxObserver):
        """Range = mean over calibration samples of each sample's PERCENTILE tails.

        Clips the rare extreme values of each sample; the mean keeps one unusual sample from
        setting the range (min/max) while still following typical samples.
        """

        def __init__(self, *args: Any, percentile: float = PERCENTILE, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.percentile = percentile
            self._lows: list[float] = []
            self._highs: list[float] = []

        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            if x_orig.numel() == 0:
                return x_orig
            super().forward(x_orig)
            x = x_orig.detach().float().flatten()
            tail = max(1, int(round(x.numel() * (100.0 - self.percentile) / 100.0)))
            tail = min(tail, x.numel())
            self._highs.append(float(torch.topk(x, tail).values[-1]))
            self._lows.append(float(-torch.topk(-x, tail).values[-1]))
            return x_orig

        @torch.jit.export
        def calculate_qparams(self):  # type: ignore[override]
            if not self._lows:
                return super().calculate_qparams()
            low = torch.tensor(sum(self._lows) / len(self._lows))
            high = torch.tensor(sum(self._highs) / len(self._highs))
            return self._calculate_qparams(torch.minimum(low, high), torch.maximum(low, high))

    class MSEObserver(MinMaxObserver):
        """Range = [min, max] x s, with s in [0.2, 1] minimising the int8 round-trip MSE over
        a subsample of the calibration values (every sample's tails always included)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kept: list[torch.Tensor] = []
            # the search's result until the next observation: the recipe asks for it more than
            # once (bias correction's instrumentation, then convert) and each search costs
            # ~0.1-0.3 s per activation on a transformer's calibration set
            self._qparams: tuple[torch.Tensor, torch.Tensor] | None = None

        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            if x_orig.numel() == 0:
                return x_orig
            self._qparams = None
            super().forward(x_orig)
            x = x_orig.detach().float().flatten()
            stride = max(1, math.ceil(x.numel() / _MSE_KEEP_PER_SAMPLE))
            tail = min(_MSE_TAIL, x.numel())
            # clone: a strided view would keep the whole activation tensor alive
            self._kept.extend([x[::stride].clone(), torch.topk(x, tail).values, -torch.topk(-x, tail).values])
            return x_orig

        @torch.jit.export
        def calculate_qparams(self):  # type: ignore[override]
            if not self._kept:
                return super().calculate_qparams()
            if self._qparams is None:
                self._qparams = self._search()
            scale, zero_point = self._qparams
            return scale.clone(), zero_point.clone()

        def _search(self) -> tuple[torch.Tensor, torch.Tensor]:
            values = torch.cat(self._kept)
            low, high = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
            coarse = torch.linspace(0.2, 1.0, _MSE_GRID)
            best = self._best_ratio(values, low, high, coarse)
            step = float(coarse[1] - coarse[0])
            fine = torch.linspace(max(0.05, best - step), min(1.0, best + step), _MSE_GRID)
            best = self._best_ratio(values, low, high, fine)
            return self._calculate_qparams(torch.tensor(low * best), torch.tensor(high * best))

        def _best_ratio(self, values: torch.Tensor, low: float, high: float, ratios: torch.Tensor) -> float:
            """The clipping ratio (range = [low, high] x ratio) with the least int8 round-trip MSE."""
            qmin, qmax = self.quant_min, self.quant_max
            scale = ((high - low) * ratios / (qmax - qmin)).clamp_min(1e-12).view(-1, 1)
            zero = torch.clamp(torch.round(qmin - low * ratios.view(-1, 1) / scale), qmin, qmax)
            errors = torch.empty(len(ratios))
            for start in range(0, len(ratios), 8):  # 8 candidates at a time bounds the memory
                sl = slice(start, start + 8)
                # in place, in the order of ((clamp(round(v / s) + z) - z) * s - v) ** 2: one buffer
                q = torch.div(values, scale[sl]).round_().add_(zero[sl]).clamp_(qmin, qmax)
                errors[sl] = q.sub_(zero[sl]).mul_(scale[sl]).sub_(values).square_().mean(dim=1)
            return float(ratios[int(torch.argmin(errors))])

    return PercentileObserver, MSEObserver


# --------------------------------------------------------------------------- quantizer


def quantization_config(*, per_channel: bool, dynamic: bool, qat: bool = False,
                        activation_observer: str = DEFAULT_ACTIVATION_OBSERVER) -> Any:
    """XNNPACK's symmetric int8 config with the chosen activation observer (static PTQ only;
    QAT and dynamic keep the stock fake-quant / placeholder observers)."""
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
        from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    except ImportError as exc:
        raise RuntimeUnavailable(f"executorch is not installed ({exc})", _INSTALL_HINT) from exc
    stock = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic, is_qat=qat)
    if qat or dynamic or activation_observer == "histogram":
        return stock
    observer_class, arguments = _observer_classes()[activation_observer]
    observer = observer_class.with_args(eps=2 ** -12, **arguments)
    act = stock.input_activation
    spec = QuantizationSpec(dtype=act.dtype, observer_or_fake_quant_ctr=observer, quant_min=act.quant_min,
                            quant_max=act.quant_max, qscheme=act.qscheme, ch_axis=act.ch_axis,
                            is_dynamic=False)
    return QuantizationConfig(spec, spec, stock.weight, stock.bias, False)


def xnnpack_quantizer(*, per_channel: bool, dynamic: bool, qat: bool = False,
                      activation_observer: str = DEFAULT_ACTIVATION_OBSERVER,
                      fuse_clamp: bool = True, float_layers: Sequence[str] = ()) -> Any:
    """The XNNPACKQuantizer with one symmetric int8 config applied to the whole model.

    Weights: int8 symmetric in [-127, 127], per output channel or per tensor.
    Activations: int8 affine per tensor; static (``activation_observer`` on calibration data)
    or dynamic (scale chosen at run time from each input, no calibration).
    ``fuse_clamp`` (static PTQ only): observe conv/linear + ReLU6 after the clamp.
    ``float_layers``: module names (as in model.named_modules()) left in fp32.
    QAT keeps the stock quantizer (the qat stage's recipe is unchanged).
    """
    try:
        from torchao.quantization.pt2e.quantizer import get_module_name_filter
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", _INSTALL_HINT) from exc
    config = quantization_config(per_channel=per_channel, dynamic=dynamic, qat=qat,
                                 activation_observer=activation_observer)
    quantizer = _quantizer_class()(fuse_clamp=fuse_clamp and not qat and not dynamic)
    quantizer.set_global(config)
    if float_layers:
        filters = [get_module_name_filter(name) for name in float_layers]
        quantizer.set_filter_function(lambda node: not any(f(node) for f in filters))
    return quantizer


@lru_cache(maxsize=1)
def _quantizer_class() -> type:
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    except ImportError as exc:
        raise RuntimeUnavailable(f"executorch is not installed ({exc})", _INSTALL_HINT) from exc

    class ClampFusingXNNPACKQuantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer that also fuses conv/linear + hardtanh (ReLU6) like + ReLU."""

        def __init__(self, fuse_clamp: bool = True) -> None:
            super().__init__()
            self.fuse_clamp = fuse_clamp

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            if self.fuse_clamp and self.global_config is not None:
                annotate_clamp_fusion(model, self.global_config, self.filter_fn)
            # The conv+batch-norm patterns match training-mode batch norm only (QAT graphs);
            # prepare_pt2e has already folded every eval-mode one into its conv. Each of those
            # patterns is traced with torch.export on every call (~6 s a model), so they are
            # skipped when no batch norm is left in the graph: the annotation is the same.
            if not any("batch_norm" in str(node.target) for node in model.graph.nodes):
                self.SUPPORTED_PATTERNS = [p for p in type(self).SUPPORTED_PATTERNS if "_bn" not in p.name]
            else:
                self.SUPPORTED_PATTERNS = type(self).SUPPORTED_PATTERNS
            return super().annotate(model)

    return ClampFusingXNNPACKQuantizer


def litert_quantizer(*, per_channel: bool, dynamic: bool,
                     activation_observer: str = DEFAULT_ACTIVATION_OBSERVER,
                     fuse_clamp: bool = True, float_layers: Sequence[str] = ()) -> Any:
    """litert-torch's PT2EQuantizer (TFLite int8 kernels' constraints) with the same recipe
    changes as xnnpack_quantizer: observer choice, clamp fusion, fp32 layers."""
    import dataclasses

    try:
        from litert_torch.quantize import pt2e_quantizer
    except ImportError as exc:
        raise RuntimeUnavailable(f"litert-torch is not installed ({exc})",
                                 "pip install litert-torch==0.10.0") from exc
    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic)
    if not dynamic and activation_observer != "histogram":
        from torchao.quantization.pt2e.quantizer import QuantizationSpec

        observer_class, arguments = _observer_classes()[activation_observer]
        act = config.input_activation
        spec = QuantizationSpec(dtype=act.dtype, observer_or_fake_quant_ctr=observer_class.with_args(
            eps=2 ** -12, **arguments), quant_min=act.quant_min, quant_max=act.quant_max, qscheme=act.qscheme,
            ch_axis=act.ch_axis, is_dynamic=False)
        config = dataclasses.replace(config, input_activation=spec, output_activation=spec)
    quantizer = _litert_quantizer_class()(fuse_clamp=fuse_clamp and not dynamic, float_layers=tuple(float_layers))
    return quantizer.set_global(config)


@lru_cache(maxsize=1)
def _litert_quantizer_class() -> type:
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    class ClampFusingPT2EQuantizer(PT2EQuantizer):
        """litert-torch's PT2EQuantizer, plus conv/linear + hardtanh fusion and fp32 layers."""

        def __init__(self, fuse_clamp: bool = True, float_layers: tuple[str, ...] = ()) -> None:
            super().__init__()
            self.fuse_clamp, self.float_layers = fuse_clamp, float_layers

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            mark_float_layers(model, self.float_layers)
            if self.fuse_clamp and self.global_config is not None:
                annotate_clamp_fusion(model, self.global_config)
            return super().annotate(model)

    return ClampFusingPT2EQuantizer


def mark_float_layers(model: torch.fx.GraphModule, float_layers: Sequence[str]) -> int:
    """Mark every op of the ``float_layers`` modules (and its weight/bias) as annotated with
    nothing, so no annotator quantizes it: it runs in fp32 between dequantize and quantize."""
    if not float_layers:
        return 0
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, get_module_name_filter
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    filters = [get_module_name_filter(name) for name in float_layers]
    marked = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or not any(f(node) for f in filters):
            continue
        for target in [node, *(a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")]:
            target.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)
        marked += 1
    return marked


def make_quantizer(recipe: "Recipe") -> Any:
    if recipe.quantizer == "litert":
        return litert_quantizer(per_channel=recipe.per_channel, dynamic=recipe.dynamic,
                                activation_observer=recipe.activation_observer, fuse_clamp=recipe.fuse_clamp,
                                float_layers=recipe.float_layers)
    return xnnpack_quantizer(per_channel=recipe.per_channel, dynamic=recipe.dynamic,
                             activation_observer=recipe.activation_observer, fuse_clamp=recipe.fuse_clamp,
                             float_layers=recipe.float_layers)


_HARDTANH = ("hardtanh.default", "hardtanh_.default")


def _is_target(node: torch.fx.Node, names: tuple[str, ...]) -> bool:
    target = getattr(node.target, "_schema", None)
    if node.op != "call_function" or target is None:
        return False
    overload = target.overload_name or "default"
    return f"{target.name.split('::')[-1]}.{overload}" in names


def annotate_clamp_fusion(model: torch.fx.GraphModule, config: Any, filter_fn: Any = None) -> list[list]:
    """Annotate every conv/linear whose only user is a hardtanh as one partition with the
    output observer after the hardtanh (what the stock quantizer does for relu)."""
    from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, get_bias_qspec,
                                                     get_input_act_qspec, get_output_act_qspec,
                                                     get_weight_qspec)
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    def annotated(nodes: list) -> bool:
        return any(Q_ANNOTATION_KEY in n.meta and n.meta[Q_ANNOTATION_KEY]._annotated for n in nodes)

    partitions = []
    for clamp in model.graph.nodes:
        if not _is_target(clamp, _HARDTANH):
            continue
        producer = clamp.args[0]
        if not isinstance(producer, torch.fx.Node) or len(producer.users) != 1:
            continue
        if not _is_target(producer, ("conv1d.default", "conv2d.default", "linear.default")) and not (
                _is_target(producer, ("convolution.default",)) and not producer.args[6]):  # not transposed
            continue
        act, weight = producer.args[0], producer.args[1]
        bias = producer.args[2] if len(producer.args) > 2 else None
        if not isinstance(act, torch.fx.Node) or not isinstance(weight, torch.fx.Node):
            continue
        partition = [clamp, producer, weight] + ([bias] if isinstance(bias, torch.fx.Node) else [])
        if annotated(partition) or (filter_fn is not None and not all(filter_fn(n) for n in partition)):
            continue
        qspecs = {act: get_input_act_qspec(config), weight: get_weight_qspec(config)}
        if isinstance(bias, torch.fx.Node):
            qspecs[bias] = get_bias_qspec(config)
        producer.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config),
                                                              _annotated=True)
        for node in partition:
            if Q_ANNOTATION_KEY not in node.meta:
                node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation()
            node.meta[Q_ANNOTATION_KEY]._annotated = True
        partitions.append(partition)
    return partitions


# --------------------------------------------------------------------------- recipe record


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


# --------------------------------------------------------------------------- calibration data


def calibration_batches(calibration: Sequence[InputTuple], example_inputs: InputTuple,
                        limit: int) -> Iterator[InputTuple]:
    """Yield at most ``limit`` input tuples shaped exactly like ``example_inputs``.

    The captured graph has static shapes, so each calibration tuple must match the example.
    A calibration batch of B samples is split into single samples when the example batch
    size is 1 and the other dimensions agree. Raises ValueError on any other mismatch.
    """
    produced = 0
    for index, sample in enumerate(calibration):
        if produced >= limit:
            return
        sample = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)
        if len(sample) != len(example_inputs):
            raise ValueError(f"calibration sample {index} has {len(sample)} inputs, "
                             f"the model takes {len(example_inputs)}")
        for part in _split_to_example(sample, example_inputs, index):
            if produced >= limit:
                return
            produced += 1
            yield part


def _split_to_example(sample: InputTuple, example: InputTuple, index: int) -> list[InputTuple]:
    if all(s.shape == e.shape for s, e in zip(sample, example)):
        return [sample]
    batch_sizes = {s.shape[0] for s in sample if s.dim() > 0}
    splittable = (
        len(batch_sizes) == 1
        and all(e.dim() > 0 and e.shape[0] == 1 for e in example)
        and all(s.shape[1:] == e.shape[1:] for s, e in zip(sample, example))
    )
    if not splittable:
        got = [tuple(s.shape) for s in sample]
        want = [tuple(e.shape) for e in example]
        raise ValueError(f"calibration sample {index} has input shapes {got}; "
                         f"the exported graph is static and needs {want}")
    (batch,) = batch_sizes
    return [tuple(s[i:i + 1] for s in sample) for i in range(batch)]


# --------------------------------------------------------------------------- quantize


_EVAL_DROPOUT = ("dropout.default", "feature_dropout.default", "alpha_dropout.default",
                 "feature_alpha_dropout.default")


def capture(model: nn.Module, example_inputs: InputTuple) -> torch.fx.GraphModule:
    """torch.export the model (eval mode) and return the ATen-level GraphModule PT2E works on,
    with eval-mode dropout (an identity) removed.

    Why remove it: no quantizer annotates dropout, so a quantized producer and its consumer
    separated by one get two observers and the graph requantizes (q -> dq -> q) in between.
    MobileNetV2's classifier is such a consumer. ExecuTorch computes that chain as written;
    litert-torch 0.10.0 folds it wrongly (see export/tflite.py repair_bias_scales).
    """
    graph_module = torch.export.export(model, tuple(example_inputs)).module()
    removed = 0
    for node in list(graph_module.graph.nodes):
        name = str(node.target).removeprefix("aten.")
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if node.op == "call_function" and name in _EVAL_DROPOUT and train is False:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            removed += 1
    if removed:
        graph_module.graph.lint()
        graph_module.recompile()
    return graph_module


@torch.no_grad()
def prepare_calibrated(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
                       recipe: Recipe) -> tuple[torch.fx.GraphModule, int]:
    """Capture, annotate and calibrate: (prepared GraphModule with observers, samples used).

    Static quantization raises ValueError if there is no calibration data (calibrating on
    nothing would give meaningless activation ranges). Dynamic quantization ignores it.
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", _INSTALL_HINT) from exc
    unknown = sorted(set(recipe.float_layers) - {name for name, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"float_layers names no module of the model: {unknown[:5]}")
    quantizer = make_quantizer(recipe)
    prepared = prepare_pt2e(capture(model, example_inputs), quantizer)
    prepared.meta["edgepack_quantizer"] = quantizer  # litert-torch's convert wants the quantizer too
    used = 0
    if recipe.dynamic:
        prepared(*example_inputs)  # placeholder observers; one pass keeps convert_pt2e happy
    else:
        for batch in calibration_batches(calibration, example_inputs, recipe.calibration_samples):
            prepared(*batch)
            used += 1
        if used == 0:
            raise ValueError("static int8 quantization needs calibration data and got none")
    return prepared, used


def prepare_corrected(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
                      recipe: Recipe) -> tuple[torch.fx.GraphModule, dict]:
    """prepare_calibrated, then bias correction if the recipe asks for it (static only):
    (prepared graph ready for convert_pt2e, recipe record for the manifest)."""
    prepared, used = prepare_calibrated(model, example_inputs, calibration, recipe)
    record = recipe_record(recipe, used)
    if recipe.bias_correction and not recipe.dynamic:
        samples = list(calibration_batches(calibration, example_inputs,
                                           min(used, BIAS_CORRECTION_MAX_SAMPLES)))
        record["bias_correction"] = bias_correct(prepared, samples)
    return prepared, record


def recipe_record(recipe: Recipe, used: int, reason: str | None = None) -> dict:
    record = describe(per_channel=recipe.per_channel, dynamic=recipe.dynamic, calibration_samples=used,
                      activation_observer=recipe.activation_observer,
                      fuse_clamp=recipe.fuse_clamp and not recipe.dynamic,
                      float_layers=recipe.float_layers, reason=reason)
    record["bias_correction"] = bool(recipe.bias_correction and not recipe.dynamic)
    if recipe.quantizer == "litert":
        record["quantizer"] = "litert_torch PT2EQuantizer.get_symmetric_quantization_config"
    return record


@torch.no_grad()
def quantize_pt2e_xnnpack(model: nn.Module, example_inputs: InputTuple,
                          calibration: Sequence[InputTuple], *, per_channel: bool = True,
                          dynamic: bool = False, calibration_samples: int = 64,
                          activation_observer: str = DEFAULT_ACTIVATION_OBSERVER, fuse_clamp: bool = True,
                          float_layers: Sequence[str] = (), bias_correction: bool = DEFAULT_BIAS_CORRECTION,
                          reason: str | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """Post-training int8 quantization; returns (converted GraphModule, recipe dict)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", _INSTALL_HINT) from exc
    recipe = Recipe(per_channel=per_channel, dynamic=dynamic, activation_observer=activation_observer,
                    fuse_clamp=fuse_clamp, float_layers=tuple(float_layers),
                    calibration_samples=calibration_samples, bias_correction=bias_correction)
    prepared, record = prepare_corrected(model, example_inputs, calibration, recipe)
    if reason:
        record["reason"] = reason
    return convert_pt2e(prepared), record


# --------------------------------------------------------------------------- bias correction



def _bias_nodes(graph_module: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str]]:
    """(conv/linear node, its bias attribute path) for every weighted op with a bias tensor."""
    found = []
    for node in graph_module.graph.nodes:
        if not _is_target(node, ("conv1d.default", "conv2d.default", "linear.default", "convolution.default")):
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
            found.append((node, bias.target))
    return found


def _attr(module: nn.Module, path: str) -> torch.Tensor:
    for part in path.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def _replace_attr(module: nn.Module, path: str, value: torch.Tensor) -> None:
    """Point ``path`` at a new tensor. Never write into the old one: the captured graph shares
    its parameters with the caller's float model, which must stay as it was."""
    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, part)
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
            else value)


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
    import copy

    from ..diagnose import instrument

    probe = copy.deepcopy(prepared)
    switches = [s for layer in instrument(probe) for s in layer.switches]
    targets = dict(_bias_nodes(probe))
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
            bias = _attr(probe, targets[node])
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
    for node, path in _bias_nodes(prepared):
        _replace_attr(prepared, path, _attr(probe, path).detach().clone())
    return {"method": "empirical (Nagel et al. 2019)", "corrected_layers": len(targets), "samples": len(samples),
            "largest_mean_shift_removed": round(largest, 6)}


def _channel_axis(node: torch.fx.Node, value: torch.Tensor) -> int:
    """The output-channel axis of a conv/linear result: dim 1 for a convolution ([N, C, ...]),
    the last dim for a linear, which maps the last dim of an input of any rank ([..., in] ->
    [..., out]; a transformer's [B, S, hidden]). The bias is indexed along this axis."""
    if value.dim() <= 1:
        return 0
    return value.dim() - 1 if _is_target(node, ("linear.default",)) else 1


def _channel_mean(value: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean over every dim but the channel ``axis``."""
    value = value.float()
    if value.dim() <= 1:
        return value
    return value.mean(dim=[d for d in range(value.dim()) if d != axis])
