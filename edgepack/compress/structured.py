"""prune-structured: remove whole channels/filters with Torch-Pruning, then optionally fine-tune.

Torch-Pruning traces the model into a dependency graph, so removing output channels of one
layer also removes the matching input channels of every layer that consumes them (through
flatten, concatenation, residual adds, batch norm). The result is a smaller dense model:
fewer parameters and MACs on every runtime, no sparse kernels needed.

Importance of a channel group: l1 / l2 norm of its weights, or first-order Taylor
|w * dL/dw| with gradients from ``taylor_batches`` batches of the spec's train_data.
The layers that produce the model's outputs are never pruned (that would change the
output shape); ``ignore: first-last`` also keeps the first layer and the last one run.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..stage import StageConfig, StageContext
from . import finetune

_ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
IGNORE_PRESETS = ("first-last", "none")


class PruneStructuredConfig(StageConfig):
    type: Literal["prune-structured"] = "prune-structured"
    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of channels removed (per layer, or overall for global)")
    importance: Literal["l1", "l2", "taylor"] = "l1"
    scope: Literal["global", "layer"] = "layer"
    ignore: str | list[str] = Field(
        default="first-last", description="layers whose output channels are kept: first-last, none, or module names")
    max_layer_ratio: float = Field(default=0.9, gt=0.0, lt=1.0,
                                   description="global scope: most channels removed from any one layer")
    round_to: int | None = Field(default=None, ge=1, description="keep channel counts a multiple of this")
    taylor_batches: int = Field(default=4, ge=1, description="importance taylor: train_data batches for gradients")
    finetune_epochs: int = Field(default=0, ge=0, le=1000)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="fine-tuning learning rate (Adam)")

    @field_validator("ignore")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in IGNORE_PRESETS:
            raise ValueError(f"ignore must be one of {list(IGNORE_PRESETS)} or a list of module names, got {value!r}")
        if isinstance(value, list):
            if not value or any(not name for name in value):
                raise ValueError("ignore as a list needs at least one non-empty module name")
            if len(set(value)) != len(value):
                raise ValueError("ignore lists a module twice")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> "PruneStructuredConfig":
        if self.scope == "global" and self.max_layer_ratio < self.ratio:
            raise ValueError(f"max_layer_ratio ({self.max_layer_ratio}) must be >= ratio ({self.ratio}) "
                             "with scope global")
        if self.taylor_batches != 4 and self.importance != "taylor":
            raise ValueError("taylor_batches only applies to importance taylor")
        return self


CONFIG = PruneStructuredConfig


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def _execution_order(model: nn.Module, example_inputs: tuple) -> tuple[list[str], set[str]]:
    """Names of Conv/Linear layers in the order they run, and those whose output is a model output."""
    order: list[str] = []
    produced: list[tuple[Any, str]] = []  # holding the tensors keeps `is` comparisons sound
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, _ROOT_TYPES):
            def hook(_module, _inputs, output, name=name):
                if name not in order:
                    order.append(name)
                produced.append((output, name))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            outputs = finetune.as_outputs(model(*example_inputs))
    finally:
        for handle in hooks:
            handle.remove()
    return order, {name for tensor, name in produced if any(tensor is o for o in outputs)}


def _ignored(config: PruneStructuredConfig, model: nn.Module, example_inputs: tuple) -> list[str]:
    order, output_layers = _execution_order(model, example_inputs)
    if not order:
        raise ValueError("the model has no Conv/Linear layers to prune")
    keep = set(output_layers)
    if config.ignore == "first-last":
        keep |= {order[0], order[-1]}
    elif isinstance(config.ignore, list):
        unknown = sorted(set(config.ignore) - set(order))
        if unknown:
            raise ValueError(f"ignore names {unknown}, which are not Conv/Linear layers of the model "
                             f"(its layers: {order})")
        keep |= set(config.ignore)
    return [name for name in order if name in keep]


def _channels(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = (module.in_features, module.out_features)
        elif isinstance(module, _ROOT_TYPES):
            out[name] = (module.in_channels, module.out_channels)
    return out


def _accumulate_taylor_gradients(model: nn.Module, ctx: StageContext, batches: int) -> int:
    data = finetune.require_train_data(ctx, "prune-structured (importance taylor)")
    loss_of_outputs = finetune.task_loss(ctx)
    model.zero_grad(set_to_none=True)
    used = 0
    for inputs, target in data:
        if used == batches:
            break
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        loss_of_outputs(finetune.as_outputs(model(*inputs)), target).backward()
        used += 1
    if used == 0:
        raise ValueError("importance taylor needs gradients and train_data yielded no batches")
    return used


def run(config: PruneStructuredConfig, model: nn.Module, ctx: StageContext) -> tuple[nn.Module, dict]:
    import torch_pruning as tp

    example = tuple(ctx.example_inputs)
    with torch.no_grad():
        shapes_before = [o.shape for o in finetune.as_outputs(model(*example))]
    ignored_names = _ignored(config, model, example)
    modules = dict(model.named_modules())
    before = _channels(model)
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            model, example, importance=_importance(config.importance),
            global_pruning=config.scope == "global", pruning_ratio=config.ratio,
            max_pruning_ratio=config.max_layer_ratio, round_to=config.round_to,
            ignored_layers=[modules[name] for name in ignored_names],
            forward_fn=lambda net, inputs: net(*inputs))
        taylor_batches = 0
        if config.importance == "taylor":
            taylor_batches = _accumulate_taylor_gradients(model, ctx, config.taylor_batches)
        pruner.step()
    model.zero_grad(set_to_none=True)
    model.eval()

    with torch.no_grad():
        shapes_after = [o.shape for o in finetune.as_outputs(model(*example))]
    if shapes_after != shapes_before:
        raise ValueError(f"pruning changed the output shapes {shapes_before} -> {shapes_after}; "
                         "add the layer that produces the output to ignore")
    after = _channels(model)
    channels = {name: {"in": [before[name][0], after[name][0]], "out": [before[name][1], after[name][1]]}
                for name in before}
    removed = sum(before[name][1] - after[name][1] for name in before)
    if removed == 0:
        raise ValueError("no channel was removed: every prunable layer is ignored or too small for "
                         f"ratio {config.ratio}")
    details: dict[str, Any] = {
        "importance": config.importance,
        "scope": config.scope,
        "ratio": config.ratio,
        "ignored_layers": ignored_names,
        "output_channels_removed": removed,
        "output_channels_before": sum(b[1] for b in before.values()),
        "channels": channels,
    }
    if taylor_batches:
        details["taylor_batches"] = taylor_batches
    details["finetune"] = finetune.train(model, ctx, stage="prune-structured",
                                         epochs=config.finetune_epochs, lr=config.lr)
    return model, details
