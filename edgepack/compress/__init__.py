"""Compression stages, one per module. Add a stage: one module here + its name below + a test.

run_stages() runs a profile's stages in order, each on the previous one's output, and records
what each changed (StageRecord)."""

from __future__ import annotations

import copy
import importlib
import time
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from ..errors import EdgepackError, StageError
from ..modelstats import model_stats
from ..stage import StageConfig, StageContext, StageEntry, StageRecord, torch_outputs_fn

# Module names under edgepack.compress that define a stage (CONFIG class and run()).
STAGE_MODULES: tuple[str, ...] = (
    "prune",
    "structured",
    "sparsify",
    "distill",
    "gradual",
    "qat",
    "equalize",
)


@lru_cache(maxsize=1)
def registry() -> dict[str, StageEntry]:
    entries: dict[str, StageEntry] = {}
    for module_name in STAGE_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        config_cls = module.CONFIG
        stage_type = config_cls.model_fields["type"].default
        if stage_type in entries:
            raise RuntimeError(f"stage type {stage_type!r} registered twice (compress/{module_name}.py)")
        entries[stage_type] = StageEntry(type=stage_type, config=config_cls, run=module.run)
    return entries


def _measure(model: nn.Module, ctx: StageContext) -> dict[str, Any]:
    stats: dict[str, Any] = model_stats(model, ctx.example_inputs)
    if ctx.evaluate is not None:
        model.eval()
        stats["metrics"] = {k: float(v) for k, v in ctx.evaluate(torch_outputs_fn(model)).items()}
    return stats


def run_stages(model: nn.Module, configs: list[StageConfig], ctx: StageContext,
               on_stage: Callable[[str], None] | None = None) -> tuple[nn.Module, list[StageRecord]]:
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
