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


# -- masks shared by the stages that prune during training (prune-gradual, sparsify) --------

Masks = dict[str, torch.Tensor]


@torch.no_grad()
def magnitude_masks(layers: list[tuple[str, nn.Module]], sparsity: float, scope: str) -> Masks:
    """Boolean keep-masks zeroing the ``sparsity`` fraction of smallest |weight|, over all
    layers together (global) or in each layer (layer). Ties at the threshold are pruned too,
    so weights already at zero stay pruned."""
    if scope == "global":
        magnitudes = torch.cat([m.weight.detach().abs().flatten() for _, m in layers])
        threshold = _kth_smallest(magnitudes, sparsity)
        return {name: m.weight.detach().abs() > threshold for name, m in layers}
    return {name: m.weight.detach().abs() > _kth_smallest(m.weight.detach().abs().flatten(), sparsity)
            for name, m in layers}


def _kth_smallest(values: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(round(fraction * values.numel()))
    if k == 0:
        return values.new_tensor(-1.0)  # keep everything
    return values.kthvalue(k).values


@torch.no_grad()
def apply_masks(layers: list[tuple[str, nn.Module]], masks: Masks) -> None:
    for name, module in layers:
        module.weight.mul_(masks[name])


@torch.no_grad()
def layer_sparsity(layers: list[tuple[str, nn.Module]]) -> tuple[float, dict[str, float]]:
    """(overall, per layer) fraction of zero weights in the layers' weight tensors."""
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    per_layer = {name: round(float((m.weight == 0).float().mean()), 4) for name, m in layers}
    return round(zeros / max(total, 1), 4), per_layer
