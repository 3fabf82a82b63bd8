"""Mixed int4/int8 Linear weights: the Linears whose 4-bit error hurts the model most stay int8.

GPTQ (quant/gptq.py) leaves every Linear a small error; in a transformer the model's output error
is the sum of dozens of them, not one bad layer. On all-MiniLM-L6-v2 (36 Linears, group 32) each
Linear alone at 4 bits costs 28-44 dB, all of them together 18 dB, and the worst held-out sentence
reaches cosine 0.969. When an artifact names a target (``mixed_int8: {min_cosine, min_sqnr_db}``),
this module moves Linears to int8 (symmetric, one scale per output channel: codes in [-127, 127],
scale amax / 127), most harmful first, until the model reaches the target on *selection* samples:

- the selection samples are calibration samples GPTQ did not fit (the ones after its first
  ``calibration_samples``), because GPTQ's own samples flatter its codes (calibration sentences
  0.991 where held-out ones fell to 0.969); with no such samples, GPTQ's own are used, and the
  record says so;
- the model is run as the .pte computes it: each Linear with its shipped weights (int4 or int8
  codes times scales) and its input quantized to int8 per token, asymmetric (XNNPACK's dynamic
  activations); the .onnx (float activations) is judged on the same, stricter, emulation, so both
  artifacts carry the same weights;
- the order: each Linear's gain in output SQNR when it alone is int8 over the all-int4 model,
  measured once (one pass per Linear), then Linears are added in that order.

The gate still judges each artifact in its runtime; this only chooses the weights. Measured on
models/minilm_sentence.py: see targets/android-arm64-int4.yaml.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .gptq import IntWeight, batched, flat_outputs

InputTuple = tuple[torch.Tensor, ...]
INT8_MAX = 127


def int8_weight(weight: torch.Tensor) -> IntWeight:
    """Symmetric int8, one scale per output channel (amax / 127), codes in [-127, 127]."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(1, keepdim=True) / INT8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (weight / scales).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return IntWeight(codes, scales, bits=8)


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized and dequantized as XNNPACK's dynamic int8 activations: per row of the last
    dimension, asymmetric, range widened to include 0."""
    low = x.amin(-1, keepdim=True).clamp(max=0)
    high = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - low / scale).round().clamp(-128, 127)
    return ((x / scale + zero).round().clamp(-128, 127) - zero) * scale


def _rows(outputs: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Each sample's outputs as one row (samples batched along dim 0 when every output has it)."""
    if all(t.dim() > 0 and t.shape[0] == batch for t in outputs):
        return torch.cat([t.reshape(batch, -1).float() for t in outputs], 1)
    return torch.cat([t.reshape(1, -1).float() for t in outputs], 1)


class _Emulated:
    """A copy of the model whose Linears run given weights on int8 per-token inputs."""

    def __init__(self, model: nn.Module, names: Sequence[str], samples: Sequence[InputTuple]):
        import copy

        self.model = copy.deepcopy(model).eval()
        self.linears = {name: self.model.get_submodule(name) for name in names}
        self.float = {name: linear.weight.detach().clone() for name, linear in self.linears.items()}
        self.batches = batched(self.model, samples)
        with torch.no_grad():
            self.reference = self._run()  # float weights and activations
        for linear in self.linears.values():
            linear.register_forward_pre_hook(lambda module, args: (_per_token_int8(args[0]), *args[1:]))

    def _run(self) -> torch.Tensor:
        rows = []
        for batch in self.batches:
            rows.append(_rows(flat_outputs(self.model(*batch)), batch[0].shape[0] if batch[0].dim() else 1))
        return torch.cat(rows)

    @torch.no_grad()
    def score(self, weights: dict[str, IntWeight]) -> tuple[float, float]:
        """(min per-sample cosine, SQNR dB) of the emulated model against the float one."""
        for name, linear in self.linears.items():
            linear.weight.copy_(weights[name].dequantized().to(linear.weight.dtype))
        got = self._run()
        cosine = torch.nn.functional.cosine_similarity(got, self.reference, dim=1)
        noise = (got - self.reference).pow(2).sum().clamp(min=1e-30)
        return float(cosine.min()), float(10 * torch.log10(self.reference.pow(2).sum() / noise))


def choose_int8(model: nn.Module, int4: dict[str, IntWeight], samples: Sequence[InputTuple], *,
                min_cosine: float, min_sqnr_db: float) -> tuple[dict[str, IntWeight], dict]:
    """``int4`` with the Linears that most hurt the model moved to int8, the fewest that bring the
    emulated model to ``min_cosine`` and ``min_sqnr_db`` on ``samples``; and the record."""
    names = sorted(int4)
    int8 = {name: int8_weight(model.get_submodule(name).weight) for name in names}
    emulated = _Emulated(model, names, samples)
    all_int4 = emulated.score(int4)
    all_int8 = emulated.score(int8)
    chosen: dict[str, IntWeight] = dict(int4)
    kept: list[str] = []
    steps = [{"int8_layers": 0, "min_cosine": round(all_int4[0], 5), "sqnr_db": round(all_int4[1], 2)}]
    reached = all_int4[0] >= min_cosine and all_int4[1] >= min_sqnr_db
    gains = {} if reached else {name: emulated.score({**int4, name: int8[name]})[1] - all_int4[1] for name in names}
    for name in sorted(gains, key=lambda name: (-gains[name], name)):
        if reached:
            break
        chosen[name] = int8[name]
        kept.append(name)
        found = emulated.score(chosen)
        steps.append({"int8_layers": len(kept), "min_cosine": round(found[0], 5), "sqnr_db": round(found[1], 2),
                      "added": name})
        reached = found[0] >= min_cosine and found[1] >= min_sqnr_db
    params = {name: int4[name].codes.numel() for name in names}
    record = {
        "target": {"min_cosine": min_cosine, "min_sqnr_db": min_sqnr_db},
        "reached": reached,
        "int8_layers": kept,
        "int8_weight_share": round(sum(params[n] for n in kept) / max(sum(params.values()), 1), 3),
        "int8_weights": "symmetric, one scale per output channel (amax / 127)",
        "emulation": "shipped weights, Linear inputs int8 per token (asymmetric), as XNNPACK runs them",
        "order": "each Linear's SQNR gain when it alone is int8, most first",
        "all_int4": steps[0], "all_int8": {"min_cosine": round(all_int8[0], 5), "sqnr_db": round(all_int8[1], 2)},
        "steps": steps,
    }
    return chosen, record


def mixed_note(record: dict) -> str:
    """One line for the build's notes: how many Linears stayed int8 and whether the target was reached."""
    target = record["target"]
    last = record["steps"][-1]
    reached = "reached" if record["reached"] else "NOT reached even with every Linear int8"
    return (f"mixed_int8: {len(record['int8_layers'])} Linear(s) int8, {record['int8_weight_share']:.0%} of the "
            f"Linear weights; target cosine >= {target['min_cosine']}, SQNR >= {target['min_sqnr_db']} dB {reached} "
            f"on {record.get('selection_samples', '?')} selection samples (emulated: cosine min "
            f"{last['min_cosine']}, {last['sqnr_db']} dB)")
