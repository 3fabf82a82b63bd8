"""Compression stages: a typed config per stage, a registry keyed by config type, run_stages().

A stage module (one per file under edgepack/compress/) defines a pydantic config class
with ``type: Literal["<stage-type>"]`` and a function
``run(config, model, ctx: StageContext) -> tuple[nn.Module, dict]`` returning the new model
and stage-specific details. run_stages() measures params, nonzero params, MACs and bytes
before and after every stage, and the spec's evaluate metrics when it has one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .errors import EdgepackError, StageError
from .modelstats import model_stats

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


def _measure(model: nn.Module, ctx: StageContext) -> dict[str, Any]:
    stats: dict[str, Any] = model_stats(model, ctx.example_inputs)
    if ctx.evaluate is not None:
        model.eval()
        stats["metrics"] = {k: float(v) for k, v in ctx.evaluate(torch_outputs_fn(model)).items()}
    return stats


def run_stages(model: nn.Module, configs: list[StageConfig], ctx: StageContext,
               on_stage: Callable[[str], None] | None = None) -> tuple[nn.Module, list[StageRecord]]:
    from .compress import registry

    records: list[StageRecord] = []
    current = copy.deepcopy(model).eval()
    before = _measure(current, ctx) if configs else {}
    for index, config in enumerate(configs):
        entry = registry()[config.type]
        if on_stage:
            on_stage(config.type)
        torch.manual_seed(ctx.seed + index)
        start = time.perf_counter()
        try:
            current, details = entry.run(config, current, ctx)
        except EdgepackError:
            raise
        except Exception as exc:
            raise StageError(
                f"stage {index + 1} ({config.type}) failed: {type(exc).__name__}: {exc}",
                "check the stage's parameters in the profile (run with --debug for the traceback)",
            ) from exc
        seconds = time.perf_counter() - start
        current.eval()
        after = _measure(current, ctx)
        records.append(StageRecord(name=f"{index + 1}:{config.type}", type=config.type,
                                   before=before, after=after, seconds=seconds, details=details))
        before = after
    return current, records
