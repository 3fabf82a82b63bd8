"""Numerical parity of an artifact's outputs against the float reference.

Per output: max/mean abs error, cosine similarity (per sample: mean and min), SQNR dB over
the whole parity set, and top-1 agreement for class-score outputs (shape [1, C], C >= 2).
Every threshold the profile sets for the artifact's precision must hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

SQNR_CAP_DB = 200.0  # identical outputs: report a finite number so the manifest stays valid JSON


@dataclass
class OutputParity:
    name: str
    max_abs_error: float
    mean_abs_error: float
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    top1_agreement: float | None
    allclose_violations: int | None
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class ParityReport:
    passed: bool
    samples: int
    thresholds: dict
    outputs: list[OutputParity]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "samples": self.samples, "thresholds": self.thresholds,
                "outputs": [asdict(o) for o in self.outputs]}

    def summary(self) -> str:
        parts = []
        for o in self.outputs:
            bits = [f"cos {o.cosine_mean:.5f} (min {o.cosine_min:.5f})", f"SQNR {o.sqnr_db:.1f} dB",
                    f"max|err| {o.max_abs_error:.3g}"]
            if o.top1_agreement is not None:
                bits.append(f"top-1 {o.top1_agreement:.1%}")
            parts.append(f"{o.name}: " + ", ".join(bits) + ("" if o.passed else "  FAILED: " + "; ".join(o.failures)))
        return "\n".join(parts)


def headline(parity: dict | None) -> dict[str, float | None]:
    """The worst output's cosine min, SQNR and top-1 agreement of a ParityReport.to_dict()
    (top-1 None without class-score outputs; empty without outputs)."""
    outputs = (parity or {}).get("outputs") or []
    if not outputs:
        return {}
    tops = [o["top1_agreement"] for o in outputs if o.get("top1_agreement") is not None]
    return {"cosine_min": min(o["cosine_min"] for o in outputs), "sqnr_db": min(o["sqnr_db"] for o in outputs),
            "top1_agreement": min(tops) if tops else None}


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise), capped at +-SQNR_CAP_DB: the one SQNR formula of the host side
    (parity, diagnosis, QDQ profile). Identical outputs give the cap; a zero or unusable
    signal, or a non-finite noise, gives -cap."""
    if noise_power == 0.0:
        return SQNR_CAP_DB
    if signal_power <= 0.0 or not math.isfinite(noise_power):
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal_power / noise_power)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def is_class_scores(shape: tuple[int, ...], dtype) -> bool:
    return len(shape) == 2 and shape[0] == 1 and shape[1] >= 2 and np.issubdtype(dtype, np.floating)


def compare_output(name: str, reference: list[np.ndarray], actual: list[np.ndarray], tolerance: dict,
                   scores: bool | None = None) -> OutputParity:
    """scores: whether the output holds class scores (None: decide from its shape)."""
    ref = [np.asarray(r, dtype=np.float64).ravel() for r in reference]
    out = [np.asarray(a, dtype=np.float64).ravel() for a in actual]
    for r, a in zip(ref, out):
        if r.shape != a.shape:
            return OutputParity(name, math.inf, math.inf, 0.0, 0.0, -SQNR_CAP_DB, None, None, False,
                                [f"shape {a.shape} differs from reference {r.shape}"])
    ref_all, out_all = np.concatenate(ref), np.concatenate(out)
    err = out_all - ref_all
    finite = bool(np.isfinite(out_all).all())
    max_abs = float(np.max(np.abs(err))) if finite and err.size else (0.0 if finite else math.inf)
    mean_abs = float(np.mean(np.abs(err))) if finite and err.size else (0.0 if finite else math.inf)
    cosines = [_cosine(r, a) for r, a in zip(ref, out)] if finite else [0.0]
    signal_power, noise_power = float(np.sum(ref_all**2)), float(np.sum(err**2)) if finite else math.inf
    sqnr = sqnr_db(signal_power, noise_power)
    top1 = None
    if scores is None:
        scores = is_class_scores(np.asarray(reference[0]).shape, np.asarray(reference[0]).dtype)
    if scores:
        top1 = float(np.mean([int(np.argmax(r) == np.argmax(a)) for r, a in zip(ref, out)]))
    violations = None
    failures: list[str] = []
    if not finite:
        failures.append("output contains NaN/Inf")
    atol, rtol = tolerance.get("atol"), tolerance.get("rtol")
    if atol is not None and rtol is not None:
        bound = atol + rtol * np.abs(ref_all)
        violations = int(np.sum(np.abs(err) > bound)) if finite else int(err.size)
        if violations:
            failures.append(f"{violations} value(s) outside atol={atol:g} + rtol={rtol:g}*|ref| (max|err| {max_abs:.3g})")
    if tolerance.get("min_cosine") is not None and min(cosines) < tolerance["min_cosine"]:
        failures.append(f"cosine min {min(cosines):.5f} < {tolerance['min_cosine']}")
    if tolerance.get("min_sqnr_db") is not None and sqnr < tolerance["min_sqnr_db"]:
        failures.append(f"SQNR {sqnr:.2f} dB < {tolerance['min_sqnr_db']} dB")
    if tolerance.get("min_top1_agreement") is not None and top1 is not None and top1 < tolerance["min_top1_agreement"]:
        failures.append(f"top-1 agreement {top1:.3f} < {tolerance['min_top1_agreement']}")
    return OutputParity(
        name=name, max_abs_error=max_abs, mean_abs_error=mean_abs,
        cosine_mean=float(np.mean(cosines)), cosine_min=float(np.min(cosines)), sqnr_db=float(sqnr),
        top1_agreement=top1, allclose_violations=violations, passed=not failures, failures=failures,
    )


def compare(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]], tolerance: dict,
            output_names: list[str], score_outputs: list[str] | None = None) -> ParityReport:
    """reference/actual: per sample, a list of outputs (model-level, float).
    score_outputs: names of class-score outputs (None: decide from each output's shape)."""
    if len(reference) != len(actual):
        raise ValueError("reference and actual cover different numbers of samples")
    n_outputs = len(output_names)
    results = []
    for index, name in enumerate(output_names):
        if any(len(sample) != n_outputs for sample in actual):
            results.append(OutputParity(name, math.inf, math.inf, 0.0, 0.0, -SQNR_CAP_DB, None, None, False,
                                        [f"artifact returns {len(actual[0])} outputs, reference {n_outputs}"]))
            continue
        scores = None if score_outputs is None else name in score_outputs
        results.append(compare_output(name, [s[index] for s in reference], [s[index] for s in actual], tolerance, scores))
    thresholds = {k: v for k, v in tolerance.items() if v is not None}
    return ParityReport(passed=all(r.passed for r in results), samples=len(reference), thresholds=thresholds,
                        outputs=results)
