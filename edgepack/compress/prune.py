"""prune-unstructured: magnitude (L1) or random unstructured pruning, made permanent.

The zeros are written into the weights and the pruning reparametrisation is removed, so the
exported graph is a plain dense graph. Dense runtimes do not run it faster; the zeros pay
off in the zip-compressed (download) size, which the manifest records.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.utils.prune as tprune
from pydantic import Field
from torch import nn

from ..stage import StageConfig, StageContext


class PruneUnstructuredConfig(StageConfig):
    type: Literal["prune-unstructured"] = "prune-unstructured"
    amount: float = Field(gt=0.0, lt=1.0, description="fraction of weights set to zero")
    method: Literal["magnitude", "random"] = "magnitude"
    scope: Literal["global", "layer"] = "global"
    include_bias: bool = False


CONFIG = PruneUnstructuredConfig


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def run(config: PruneUnstructuredConfig, model: nn.Module, ctx: StageContext) -> tuple[nn.Module, dict]:
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("the model has no Conv/Linear layers to prune")
    targets = [(m, "weight") for _, m in layers]
    if config.include_bias:
        targets += [(m, "bias") for _, m in layers if m.bias is not None]
    if config.scope == "global":
        method = tprune.L1Unstructured if config.method == "magnitude" else tprune.RandomUnstructured
        tprune.global_unstructured(targets, pruning_method=method, amount=config.amount)
    else:
        for module, param in targets:
            if config.method == "magnitude":
                tprune.l1_unstructured(module, param, amount=config.amount)
            else:
                tprune.random_unstructured(module, param, amount=config.amount)
    for module, param in targets:
        tprune.remove(module, param)  # bake the mask into the weight; no reparametrisation left
    per_layer = {
        name: round(float((m.weight == 0).float().mean()), 4) for name, m in layers
    }
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    return model, {"sparsity": round(zeros / total, 4), "sparsity_per_layer": per_layer}


@torch.no_grad()
def weight_sparsity(model: nn.Module) -> float:
    layers = prunable_layers(model)
    total = sum(m.weight.numel() for _, m in layers)
    return sum(int((m.weight == 0).sum()) for _, m in layers) / max(total, 1)
