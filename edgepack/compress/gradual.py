"""prune-gradual: magnitude pruning on the cubic schedule of Zhu & Gupta (2017), during training.

"To prune, or not to prune" (arXiv:1710.01878): starting at optimizer step t0 and every
dt steps for n updates, the sparsity target is

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,   t in {t0, t0 + dt, ..., t0 + n*dt}

so it rises fast while the network has many redundant weights and slowly near s_f. At each
update the smallest-|w| weights of the Conv/Linear layers (over all of them, or per layer)
are masked; the masks are re-applied after every optimizer step so pruned weights stay
zero, and the steps after the last update fine-tune at s_f. At the end the zeros are simply
in the weights: no mask or reparametrisation is left in the model.

dt (``frequency``) may be given in steps; by default the n updates are spread over the first
``schedule_fraction`` (half) of the training steps, so one profile fits any dataset size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..stage import StageConfig, StageContext
from . import finetune
from .prune import apply_masks, layer_sparsity, magnitude_masks, prunable_layers


class PruneGradualConfig(StageConfig):
    type: Literal["prune-gradual"] = "prune-gradual"
    final_sparsity: float = Field(gt=0.0, lt=1.0, description="s_f: fraction of Conv/Linear weights zeroed at the end")
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0, description="s_i at the first update")
    epochs: int = Field(ge=1, le=1000, description="training epochs in total: the schedule, then recovery at s_f")
    prune_steps: int = Field(default=10, ge=1, le=100_000, description="n: pruning updates after the first")
    frequency: int | None = Field(default=None, ge=1, description="dt: optimizer steps between updates "
                                  "(default: spread the updates over schedule_fraction of training)")
    schedule_fraction: float = Field(default=0.5, gt=0.0, le=1.0,
                                     description="without frequency: fraction of the training steps the schedule spans")
    begin_step: int = Field(default=0, ge=0, description="t0: optimizer step of the first update")
    scope: Literal["global", "layer"] = "global"
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="learning rate (Adam)")

    @model_validator(mode="after")
    def _consistent(self) -> "PruneGradualConfig":
        if self.initial_sparsity >= self.final_sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must be below "
                             f"final_sparsity ({self.final_sparsity})")
        if self.frequency is not None and self.schedule_fraction != 0.5:
            raise ValueError("set frequency (steps between updates) or schedule_fraction, not both")
        return self


@dataclass(frozen=True)
class Schedule:
    """The cubic schedule in optimizer steps: updates at t0, t0 + dt, ..., t0 + n*dt."""

    initial: float
    final: float
    begin: int
    frequency: int
    steps: int

    @property
    def end(self) -> int:
        return self.begin + self.steps * self.frequency

    def sparsity_at(self, step: int) -> float:
        """s_t; s_i before t0 and s_f after the last update."""
        progress = min(max((step - self.begin) / (self.steps * self.frequency), 0.0), 1.0)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def update_steps(self) -> list[int]:
        return [self.begin + k * self.frequency for k in range(self.steps + 1)]


def schedule_for(config: "PruneGradualConfig", total_steps: int) -> Schedule:
    """Resolve dt against the run's step count; ValueError when the schedule cannot fit."""
    frequency = config.frequency
    if frequency is None:
        frequency = int(config.schedule_fraction * total_steps - config.begin_step) // config.prune_steps
        if frequency < 1:
            raise ValueError(
                f"prune_steps {config.prune_steps} updates do not fit in schedule_fraction "
                f"{config.schedule_fraction} of the {total_steps} optimizer steps (after begin_step "
                f"{config.begin_step}); raise epochs or lower prune_steps")
    schedule = Schedule(config.initial_sparsity, config.final_sparsity, config.begin_step, frequency,
                        config.prune_steps)
    if schedule.end > total_steps:
        raise ValueError(
            f"the schedule's last update is at step begin_step + prune_steps*frequency = {schedule.end}, "
            f"after the {total_steps} optimizer steps of {config.epochs} epochs; raise epochs or lower "
            "prune_steps / frequency / begin_step")
    return schedule


CONFIG = PruneGradualConfig


def run(config: PruneGradualConfig, model: nn.Module, ctx: StageContext) -> tuple[nn.Module, dict]:
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("the model has no Conv/Linear layers to prune")
    data = finetune.require_train_data(ctx, "prune-gradual")
    steps_per_epoch = finetune.batches_per_epoch(data)
    total_steps = config.epochs * steps_per_epoch
    schedule = schedule_for(config, total_steps)

    updates = set(schedule.update_steps())
    history: list[list[float]] = []
    masks = {name: module.weight.detach().new_ones(module.weight.shape, dtype=torch.bool) for name, module in layers}

    def update(step: int) -> None:
        if step in updates:
            target = schedule.sparsity_at(step)
            masks.update(magnitude_masks(layers, target, config.scope))
            history.append([step, round(target, 4)])
        apply_masks(layers, masks)

    update(0)  # with t0 = 0 the first update (to s_i) comes before the first optimizer step
    summary = finetune.train(model, ctx, stage="prune-gradual", epochs=config.epochs, lr=config.lr,
                             after_step=update, steps_per_epoch=steps_per_epoch)
    sparsity, per_layer = layer_sparsity(layers)
    return model, {
        "schedule": "cubic (Zhu & Gupta 2017)",
        "scope": config.scope,
        "initial_sparsity": config.initial_sparsity,
        "final_sparsity": config.final_sparsity,
        "frequency": schedule.frequency,
        "sparsity": sparsity,
        "sparsity_per_layer": per_layer,
        "updates": history,
        "recovery_steps": total_steps - schedule.end,
        "training": summary,
    }
