"""equalize: cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", sec. 4.1)
of the float model, before any quantizer sees it, so every format's int8 benefits.

For two weighted layers joined by ops that commute with a positive per-channel scale
(batch norm, ReLU, zero padding, pooling, a 1x1 flatten), channel c of the first layer's
output is divided by s_c and the second layer's input channel c multiplied by s_c, with
s_c = sqrt(r1_c / r2_c) (r = the channel's weight range, batch norm folded), so both layers
get the same per-channel range sqrt(r1_c * r2_c). The float function is unchanged up to
float rounding: the stage checks that on the calibration samples and fails if not.

ReLU6 clips at 6, so it does not commute: relu6(y / s) * s = clamp(y, 0, 6 s). Pairs joined
by ReLU6 (EfficientNet-Lite, MobileNetV2: expand -> depthwise -> project) are handled by
``relu6``:
  exact       (default) leave them alone: only pairs without a clipping activation are
              equalized, so the model is exactly the same function.
  calibrated  equalize channel c only while its pre-activation maximum on the calibration
              data, times (1 + headroom), stays below the clip both before and after
              scaling (channels that reach 6 keep s_c = 1). Identical outputs on the
              calibration data and on any input whose pre-activation stays within the
              headroom; an input that drives such a channel past 6 / (1 + headroom) sees
              a different clip. Recorded per pair in the details. Measured on
              EfficientNet-Lite0: identical on its 32 calibration views (6.6e-7), but the
              held-out views' float logits moved by up to 32% (cosine to the original
              0.990 mean, 0.951 min) and int8 got worse (16/16, cosine .986 vs .996), so it
              is opt-in only.
Measured on EfficientNet-Lite0 (exact; 2 pairs without ReLU6 between them: blocks.0 project
-> blocks.1 expand, blocks.15 project -> conv_head): float outputs within 6.4e-7 relative;
int8 (clamp fusion, min/max, bias correction) logit cosine .9963 -> .9968 mean, .9876 -> .9934 min, 16/16 both.
Bias correction (Nagel sec. 4.2) is not done here: it compensates the error of one
quantizer's int8 weights, which changes the float function; it is part of the PT2E int8
recipe (quant/bias_correction.py) instead.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..stage import StageConfig, StageContext

# Float-preservation check on the calibration samples (relative to the output's max |value|).
PRESERVE_RTOL = 1e-4
_CHECK_SAMPLES = 4
_MAX_SCALE = 1e3


class EqualizeConfig(StageConfig):
    type: Literal["equalize"] = "equalize"
    iterations: int = Field(default=4, ge=1, le=100, description="passes over all pairs (chains converge)")
    relu6: Literal["exact", "calibrated"] = Field(
        default="exact", description="pairs joined by ReLU6: leave alone (exact) or equalize channels the "
                                     "calibration data never clips (calibrated)")
    headroom: float = Field(default=0.25, ge=0.0, le=10.0,
                            description="calibrated: safety margin on the calibrated pre-activation maximum")

    @model_validator(mode="after")
    def _headroom_needs_calibrated(self) -> "EqualizeConfig":
        if self.relu6 == "exact" and self.headroom != type(self).model_fields["headroom"].default:
            raise ValueError("equalize headroom only applies to relu6: calibrated")
        return self


CONFIG = EqualizeConfig

_PASS = {"pad", "constant_pad_nd", "dropout", "dropout_", "max_pool2d", "adaptive_avg_pool2d", "avg_pool2d",
         "mean", "view", "reshape", "flatten", "_unsafe_view", "clone", "contiguous", "alias", "identity"}
_BATCH_NORM = {"_native_batch_norm_legit_no_training", "batch_norm", "_native_batch_norm_legit"}


@dataclass
class _Pair:
    first: str  # module name of the first conv/linear
    batch_norm: str | None  # module name of the batch norm after it, if any
    clip: float | None  # upper clip of the activation between them (6 for ReLU6), None if none
    second: str  # module name of the second conv/linear


def _op(node: torch.fx.Node) -> str:
    schema = getattr(node.target, "_schema", None)
    return schema.name.split("::")[-1] if schema is not None else getattr(node.target, "__name__", str(node.target))


def _find_pairs(model: nn.Module, example: tuple) -> tuple[list[_Pair], list[str]]:
    """Equalizable pairs from the exported graph, and why other candidate pairs were skipped."""
    program = torch.export.export(model, example)
    signature = program.graph_signature
    param_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    modules = dict(model.named_modules())

    def owner(node: Any) -> str | None:
        if isinstance(node, torch.fx.Node) and node.name in param_of:
            return param_of[node.name].rsplit(".", 1)[0]
        return None

    def weighted(node: torch.fx.Node) -> str | None:
        if node.op != "call_function" or _op(node) not in ("conv2d", "conv1d", "linear", "convolution"):
            return None
        if _op(node) == "convolution" and node.args[6]:
            return None  # transposed
        name = owner(node.args[1])
        return name if name is not None and isinstance(modules.get(name), (nn.Conv1d, nn.Conv2d, nn.Linear)) else None

    pairs, skipped = [], []
    for node in program.graph.nodes:
        first = weighted(node)
        if first is None:
            continue
        current, batch_norm, clip, ok = node, None, None, True
        axis = _output_channel_axis(node)
        while ok:
            if len(current.users) != 1:
                ok = False
                break
            (user,) = current.users
            op = _op(user) if user.op == "call_function" else ""
            if op in _BATCH_NORM and batch_norm is None and clip is None and user.args[0] is current:
                batch_norm = owner(user.args[1])
                ok = batch_norm is not None and isinstance(modules.get(batch_norm), nn.BatchNorm2d | nn.BatchNorm1d)
                current = user
            elif op == "getitem" and _op(current) in _BATCH_NORM and user.args[1] == 0:
                current = user
            elif op in ("relu", "relu_") and clip is None:
                clip, current = math.inf, user
            elif op in ("hardtanh", "hardtanh_") and clip is None and len(user.args) >= 3 and user.args[1] == 0.0:
                clip, current = float(user.args[2]), user
            elif op in _PASS and (op not in ("pad", "constant_pad_nd") or _zero_pad(user, axis)):
                if op in ("view", "reshape", "flatten", "_unsafe_view", "mean"):
                    axis = _channel_kept(current, user, axis)
                    ok = axis is not None
                current = user
            else:
                second = weighted(user) if user.args and user.args[0] is current else None
                if second is not None and (axis is None or axis != _input_channel_axis(current, user)):
                    second = None  # it reads another dim: a linear over a conv's width, say
                if second is None:
                    ok = False
                    break
                if not _second_fits(modules[first], modules[second]):
                    skipped.append(f"{first} -> {second}: grouped convolution")
                    ok = False
                    break
                pairs.append(_Pair(first, batch_norm, clip if clip != math.inf else None, second))
                break
    return pairs, skipped


def _zero_pad(node: torch.fx.Node, axis: int | None) -> bool:
    """Zero padding of dims other than the channel ``axis`` (a pad list of 2k pads the last k dims)."""
    if _op(node) == "constant_pad_nd":  # (input, pad, value)
        value, mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0), "constant"
    else:  # pad: (input, pad, mode, value)
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", 0.0)
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    shape = getattr(node.meta.get("val"), "shape", None)
    if axis is None or shape is None or axis >= len(shape) - len(node.args[1]) // 2:
        return False
    return mode == "constant" and (value is None or float(value) == 0.0)


def _output_channel_axis(node: torch.fx.Node) -> int | None:
    """Where a conv/linear result keeps its output channels: dim 1 of a convolution's
    [N, C, ...]; the last dim of a linear's [..., out] (a transformer's [B, S, hidden] too)."""
    shape = getattr(node.meta.get("val"), "shape", None)
    if shape is None or len(shape) == 0:
        return None
    return len(shape) - 1 if _op(node) == "linear" else min(1, len(shape) - 1)


def _input_channel_axis(value: torch.fx.Node, layer: torch.fx.Node) -> int | None:
    """The dim of ``value`` that ``layer`` (conv/linear) reads as its input channels."""
    shape = getattr(value.meta.get("val"), "shape", None)
    if shape is None or len(shape) == 0:
        return None
    return len(shape) - 1 if _op(layer) == "linear" else min(1, len(shape) - 1)


def _channel_kept(before: torch.fx.Node, after: torch.fx.Node, axis: int | None) -> int | None:
    """The channel axis after a reshape/mean if channel c still sits alone at index c along it
    ([N, C, 1, 1] -> [N, C]; a mean over other dims), else None (the pair is not equalizable:
    e.g. a view that splits the channels into heads, or a mean over the channels)."""
    shape_in = getattr(before.meta.get("val"), "shape", None)
    shape_out = getattr(after.meta.get("val"), "shape", None)
    if shape_in is None or shape_out is None or axis is None or not shape_out:
        return None
    if _op(after) == "mean":
        dims = after.args[1] if len(after.args) > 1 else after.kwargs.get("dim")
        if dims is None:
            return None  # a mean over everything
        reduced = {d % len(shape_in) for d in ([dims] if isinstance(dims, int) else dims)}
        keepdim = bool(after.args[2] if len(after.args) > 2 else after.kwargs.get("keepdim", False))
        if axis in reduced:
            return None
        new_axis = axis if keepdim else axis - sum(d < axis for d in reduced)
    else:  # a view keeps channel c at c if the dims before it are unchanged and those after it are 1
        if tuple(shape_out[:axis]) != tuple(shape_in[:axis]) or math.prod(shape_in[axis + 1:]) != 1:
            return None
        new_axis = axis
    return new_axis if new_axis < len(shape_out) and shape_out[new_axis] == shape_in[axis] else None


def _second_fits(first: nn.Module, second: nn.Module) -> bool:
    if isinstance(second, nn.Linear):
        return True
    groups = second.groups
    return groups == 1 or (groups == second.in_channels == second.out_channels == _out_channels(first))


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _first_range(model_modules: dict, pair: _Pair) -> torch.Tensor:
    weight = model_modules[pair.first].weight.detach()
    ranges = weight.abs().reshape(weight.shape[0], -1).amax(dim=1)
    if pair.batch_norm is not None:
        bn = model_modules[pair.batch_norm]
        ranges = ranges * (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps))
    return ranges


def _second_range(model_modules: dict, pair: _Pair) -> torch.Tensor:
    module = model_modules[pair.second]
    weight = module.weight.detach()
    if isinstance(module, nn.Linear) or module.groups == 1:
        return weight.abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1)
    return weight.abs().reshape(weight.shape[0], -1).amax(dim=1)  # depthwise: filter c reads channel c


@torch.no_grad()
def _apply(model_modules: dict, pair: _Pair, scale: torch.Tensor) -> None:
    """Divide channel c of the first layer's output by scale[c]; multiply the second's input."""
    if pair.batch_norm is not None:
        bn = model_modules[pair.batch_norm]
        bn.weight.div_(scale)
        bn.bias.div_(scale)
    else:
        first = model_modules[pair.first]
        first.weight.div_(scale.view(-1, *[1] * (first.weight.dim() - 1)))
        if first.bias is not None:
            first.bias.div_(scale)
    second = model_modules[pair.second]
    if isinstance(second, nn.Linear) or second.groups == 1:
        second.weight.mul_(scale.view(1, -1, *[1] * (second.weight.dim() - 2)))
    else:
        second.weight.mul_(scale.view(-1, *[1] * (second.weight.dim() - 1)))


@torch.no_grad()
def _pre_activation_max(model: nn.Module, pairs: list[_Pair], calibration: list) -> dict[str, torch.Tensor]:
    """Per-channel maximum of each clipped pair's pre-activation (the first layer's or its
    batch norm's output) on the calibration data."""
    modules = dict(model.named_modules())
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for pair in pairs:
        if pair.clip is None:
            continue
        name = pair.batch_norm or pair.first
        # A linear's channels are its output's last dim ([B, S, hidden] too); a conv's or batch norm's dim 1.
        last = isinstance(modules[name], nn.Linear)

        def hook(_module, _inputs, output, name=name, last=last):
            axis = output.dim() - 1 if last else min(1, output.dim() - 1)
            dims = [d for d in range(output.dim()) if d != axis]
            value = output.detach().amax(dim=dims)
            maxima[name] = value if name not in maxima else torch.maximum(maxima[name], value)

        hooks.append(modules[name].register_forward_hook(hook))
    try:
        for sample in calibration:
            model(*sample)
    finally:
        for handle in hooks:
            handle.remove()
    return maxima


def _outputs(model: nn.Module, samples: list) -> list[torch.Tensor]:
    with torch.no_grad():
        results = []
        for sample in samples:
            out = model(*sample)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            results.append(torch.cat([o.detach().float().flatten() for o in outs]))
        return results


def run(config: EqualizeConfig, model: nn.Module, ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(model).eval()
    example = tuple(ctx.example_inputs)
    pairs, skipped = _find_pairs(model, example)
    modules = dict(model.named_modules())
    clipped = [p for p in pairs if p.clip is not None]
    if config.relu6 == "exact":
        for p in clipped:
            skipped.append(f"{p.first} -> {p.second}: joined by a clip at {p.clip:g} (relu6: exact)")
        active = [p for p in pairs if p.clip is None]
    else:
        active = pairs
    check = list(ctx.calibration[:_CHECK_SAMPLES]) or [example]
    before = _outputs(model, check)
    maxima = _pre_activation_max(model, active, list(ctx.calibration)) if config.relu6 == "calibrated" else {}
    if config.relu6 == "calibrated" and clipped and not ctx.calibration:
        raise ValueError("equalize relu6: calibrated needs calibration data")
    total = {id(p): torch.ones(_out_channels(modules[p.first])) for p in active}
    limited: dict[str, int] = {}
    for _ in range(config.iterations):
        for pair in active:
            r1, r2 = _first_range(modules, pair), _second_range(modules, pair)
            scale = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
            scale = scale.clamp(1 / _MAX_SCALE, _MAX_SCALE)
            if pair.clip is not None:
                original = maxima[pair.batch_norm or pair.first]  # before any scaling
                peak = original / total[id(pair)]  # in the current scaling
                safe = original * (1 + config.headroom) < pair.clip  # the original never clips either
                scale = torch.where(safe, torch.maximum(scale, peak * (1 + config.headroom) / pair.clip),
                                    torch.ones_like(scale))
                limited[f"{pair.first} -> {pair.second}"] = int((~safe).sum())
            _apply(modules, pair, scale)
            total[id(pair)] = total[id(pair)] * scale
    after = _outputs(model, check)
    worst = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(after, before))
    if config.relu6 == "exact" and worst > PRESERVE_RTOL:
        raise ValueError(f"equalize changed the float outputs by {worst:.2e} (relative), more than "
                         f"{PRESERVE_RTOL:g}; this is a bug, please report it with the model")
    details: dict[str, Any] = {
        "method": "cross-layer equalization (Nagel et al. 2019)",
        "relu6": config.relu6,
        "pairs": [{"first": p.first, "second": p.second, "activation": "relu6" if p.clip == 6 else
                   ("clip" if p.clip is not None else "none/relu"),
                   "log2_scale_mean_abs": round(float(total[id(p)].log2().abs().mean()), 4)} for p in active],
        "skipped": skipped,
        "float_output_max_rel_change": worst,
        "check_samples": len(check),
    }
    if config.relu6 == "calibrated":
        details["headroom"] = config.headroom
        details["channels_left_unscaled_because_they_clip"] = limited
    return model, details
