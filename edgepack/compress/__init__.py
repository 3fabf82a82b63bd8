"""Compression stages, one per module. Add a stage: one module here + its name below + a test."""

from __future__ import annotations

import importlib
from functools import lru_cache

from ..stage import StageEntry

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
