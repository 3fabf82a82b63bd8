"""Automatic mixed precision: when an int8 artifact fails parity, keep the layers the
diagnosis ranks most harmful in fp32, one group per step, re-exporting and re-validating,
until parity passes or a budget would be exceeded.

    ranked = rank_layers(config, ctx.model, ctx.example_inputs, ctx.calibration)   # analysis/diagnose.py
    result = fallback_search(ranked.groups, try_export, settings=..., budgets=profile.budgets,
                             initial=<the failed step>, why=ranked.why)

``try_export(float_layers) -> FallbackStep`` is the caller's: export the artifact with
``with_float_layers(config, float_layers)``, validate it in its runtime, and report parity,
bytes and latency. The search itself knows nothing about formats or runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..parity import headline
from ..quant.recipe import recipe_for
from ..target import Budgets, FallbackSettings
from .diagnose import diagnose_pt2e


@dataclass
class FallbackStep:
    """One export + validation with ``float_layers`` kept fp32."""

    float_layers: list[str]
    passed: bool  # parity passed
    bytes: int
    latency_ms: float | None = None
    parity: dict[str, Any] = field(default_factory=dict)  # headline figures, e.g. cosine_min, sqnr_db, top1
    added: list[str] = field(default_factory=list)  # the layers this step moved to fp32
    budget_failures: list[str] = field(default_factory=list)
    artifact: Any = None  # the caller's result for this step (e.g. an ArtifactEntry); not serialized

    def to_dict(self) -> dict[str, Any]:
        return {"float_layers": list(self.float_layers), "added": list(self.added), "passed": self.passed,
                "bytes": self.bytes, "latency_ms": self.latency_ms, "parity": dict(self.parity),
                "budget_failures": list(self.budget_failures)}


@dataclass
class FallbackResult:
    passed: bool
    float_layers: list[str]
    reason: str  # why the search stopped
    steps: list[FallbackStep]
    ranked_layers: list[str]
    why: dict[str, str] = field(default_factory=dict)  # layer -> why it was a candidate (diagnosis figures)

    @property
    def final(self) -> FallbackStep | None:
        """The step whose artifact to keep: the passing one, else the last within budget."""
        within = [s for s in self.steps if not s.budget_failures]
        return within[-1] if within else None

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "float_layers": list(self.float_layers), "reason": self.reason,
                "kept_float": {name: self.why.get(name, "") for name in self.float_layers},
                "steps": [s.to_dict() for s in self.steps], "ranked_layers": list(self.ranked_layers)}


def budget_failures(step: FallbackStep, budgets: Budgets | None) -> list[str]:
    """What a step's bytes/latency exceed in ``budgets`` (the profile's one budget rule)."""
    return budgets.failures(step.bytes, step.latency_ms) if budgets is not None else []


def fallback_search(ranked_layers: Sequence[str | Sequence[str]], try_export: Callable[[list[str]], FallbackStep], *,
                    settings: FallbackSettings | None = None, budgets: Budgets | None = None,
                    initial: FallbackStep | None = None, why: dict[str, str] | None = None) -> FallbackResult:
    """Keep ``settings.group_size`` more groups of the most harmful layers in fp32 per step
    until parity passes.

    ``ranked_layers``: module names or groups of them (the diagnosis' float_groups: a layer
    whose output activation is the problem comes with the layers reading it), most harmful
    first. Stops, failing, when a step exceeds a budget (bytes or latency: more float layers
    only grow both), when ``max_steps`` or ``max_float_layers`` is reached, or when the
    ranking is exhausted. ``initial`` is the already measured all-int8 step, if any.
    """
    settings = settings or FallbackSettings()
    groups: list[list[str]] = []
    for entry in ranked_layers:
        group = [entry] if isinstance(entry, str) else list(entry)
        if group:
            groups.append(group)
    ranked = list(dict.fromkeys(name for group in groups for name in group))  # unique, order kept
    steps: list[FallbackStep] = []
    current: list[str] = []
    if initial is not None:
        initial.budget_failures = budget_failures(initial, budgets)
        steps.append(initial)
        current = list(initial.float_layers)
        if initial.passed and not initial.budget_failures:
            return FallbackResult(True, current, "parity passed without fallback", steps, ranked, dict(why or {}))
    reason = f"max_steps ({settings.max_steps}) reached without passing parity"
    passed = False
    for _ in range(settings.max_steps):
        remaining = [[n for n in g if n not in current] for g in groups]
        remaining = [g for g in remaining if g]
        if not remaining:
            reason = "every ranked layer is already fp32 and parity still fails"
            break
        group = list(dict.fromkeys(n for g in remaining[: settings.group_size] for n in g))
        if settings.max_float_layers is not None and len(current) + len(group) > settings.max_float_layers:
            room = settings.max_float_layers - len(current)
            if room <= 0:
                reason = f"max_float_layers ({settings.max_float_layers}) reached without passing parity"
                break
            group = group[:room]
        candidate = current + group
        step = try_export(list(candidate))
        step.float_layers, step.added = list(candidate), list(group)
        step.budget_failures = budget_failures(step, budgets)
        steps.append(step)
        if step.budget_failures:
            reason = "a budget would be exceeded: " + "; ".join(step.budget_failures)
            break
        current = candidate
        if step.passed:
            passed, reason = True, f"parity passed with {len(current)} layer(s) in fp32"
            break
    return FallbackResult(passed, current, reason, steps, ranked, dict(why or {}))


@dataclass
class Ranking:
    groups: list[list[str]]  # module-name groups, most harmful first (pass to fallback_search)
    why: dict[str, str]
    report: dict[str, Any]  # the full diagnosis

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(name for group in self.groups for name in group))


def rank_layers(config: Any, model: Any, example_inputs: tuple, calibration: Sequence[tuple],
                samples: int = 4) -> Ranking:
    """Rank the model's layers for ``config``'s int8 recipe (analysis/diagnose.py, PT2E emulation).

    Layers already in config.float_layers are left out. A .pte config is diagnosed with the
    XNNPACK quantizer, a .tflite one with litert-torch's (XNNPACK's rules where they place the
    same observers, as its export does: quant/calibrate.py resolve_annotation), both with the
    config's own recipe.
    """
    recipe = recipe_for(config)
    report = diagnose_pt2e(model, example_inputs, calibration, recipe, samples)
    already = set(recipe.float_layers)
    groups, why = [], {}
    for group, reason in zip(report["float_groups"], report["float_group_reasons"]):
        group = [name for name in group if name not in already]
        if group:
            groups.append(group)
            why.update({name: reason for name in group})
    return Ranking(groups, why, report)


def with_float_layers(config: Any, float_layers: Sequence[str]) -> Any:
    """A validated copy of an artifact config with ``float_layers`` added to its own."""
    merged = list(dict.fromkeys([*getattr(config, "float_layers", ()), *float_layers]))
    return type(config).model_validate({**config.model_dump(), "float_layers": merged})


def supports_fallback(config: Any) -> bool:
    """Whether an artifact config can keep layers in fp32 (static int8 with a PT2E recipe)."""
    if getattr(config, "precision", None) != "int8" or "float_layers" not in type(config).model_fields:
        return False
    return getattr(config, "resolved_quantizer", "pt2e") in ("pt2e", None)


def run_fallback(config: Any, ctx: Any, build: Callable[[Any], FallbackStep], *,
                 settings: FallbackSettings | None = None, budgets: Budgets | None = None,
                 initial: FallbackStep | None = None) -> FallbackResult:
    """The whole fallback for one artifact: rank its layers (diagnosis with its own recipe),
    then fallback_search, calling ``build(config_with_float_layers) -> FallbackStep`` (export
    + validate + parity/bytes/latency) per step. ``ctx`` is the ExportContext."""
    settings = settings or FallbackSettings()
    ranking = rank_layers(config, ctx.model, tuple(ctx.example_inputs), list(ctx.calibration),
                          samples=settings.diagnosis_samples)
    return fallback_search(ranking.groups, lambda layers: build(with_float_layers(config, layers)),
                           settings=settings, budgets=budgets, initial=initial, why=ranking.why)


def try_record(entry: Any) -> dict[str, Any]:
    """One try of an artifact, for a fallback record: what it was, what it measured, why it failed."""
    if entry.status == "failed":
        failures = [entry.error or "failed"]
    elif entry.status == "budget-exceeded":
        failures = list((entry.budgets or {}).get("failures") or [])
    else:
        failures = [f for output in (entry.parity or {}).get("outputs", []) for f in output.get("failures", [])]
    return {"precision": entry.precision, "config": entry.config, "status": entry.status, "bytes": entry.bytes,
            "ratio_to_float": (entry.size or {}).get("ratio_to_float"),
            "latency_ms": (entry.latency or {}).get("p50_ms"), "parity": headline(entry.parity),
            "accuracy": entry.accuracy, "failures": failures}
