"""The int4-weight recipe's weights: GPTQ codes (quant/gptq.py), then, when the artifact names a
target, the Linears that most hurt the model moved to int8 (quant/mixed.py); shared within a build
by every exporter and the reproducibility check."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..cache import weights_digest
from ..errors import ExportError
from .calibrate import calibration_batches, inputs_digest, shared_result
from .gptq import DAMPING, IntWeight, gptq_model
from .mixed import choose_int8

InputTuple = tuple[torch.Tensor, ...]
# mixed_int8: at most this many calibration samples after GPTQ's choose which Linears stay int8: a
# per-sample minimum is decided by the few hardest samples, so every one available counts (all-MiniLM:
# 128 of them reached cosine min 0.991 with 6 Linears int8 where all 237 needed 18)
SELECTION_SAMPLES = 512


def calibrated_int4(model: nn.Module, names: Sequence[str], calibration: Sequence[InputTuple],
                    example_inputs: InputTuple, group_size: int, calibration_samples: int,
                    mixed_int8: dict | None = None) -> tuple[dict[str, IntWeight], dict]:
    """GPTQ codes for ``names`` on the first ``calibration_samples`` calibration inputs, and the
    record for the manifest. ``mixed_int8`` ({min_cosine, min_sqnr_db}): the Linears that most hurt
    the model move to int8 until it reaches that on the next calibration inputs (quant/mixed.py).
    Within a build (quant.calibrate.shared_calibration) the .pte and the .onnx, and the
    reproducibility check, share one run for the same weights, inputs and target."""
    try:
        everything = list(calibration_batches(calibration, example_inputs,
                                              calibration_samples + (SELECTION_SAMPLES if mixed_int8 else 0)))
    except ValueError as exc:
        raise ExportError(f"int4-weight gptq: {exc}", "give calibration inputs shaped like the example inputs, "
                                                      "or set weight_algorithm: rtn") from exc
    samples, selection = everything[:calibration_samples], everything[calibration_samples:]
    if not samples:
        raise ExportError("int4-weight gptq: the spec gives no calibration samples",
                          "give the spec calibration inputs, or set weight_algorithm: rtn (no calibration)")
    names = sorted(names)
    target = (float(mixed_int8["min_cosine"]), float(mixed_int8["min_sqnr_db"])) if mixed_int8 else None
    key = ("gptq", weights_digest(model), inputs_digest(everything), group_size, tuple(names), target)

    def compute() -> tuple[dict[str, IntWeight], dict | None]:
        weights = gptq_model(model, names, samples, group_size)
        if target is None:
            return weights, None
        chosen, record = choose_int8(model, weights, selection or samples,
                                     min_cosine=target[0], min_sqnr_db=target[1])
        record["selection_samples"] = len(selection or samples)
        record["selection"] = ("calibration samples after GPTQ's" if selection else
                               "GPTQ's own calibration samples (the spec gives no more): optimistic")
        return chosen, record

    (weights, mixed), shared = shared_result(key, compute)
    record = {"weight_algorithm": "gptq", "calibration_samples": len(samples), "damping": DAMPING,
              "act_order": True, "static_groups": True,
              "group_scales": "per group, amax*f/d (f in 0.5..1, d in 7, 7.5, 8) minimising the H-diagonal-"
                              "weighted rounding error",
              "layers": len(weights)}
    if mixed is not None:
        record["mixed_int8"] = mixed
    if shared:
        record["calibration_shared"] = True
    return weights, record
