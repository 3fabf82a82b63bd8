"""The stage contract: a typed config per stage, what a stage is given, what it reports.

A stage module (one per file under edgepack/compress/) defines a pydantic config class
with ``type: Literal["<stage-type>"]`` and a function
``run(config, model, ctx: StageContext) -> tuple[nn.Module, dict]`` returning the new model
and stage-specific details. compress.run_stages() (the registry's side) runs them in order and
measures params, nonzero params, MACs and bytes before and after every stage, and the spec's
evaluate metrics when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


InputTuple = tuple[torch.Tensor, ...]


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str


@dataclass
class StageContext:
    example_inputs: InputTuple
    calibration: list[InputTuple]
    teacher: nn.Module  # the float model as the spec gave it, never modified
    train_data: Iterable[tuple[InputTuple, torch.Tensor]] | None = None
    loss: Callable[..., torch.Tensor] | None = None
    evaluate: Callable[[Callable[[InputTuple], Any]], dict[str, float]] | None = None
    student: Callable[[], nn.Module] | None = None
    seed: int = 0
    # Stages may leave hints for exporters (for example a QAT-prepared graph).
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageRecord:
    name: str
    type: str
    before: dict[str, Any]
    after: dict[str, Any]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "before": self.before,
            "after": self.after,
            "seconds": round(self.seconds, 3),
            "details": self.details,
        }


StageFn = Callable[[Any, nn.Module, StageContext], tuple[nn.Module, dict[str, Any]]]


@dataclass(frozen=True)
class StageEntry:
    type: str
    config: type[StageConfig]
    run: StageFn


def torch_outputs_fn(model: nn.Module) -> Callable[[InputTuple], tuple[torch.Tensor, ...]]:
    def fn(inputs: InputTuple) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = model(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return fn
