"""The QAT stage's hand-off to the ExecuTorch exporter: the converted quantization-aware graph.

    ctx.extras[EXTRAS_KEY] = PT2EQAT(model=<converted GraphModule>, example_inputs=<batch-1
    inputs>, recipe=<quantization dict>, float_fingerprint=<sha256 of the returned float weights>)

The qat stage (compress/qat.py) writes it; for a pte int8 artifact whose granularity equals
recipe["granularity"], the exporter calls ``pt2e_qat_for(ctx.model, ctx.extras)`` and lowers
``torch.export.export(qat.model, qat.example_inputs)`` instead of post-training quantization.
Both import this module; neither imports the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

EXTRAS_KEY = "pt2e_qat"


@dataclass(frozen=True)
class PT2EQAT:
    """What the qat stage leaves in ctx.extras for the ExecuTorch exporter."""

    model: torch.fx.GraphModule  # convert_pt2e output: float IO, int8 q/dq inside, batch dim dynamic
    example_inputs: tuple[torch.Tensor, ...]  # batch-1 inputs to torch.export it with
    recipe: dict[str, Any]  # quant.recipe.describe(..., qat=True), for the manifest
    float_fingerprint: str  # float_fingerprint() of the float model the stage returned


def float_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def pt2e_qat_for(model: nn.Module, extras: dict[str, Any]) -> PT2EQAT | None:
    """The QAT graph for ``model``, or None when no qat stage ran.

    Raises ValueError when a stage after qat changed the model (the QAT graph would then
    describe other weights than the float reference): qat must be the last weight-changing stage.
    """
    qat = extras.get(EXTRAS_KEY)
    if qat is None:
        return None
    if qat.float_fingerprint != float_fingerprint(model):
        raise ValueError("a stage after qat changed the model, so the QAT int8 graph no longer matches it; "
                         "make qat the last stage in the profile")
    return qat
