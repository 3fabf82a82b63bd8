"""Numerical parity of an artifact's outputs against the float reference.

Per output: max/mean abs error, cosine similarity (per sample: mean and min), SQNR dB over
the whole parity set, and top-1 agreement for class-score outputs (shape [1, C], C >= 2).
Every threshold the profile sets for the artifact's precision must hold.

Top-1 judges decisions, not near-ties. Per sample, the artifact's error is sigma = the RMS over
classes of (artifact - float); two scores would have to move toward each other by more than
DECISIVE_SIGMAS x sigma together (2.8 standard deviations of their difference, for independent
noise) to swap. The tie band is the smaller of that and TIE_SHARE of the float scores' range
(max - min), so a broken artifact's huge error cannot excuse anything. A changed answer is a
*near-tie* when the float model scored the artifact's answer within the band of its own (it could
not tell them apart: real EfficientNet-Lite0 photo views had margins 0.0005-0.016 against logit
errors of 0.03-0.06): counted and reported, never failing. Any other changed answer is a
*decisive flip* and fails the check whenever the profile sets min_top1_agreement; a sample is
*decisive* when its float runner-up is beyond the band (or it flipped decisively), and agreement
over decisive samples must reach min_top1_agreement. With fewer decisive samples than
MIN_DECISIVE (and MIN_DECISIVE_SHARE of the set) and no decisive flip, top-1 is not judged and the
report says so.

An output can be judged only where it means something: ``masks`` (per output, one array per
sample, e.g. an encoder's attention mask for its per-token output) selects the positions that
count; padded positions are left out of every figure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

SQNR_CAP_DB = 200.0  # identical outputs: report a finite number so the manifest stays valid JSON
DECISIVE_SIGMAS = 4.0  # a float margin above this many per-sample error RMS makes a decision decisive
MIN_DECISIVE = 4  # fewer decisive samples than this (or than MIN_DECISIVE_SHARE of them): top-1 is not judged
MIN_DECISIVE_SHARE = 0.25
TIE_SHARE = 0.1  # ... and a near-tie is within this share of the float scores' range (max - min)


@dataclass
class OutputParity:
    name: str
    max_abs_error: float
    mean_abs_error: float
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    top1_agreement: float | None  # over every sample, near-ties included (for information)
    allclose_violations: int | None
    passed: bool
    failures: list[str] = field(default_factory=list)
    # top-1 on decisive samples (see the module docstring); None without class scores
    top1_decisive_samples: int | None = None
    top1_decisive_agreement: float | None = None
    top1_decisive_flips: int | None = None
    top1_near_tie_flips: int | None = None
    notes: list[str] = field(default_factory=list)
    masked_by: str | None = None  # the input whose nonzero positions were compared


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
                if o.top1_decisive_samples is not None:
                    bits.append(f"{o.top1_decisive_samples} decisive, {o.top1_near_tie_flips} near-tie flip(s)")
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


def top1_decisions(ref: list[np.ndarray], out: list[np.ndarray]) -> dict:
    """Top-1 agreement judged per decision (module docstring of edgepack/parity.py): with sigma the
    RMS of the artifact's error on a sample and band = DECISIVE_SIGMAS x sigma, a change of answer
    is a near-tie when the float model scored the artifact's answer within band of its own, and a
    decisive flip otherwise; a sample whose float runner-up is beyond band is decisive."""
    decisive = agree = flips = near = 0
    for r, a in zip(ref, out):
        top, choice = int(np.argmax(r)), int(np.argmax(a))
        # a tie: within what the error could flip, and a small part of the float scores' spread
        band = min(DECISIVE_SIGMAS * float(np.sqrt(np.mean((a - r) ** 2))), TIE_SHARE * float(np.ptp(r)))
        runner_up = float(np.sort(r)[-2])
        if choice != top and float(r[top] - r[choice]) > band:
            decisive += 1
            flips += 1
        elif float(r[top]) - runner_up > band:
            decisive += 1
            agree += 1
        elif choice != top:
            near += 1
    return {"decisive": decisive, "agreement": agree / decisive if decisive else None, "flips": flips,
            "near_tie_flips": near}


def _select(values: list[np.ndarray], masks: list[np.ndarray] | None) -> list[np.ndarray]:
    """Each sample's values where its mask is nonzero (the mask's shape leads the value's)."""
    if masks is None:
        return [np.asarray(v, dtype=np.float64).ravel() for v in values]
    picked = []
    for value, mask in zip(values, masks):
        value, mask = np.asarray(value, dtype=np.float64), np.asarray(mask) != 0
        if value.shape[:mask.ndim] != mask.shape:
            raise ValueError(f"mask of shape {mask.shape} does not lead output of shape {value.shape}")
        picked.append(value[mask].ravel())
    return picked


def compare_output(name: str, reference: list[np.ndarray], actual: list[np.ndarray], tolerance: dict,
                   scores: bool | None = None, masks: list[np.ndarray] | None = None,
                   masked_by: str | None = None) -> OutputParity:
    """scores: whether the output holds class scores (None: decide from its shape).
    masks: per sample, the positions that count (e.g. real tokens), named ``masked_by``."""
    for r, a in zip(reference, actual):
        if np.shape(r) != np.shape(a):
            return OutputParity(name, math.inf, math.inf, 0.0, 0.0, -SQNR_CAP_DB, None, None, False,
                                [f"shape {np.shape(a)} differs from reference {np.shape(r)}"])
    ref, out = _select(reference, masks), _select(actual, masks)
    ref_all, out_all = np.concatenate(ref), np.concatenate(out)
    err = out_all - ref_all
    finite = bool(np.isfinite(out_all).all())
    max_abs = float(np.max(np.abs(err))) if finite and err.size else (0.0 if finite else math.inf)
    mean_abs = float(np.mean(np.abs(err))) if finite and err.size else (0.0 if finite else math.inf)
    cosines = [_cosine(r, a) for r, a in zip(ref, out)] if finite else [0.0]
    signal_power, noise_power = float(np.sum(ref_all**2)), float(np.sum(err**2)) if finite else math.inf
    sqnr = sqnr_db(signal_power, noise_power)
    top1, decisions = None, None
    if scores is None:
        scores = is_class_scores(np.asarray(reference[0]).shape, np.asarray(reference[0]).dtype) and masks is None
    if scores:
        top1 = float(np.mean([int(np.argmax(r) == np.argmax(a)) for r, a in zip(ref, out)]))
        decisions = top1_decisions(ref, out) if finite else {"decisive": 0, "agreement": None, "flips": 0,
                                                             "near_tie_flips": 0}
    violations = None
    failures: list[str] = []
    notes: list[str] = []
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
    threshold = tolerance.get("min_top1_agreement")
    if decisions is not None:
        if decisions["near_tie_flips"]:
            notes.append(f"top-1 changed on {decisions['near_tie_flips']} near-tie sample(s) where the float model "
                         f"scored both answers within the tie band (not a failure)")
        if threshold is not None and finite:
            needed = max(MIN_DECISIVE, math.ceil(MIN_DECISIVE_SHARE * len(ref)))
            if decisions["decisive"] < needed and not decisions["flips"]:
                notes.append(f"top-1 not judged: only {decisions['decisive']} of {len(ref)} sample(s) were decisive "
                             f"(at least {needed} needed): the artifact's error is as large as the float model's "
                             f"margins, or the samples are ones the model is unsure about")
            elif decisions["flips"]:
                failures.append(f"top-1 changed on {decisions['flips']} of {decisions['decisive']} decisive sample(s) "
                                f"(the float model ranked the artifact's answer clearly lower: beyond the tie band)")
            elif decisions["agreement"] < threshold:
                failures.append(f"top-1 agreement on decisive samples {decisions['agreement']:.3f} < {threshold}")
    return OutputParity(
        name=name, max_abs_error=max_abs, mean_abs_error=mean_abs,
        cosine_mean=float(np.mean(cosines)), cosine_min=float(np.min(cosines)), sqnr_db=float(sqnr),
        top1_agreement=top1, allclose_violations=violations, passed=not failures, failures=failures,
        top1_decisive_samples=None if decisions is None else decisions["decisive"],
        top1_decisive_agreement=None if decisions is None else decisions["agreement"],
        top1_decisive_flips=None if decisions is None else decisions["flips"],
        top1_near_tie_flips=None if decisions is None else decisions["near_tie_flips"],
        notes=notes, masked_by=masked_by,
    )


def compare(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]], tolerance: dict,
            output_names: list[str], score_outputs: list[str] | None = None,
            masks: dict[str, tuple[str, list[np.ndarray]]] | None = None) -> ParityReport:
    """reference/actual: per sample, a list of outputs (model-level, float).
    score_outputs: names of class-score outputs (None: decide from each output's shape).
    masks: output name -> (input name, per-sample mask arrays) for outputs judged only where the
    mask is nonzero (e.g. real tokens of a padded sequence)."""
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
        masked_by, sample_masks = (masks or {}).get(name, (None, None))
        results.append(compare_output(name, [s[index] for s in reference], [s[index] for s in actual], tolerance,
                                      scores, sample_masks, masked_by))
    thresholds = {k: v for k, v in tolerance.items() if v is not None}
    return ParityReport(passed=all(r.passed for r in results), samples=len(reference), thresholds=thresholds,
                        outputs=results)
