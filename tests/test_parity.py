"""parity.py: the top-1 check judges decisions, not near-ties; outputs can be judged only where a
mask says they mean something; the device kit computes exactly the same figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from edgepack.parity import compare, sqnr_db, top1_decisions

TEST_MODELS = Path(__file__).resolve().parent / "models"


def _scores(margins: list[float], classes: int = 10, seed: int = 0) -> list[np.ndarray]:
    """Float scores with class 0 ahead of class 1 by each margin, the rest far below."""
    rng = np.random.default_rng(seed)
    rows = []
    for margin in margins:
        row = rng.uniform(-4.0, -2.0, size=classes)
        row[0], row[1] = 5.0 + margin, 5.0
        rows.append(row)
    return rows


def test_near_tie_flips_are_counted_not_failed():
    reference = _scores([0.0005] * 4 + [3.0] * 12)
    actual = [r + np.random.default_rng(i).normal(scale=0.02, size=r.shape) for i, r in enumerate(reference)]
    for row in actual[:4]:
        row[1] = row[0] + 0.01  # the artifact picks the runner-up where the float model could not decide
    report = compare([[r] for r in reference], [[a] for a in actual], {"min_top1_agreement": 0.9}, ["y"], ["y"])
    out = report.outputs[0]
    assert report.passed and out.top1_agreement == 0.75  # a count of every flip would fail at 0.9
    assert (out.top1_decisive_samples, out.top1_decisive_flips, out.top1_near_tie_flips) == (12, 0, 4)
    assert "near-tie" in out.notes[0]


def test_a_decisive_flip_fails_even_when_overall_agreement_is_high():
    reference = _scores([3.0] * 20)
    actual = [r + 0.01 for r in reference]
    actual[7] = reference[7].copy()
    actual[7][[0, 4]] = actual[7][[4, 0]]  # a confident answer swapped for a class the float model ranked low
    report = compare([[r] for r in reference], [[a] for a in actual], {"min_top1_agreement": 0.9}, ["y"], ["y"])
    out = report.outputs[0]
    assert out.top1_agreement == 0.95 and not report.passed
    assert out.top1_decisive_flips == 1 and "decisive" in out.failures[0]


def test_top1_is_not_judged_when_too_few_samples_are_decisive():
    reference = _scores([0.001] * 10 + [3.0] * 2)
    actual = [r + np.random.default_rng(i).normal(scale=0.05, size=r.shape) for i, r in enumerate(reference)]
    out = compare([[r] for r in reference], [[a] for a in actual], {"min_top1_agreement": 0.9}, ["y"], ["y"]).outputs[0]
    assert out.passed and any("not judged" in note for note in out.notes)
    # an exact artifact could flip nothing: every sample is decisive
    assert top1_decisions(reference, reference) == {"decisive": 12, "agreement": 1.0, "flips": 0, "near_tie_flips": 0}


def test_masked_output_is_judged_on_real_positions_only():
    """An encoder's per-token output: padded positions are garbage in the artifact (and unused by
    anyone); with the attention mask they do not count."""
    rng = np.random.default_rng(1)
    masks = [np.array([[1] * 5 + [0] * 3]) for _ in range(4)]
    reference = [rng.normal(size=(1, 8, 16)) for _ in range(4)]
    actual = [r + rng.normal(scale=0.01, size=r.shape) for r in reference]
    for a in actual:
        a[0, 5:] = rng.normal(size=(3, 16))  # padding: anything
    tolerance = {"min_cosine": 0.99, "min_sqnr_db": 25.0}
    plain = compare([[r] for r in reference], [[a] for a in actual], tolerance, ["tokens"])
    masked = compare([[r] for r in reference], [[a] for a in actual], tolerance, ["tokens"],
                     masks={"tokens": ("attention_mask", masks)})
    assert not plain.passed and masked.passed
    assert masked.outputs[0].masked_by == "attention_mask" and masked.outputs[0].sqnr_db > 35


def test_sqnr_is_one_formula():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0) and sqnr_db(1.0, 0.0) == 200.0
    assert sqnr_db(0.0, 1.0) == -200.0 and sqnr_db(1.0, float("inf")) == -200.0


def _top1_profile(tmp_path: Path, **tolerance) -> Path:
    path = tmp_path / "top1.yaml"
    path.write_text(json.dumps({
        "schema_version": 1, "name": "top1-x86",
        "device": {"arch": "x86_64", "cores": 2, "threads": 1, "peak_gops": {"fp32": 100, "int8": 200},
                   "memory_gbps": 10, "ram_mb": 1024},
        "artifacts": [{"name": "model_int8", "format": "onnx", "precision": "int8"}],
        "tolerances": {"int8": {"min_top1_agreement": 0.9, **tolerance}},
        "parity": {"calibration_samples": 16, "holdout_samples": 16},
        "latency": {"warmup": 1, "runs": 20, "comparison_rounds": 2}}))
    return path


def test_a_build_with_deliberate_near_ties_passes(tmp_path):
    """tests/models/near_ties.py: int8 flips the top class on inputs where the float model scores
    two classes 1e-4 apart; overall agreement ~72% would have failed a count of flips."""
    proc = run_cli("build", str(TEST_MODELS / "near_ties.py"), "--target", str(_top1_profile(tmp_path, min_cosine=0.9)),
                   "--out", str(tmp_path / "dist"), "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 0, proc.stderr
    output = json.loads(proc.stdout)["artifacts"][0]["parity"]["outputs"][0]
    assert output["top1_agreement"] < 0.9 and output["top1_near_tie_flips"] > 0
    assert output["top1_decisive_flips"] == 0 and output["top1_decisive_samples"] >= 16


def test_a_build_with_a_decisive_flip_fails(tmp_path):
    """The same model calibrated on zeros: its int8 ranges are meaningless and it changes confident
    answers. Judged by top-1 alone, the build fails on the decisive flips."""
    spec = tmp_path / "zeros.py"
    spec.write_text("import sys, torch\n"
                    f"sys.path.insert(0, {str(TEST_MODELS)!r})\n"
                    "import near_ties\n\n\n"
                    "def spec():\n"
                    "    base = near_ties.spec()\n"
                    "    base.name = 'near-ties-zeros'\n"
                    "    base.calibration = [(torch.zeros(1, 8),)] * 8\n"
                    "    return base\n")
    proc = run_cli("build", str(spec), "--target", str(_top1_profile(tmp_path)), "--out", str(tmp_path / "dist"),
                   "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 1, proc.stderr
    output = json.loads(proc.stdout)["artifacts"][0]["parity"]["outputs"][0]
    assert output["top1_decisive_flips"] > 0 and "decisive sample" in output["failures"][0]


def test_a_masked_output_is_judged_the_same_way_by_build_validate_and_the_device_kit(tmp_path):
    """tests/models/token_states.py marks token_states -> attention_mask: the build records it,
    and `edgepack validate` and device/validate.py apply the same mask from the bundle alone
    (identical figures; without the mask they would be computed over other positions)."""
    import subprocess
    import sys

    from edgepack.pipeline import BuildOptions, build
    from edgepack.spec import load_spec
    from edgepack.steps.validate import validate_bundle
    from edgepack.target import load_target
    from conftest import write_profile

    profile = write_profile(tmp_path, "x86-64", name="x86-masked",
                            artifacts=[{"name": "model", "format": "onnx", "precision": "fp32"}])
    result = build(load_spec(str(TEST_MODELS / "token_states.py")), load_target(str(profile)), str(profile),
                   BuildOptions(out_dir=tmp_path / "dist", check_reproducible=False, write_zip=False))
    assert result.exit_code == 0, result.messages
    built = result.manifest.artifacts[0].parity["outputs"][0]
    assert built["masked_by"] == "attention_mask"
    again = validate_bundle(result.bundle_dir).artifacts[0].parity.to_dict()["outputs"][0]
    assert again["sqnr_db"] == built["sqnr_db"] and again["cosine_min"] == built["cosine_min"]
    report = tmp_path / "device_report.json"
    proc = subprocess.run([sys.executable, str(result.bundle_dir / "device" / "validate.py"), "--bundle",
                           str(result.bundle_dir), "--runs", "2", "--warmup", "0", "--report", str(report)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    device = json.loads(report.read_text())["artifacts"][0]["parity"]["outputs"][0]
    assert device["masked_by"] == "attention_mask" and device["sqnr_db"] == pytest.approx(built["sqnr_db"])
