"""sparsify: N:M semi-structured sparsity (2:4 by default) on Conv and Linear weights.

In every group of M consecutive weights along the input-channel dimension (for a conv,
per output channel and kernel position), the N largest |w| are kept and the rest set to
zero; optional fine-tuning keeps the mask fixed. The zeros are written into the weights,
so the exported graph stays dense.

What runs it faster: on the runtimes edgepack targets, nothing. XNNPACK (.pte), LiteRT
CPU and onnxruntime CPU have no N:M sparse kernels for these convs/linears and compute
the zeros; torch's to_sparse_semi_structured (cuSPARSELt/CUTLASS) is CUDA-only (Ampere+).
The gain here is storage: zeros compress, so the zip-compressed download shrinks.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..stage import StageConfig, StageContext
from . import finetune
from .prune import apply_masks, layer_sparsity, prunable_layers

RUNTIME_SUPPORT = (
    "no runtime edgepack exports to exploits N:M sparsity for these layers: XNNPACK (.pte), "
    "LiteRT CPU and onnxruntime CPU run the weights dense; torch.sparse.to_sparse_semi_structured "
    "is CUDA-only. The zeros only shrink the zip-compressed (download) size.")


class SparsifyConfig(StageConfig):
    type: Literal["sparsify"] = "sparsify"
    n: int = Field(default=2, ge=1, description="weights kept in each group")
    m: int = Field(default=4, ge=2, le=32, description="group size along the input-channel dimension")
    ignore: list[str] = Field(default_factory=list, description="Conv/Linear module names left dense")
    finetune_epochs: int = Field(default=0, ge=0, le=1000)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0, description="fine-tuning learning rate (Adam)")

    @field_validator("ignore")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("ignore lists a module twice")
        return names

    @model_validator(mode="after")
    def _n_below_m(self) -> "SparsifyConfig":
        if self.n >= self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m}): N:M keeps n of every m weights")
        return self


CONFIG = SparsifyConfig


def _input_channel_last(weight: torch.Tensor) -> torch.Tensor:
    """View a Linear [out, in] or Conv [out, in, *k] weight with the input channels last."""
    return weight if weight.dim() == 2 else weight.movedim(1, -1)


@torch.no_grad()
def n_m_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the n largest |w| of each m consecutive input channels."""
    moved = _input_channel_last(weight)
    groups = moved.abs().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    mask = keep.reshape(moved.shape)
    return mask if weight.dim() == 2 else mask.movedim(-1, 1).contiguous()


@torch.no_grad()
def satisfies_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input channels has at most n nonzero weights."""
    groups = _input_channel_last(weight).reshape(-1, m)
    return bool(((groups != 0).sum(dim=1) <= n).all())


def run(config: SparsifyConfig, model: nn.Module, ctx: StageContext) -> tuple[nn.Module, dict]:
    layers = prunable_layers(model)
    unknown = sorted(set(config.ignore) - {name for name, _ in layers})
    if unknown:
        raise ValueError(f"ignore names {unknown}, which are not Conv/Linear layers of the model")
    selected, skipped = [], {}
    for name, module in layers:
        in_channels = module.weight.shape[1]
        if name in config.ignore:
            skipped[name] = "listed in ignore"
        elif getattr(module, "groups", 1) != 1:
            skipped[name] = "grouped/depthwise convolution"
        elif in_channels % config.m:
            skipped[name] = f"{in_channels} input channels are not a multiple of m={config.m}"
        else:
            selected.append((name, module))
    if not selected:
        raise ValueError(f"no Conv/Linear layer has an input-channel count divisible by m={config.m}: {skipped}")

    masks = {name: n_m_mask(module.weight, config.n, config.m) for name, module in selected}
    apply_masks(selected, masks)
    summary = finetune.train(model, ctx, stage="sparsify", epochs=config.finetune_epochs, lr=config.lr,
                             after_step=lambda _step: apply_masks(selected, masks))
    sparsity, per_layer = layer_sparsity(selected)
    overall, _ = layer_sparsity(prunable_layers(model))
    return model, {
        "pattern": f"{config.n}:{config.m}",
        "dimension": "input channels",
        "layers": [name for name, _ in selected],
        "skipped_layers": skipped,
        "sparsity_in_sparsified_layers": sparsity,
        "sparsity_per_layer": per_layer,
        "weight_sparsity": overall,
        "runtime_support": RUNTIME_SUPPORT,
        "finetune": summary,
    }
