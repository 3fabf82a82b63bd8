"""4-bit grouped nn.Linear weights chosen with calibration data (GPTQ), or by round-to-nearest.

Both produce the same thing: for each Linear, int4 codes in [-8, 7] (symmetric, no zero point) and
one float scale per ``group_size`` input channels, so that weight = codes * scale. The exporters
write these codes and scales into the artifacts as they are (quant/weight_only.py for the .pte,
export/onnx_int4.py for MatMulNBits) instead of re-deriving them by round-to-nearest.

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): per Linear, H = X^T X over the calibration inputs that reach it; the columns
(input channels) are quantized one at a time and each one's rounding error is spread over the
columns not yet quantized, weighted by H^-1, so the layer's *output* on the calibration data
moves as little as it can. Layers are done in the order the model runs them, each one's H taken
with the earlier layers already quantized (the error they leave is compensated too). Group scales
are fixed before the sweep (static groups: a scale per 32 channels that does not depend on the
order), chosen per group to minimise the diag(H)-weighted rounding error; columns are swept in
order of decreasing H diagonal (act-order). Measurements: see targets/android-arm64-int4.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


InputTuple = tuple[torch.Tensor, ...]
QMIN, QMAX = -8, 7
DAMPING = 0.01  # of the mean H diagonal, added to the diagonal (GPTQ's default)
_BLOCK = 128  # columns whose updates are applied lazily together (speed only, same result)
# Candidate scales for a group: amax * f / d. amax/7.5 is torchao's and onnxruntime's RTN choice.
_SHRINK = torch.linspace(1.0, 0.5, 26)
_DIVISORS = (7.0, 7.5, 8.0)


@dataclass(frozen=True)
class IntWeight:
    """One Linear's integer weight: ``codes`` int8 [out, in], ``scales`` float32 [out, in // group].
    4 bits: codes in [-8, 7], a scale per group of input channels; 8 bits (quant/mixed.py): codes
    in [-127, 127], one scale per output channel (scales [out, 1])."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int = 4

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scales.repeat_interleave(self.group_size, dim=1)


def rtn(weight: torch.Tensor, group_size: int) -> IntWeight:
    """Round-to-nearest with scale amax / 7.5 per group (what torchao and onnxruntime do)."""
    out, inp = weight.shape
    groups = weight.detach().float().reshape(out, inp // group_size, group_size)
    scales = (groups.abs().amax(-1) / 7.5).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (groups / scales[..., None]).round().clamp(QMIN, QMAX)
    return IntWeight(codes.reshape(out, inp).to(torch.int8), scales)


def group_scales(weight: torch.Tensor, importance: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group, the scale among ``amax * f / d`` (f in [0.5, 1], d in 7, 7.5, 8) whose rounding
    error, weighted per input channel by ``importance`` (H's diagonal), is smallest."""
    out, inp = weight.shape
    groups = weight.reshape(out, inp // group_size, group_size)
    amax = groups.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny)
    weights = importance.reshape(1, inp // group_size, group_size)
    best_error, best = None, None
    for divisor in _DIVISORS:
        for shrink in _SHRINK:
            scales = amax * float(shrink) / divisor
            error = (((groups / scales[..., None]).round().clamp(QMIN, QMAX) * scales[..., None] - groups) ** 2
                     * weights).sum(-1)
            if best_error is None:
                best_error, best = error, scales
            else:
                better = error < best_error
                best_error, best = torch.where(better, error, best_error), torch.where(better, scales, best)
    return best


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damping: float = DAMPING) -> IntWeight:
    """GPTQ on one Linear weight [out, in] with H = E[x x^T] [in, in] of its inputs."""
    weight = weight.detach().double().clone()
    hessian = hessian.double().clone()
    out, inp = weight.shape
    dead = torch.diag(hessian) == 0  # an input channel that is always 0: its weights do not matter
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    # bfloat16-exact scales: XNNPACK's int4 kernels keep scales in bfloat16, so the .pte and the
    # .onnx (float32 scales) then hold the very same weights, and GPTQ compensates the rounding.
    scales = group_scales(weight, torch.diag(hessian), group_size).to(torch.bfloat16).double()
    column_scales = scales.repeat_interleave(group_size, dim=1)
    order = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    weight, column_scales = weight[:, order], column_scales[:, order]
    hessian = hessian[order][:, order]
    hessian += damping * torch.diag(hessian).mean() * torch.eye(inp, dtype=hessian.dtype)
    # The upper Cholesky factor of H^-1: row i holds how column i's error moves the later columns.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    codes = torch.zeros_like(weight)
    for start in range(0, inp, _BLOCK):
        stop = min(start + _BLOCK, inp)
        block = weight[:, start:stop].clone()
        errors = torch.zeros_like(block)
        local = inverse[start:stop, start:stop]
        for i in range(stop - start):
            scale = column_scales[:, start + i]
            code = (block[:, i] / scale).round().clamp(QMIN, QMAX)
            codes[:, start + i] = code
            error = (block[:, i] - code * scale) / local[i, i]
            block[:, i:] -= error[:, None] * local[i, i:][None, :]
            errors[:, i] = error
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]
    codes = codes[:, torch.argsort(order)]
    return IntWeight(codes.to(torch.int8), scales.float())


class _Collected(Exception):
    """Raised by the hook once a layer called once per forward has its input: the rest of the
    forward is not needed (half the passes' cost on average)."""


def _execution_order(model: nn.Module, names: Sequence[str], sample: InputTuple) -> tuple[list[str], set[str]]:
    """``names`` in the order the model first calls them on ``sample`` (never called: last, by
    name), and the ones called exactly once per forward."""
    calls: dict[str, int] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)) for name in names]
    try:
        model(*sample)
    finally:
        for hook in hooks:
            hook.remove()
    return list(calls) + sorted(set(names) - set(calls)), {name for name, count in calls.items() if count == 1}


def flat_outputs(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in flat_outputs(item)]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in flat_outputs(value[key])]
    raise TypeError(f"output of type {type(value).__name__}")


def batched(model: nn.Module, samples: Sequence[InputTuple], size: int = 64) -> list[InputTuple]:
    """``samples`` concatenated along the batch dimension, ``size`` at a time, when the model gives
    the same outputs for two samples batched as one at a time (checked); otherwise as they are."""
    first = samples[:2]
    if len(first) < 2 or any(len(s) != len(first[0]) for s in samples):
        return list(samples)
    try:
        if any(a.dim() == 0 or a.shape[1:] != b.shape[1:] for s in samples for a, b in zip(s, first[0])):
            return list(samples)
        together = flat_outputs(model(*[torch.cat(parts) for parts in zip(*first)]))
        apart = [flat_outputs(model(*sample)) for sample in first]
        same = len(together) == len(apart[0]) and all(
            t.shape[0] == a.shape[0] + b.shape[0] and torch.allclose(t, torch.cat([a, b]), rtol=1e-4, atol=1e-5)
            for t, a, b in zip(together, *apart))
    except (RuntimeError, TypeError, ValueError, IndexError):  # the model does not take a batch
        return list(samples)
    if not same:
        return list(samples)
    return [tuple(torch.cat(parts) for parts in zip(*samples[i:i + size])) for i in range(0, len(samples), size)]


def _input_hessian(model: nn.Module, name: str, samples: Sequence[InputTuple], once: bool) -> torch.Tensor:
    """E[x x^T] over every row (token, pixel, ...) of the inputs ``name`` receives on ``samples``."""
    linear = model.get_submodule(name)
    total = torch.zeros(linear.in_features, linear.in_features, dtype=torch.float64)
    rows = [0]

    def accumulate(module, args):
        x = args[0].detach().reshape(-1, linear.in_features).double()
        total.add_(x.T @ x)
        rows[0] += x.shape[0]
        if once:
            raise _Collected

    hook = linear.register_forward_pre_hook(accumulate)
    try:
        for sample in samples:
            try:
                model(*sample)
            except _Collected:
                pass
    finally:
        hook.remove()
    return total / max(rows[0], 1)


@torch.no_grad()
def gptq_model(model: nn.Module, names: Sequence[str], samples: Sequence[InputTuple],
               group_size: int, damping: float = DAMPING) -> dict[str, IntWeight]:
    """GPTQ codes and scales for the Linears ``names`` of ``model`` (left unchanged), layer by layer
    in execution order, each layer's inputs taken with the earlier layers already quantized."""
    if not samples:
        raise ValueError("GPTQ needs calibration samples")
    work = _copy_for_calibration(model, names)
    order, once = _execution_order(work, names, samples[0])
    batches = batched(work, samples)
    result: dict[str, IntWeight] = {}
    for name in order:
        linear = work.get_submodule(name)
        quantized = gptq(linear.weight, _input_hessian(work, name, batches, name in once), group_size, damping)
        linear.weight.copy_(quantized.dequantized().to(linear.weight.dtype))
        result[name] = quantized
    return result


def _copy_for_calibration(model: nn.Module, names: Sequence[str]) -> nn.Module:
    import copy

    work = copy.deepcopy(model).eval()
    for name in names:
        if not isinstance(work.get_submodule(name), nn.Linear):
            raise ValueError(f"{name} is not an nn.Linear")
    return work
