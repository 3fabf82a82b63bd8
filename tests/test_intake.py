"""Bundles, zips, golden .npz files and device reports are untrusted input (edgepack/intake.py):
confined to the bundle's own tree, size- and depth-bounded, checked before they are loaded. Each
case runs against `edgepack validate`, `inspect`, `ingest` and the bundle's own device/validate.py
where it applies, and must end in a clear error with exit 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_MODELS, run_cli, write_profile
from edgepack.errors import BundleError
from edgepack.intake import (MAX_JSON_DEPTH, brief_parity, clean_device, confined, json_depth_exceeds, load_golden,
                             parse_json, printable)
from edgepack.package import seal_bundle, write_zip
from edgepack.pipeline import BuildOptions, build
from edgepack.spec import load_spec
from edgepack.target import load_target


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A sealed x86-64 bundle of the two-input, two-output test model (one fp32 .onnx)."""
    out = tmp_path_factory.mktemp("dist")
    profile = write_profile(tmp_path_factory.mktemp("profile"), "x86-64", name="x86-intake",
                            artifacts=[{"name": "model", "format": "onnx", "precision": "fp32"}],
                            budgets={"max_latency_ms": 1000.0})
    result = build(load_spec(str(TEST_MODELS / "two_io.py")), load_target(str(profile)), str(profile),
                   BuildOptions(out_dir=out, check_reproducible=False, write_zip=False))
    assert result.exit_code == 0, result.messages
    return result.bundle_dir


def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def outside(tmp_path: Path, name: str, data: bytes) -> Path:
    secret = tmp_path / "elsewhere" / name
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(data)
    return secret


def device_validate(root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "device" / "validate.py"), "--bundle", str(root), "--runs", "2",
                           "--warmup", "0", "--report", str(tmp_path / "report.json")],
                          capture_output=True, text=True, timeout=300)


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


# --- confinement ---------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["model.onnx", "golden/model.onnx.inputs.npz", "manifest.json"])
def test_a_symlink_out_of_the_bundle_is_never_followed(bundle, tmp_path, target):
    """A symlink to an exact copy outside the bundle (the checksum would match) is refused by
    every reader: nothing outside the bundle is read, nothing about it is printed."""
    root = copy(bundle, tmp_path)
    secret = outside(tmp_path, Path(target).name, (root / target).read_bytes())
    (root / target).unlink()
    (root / target).symlink_to(secret)
    for command in (["validate", str(root)], ["inspect", str(root)]):
        assert_refused(run_cli(*command), "symlink")
    assert_refused(device_validate(root, tmp_path), "symlink")
    if target == "manifest.json":
        report = tmp_path / "r.json"
        report.write_text(json.dumps({"schema_version": 1, "kind": "edgepack-device-report", "created_by": "t"}))
        assert_refused(run_cli("ingest", str(root), str(report)), "symlink")


def test_a_symlinked_folder_and_a_fifo_are_refused(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    elsewhere = Path(shutil.copytree(root / "golden", tmp_path / "golden-elsewhere"))
    shutil.rmtree(root / "golden")
    (root / "golden").symlink_to(elsewhere, target_is_directory=True)
    assert_refused(run_cli("validate", str(root)), "symlink")
    root2 = copy(bundle, tmp_path / "second")
    (root2 / "golden" / "inputs.npz").unlink()
    os.mkfifo(root2 / "golden" / "inputs.npz")  # opening it would block forever
    assert_refused(run_cli("validate", str(root2)), "not a regular file")
    assert_refused(device_validate(root2, tmp_path), "not a regular file")


def test_confined_refuses_paths_that_leave_the_bundle(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    assert confined(tmp_path, "a/f") == tmp_path / "a" / "f"
    for bad in ("/etc/passwd", "../x", "a/../a/f", "a\\f", "a/./f", "a//f", "a/f\x00", ""):
        with pytest.raises(BundleError, match="not a plain path"):
            confined(tmp_path, bad)


def test_an_artifact_file_not_among_its_checksummed_files_is_refused(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    shutil.copy(root / "model.onnx", root / "other.onnx")
    manifest["artifacts"][0]["file"] = "other.onnx"  # runs a file no checksum vouches for
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert_refused(run_cli("validate", str(root)), "not among its checksummed files")
    assert_refused(device_validate(root, tmp_path), "not checksummed")


# --- size limits and damaged golden files --------------------------------------------------

def _rewrite(path: Path, arrays: dict) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def test_a_golden_npz_declaring_gigabytes_is_refused_before_loading(bundle, tmp_path):
    """A 2 GB array header in a tiny file: refused from the header, nothing allocated."""
    root = copy(bundle, tmp_path)
    path = root / "golden" / "reference_outputs.npz"
    with zipfile.ZipFile(path, "w") as archive:
        header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 29,)}
        with archive.open("scores.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            handle.write(b"\0" * 64)
    seal_bundle(root)
    assert_refused(run_cli("validate", str(root)), "reference_outputs.npz", "declares")
    assert_refused(device_validate(root, tmp_path), "declares")


@pytest.mark.parametrize("damage", ["object-array", "bad-crc", "truncated", "wrong-shape", "zip-version"])
def test_damaged_golden_npz_is_a_bundle_error(bundle, tmp_path, damage):
    root = copy(bundle, tmp_path)
    path = root / "golden" / "model.onnx.inputs.npz"
    arrays = load_golden(path)
    if damage == "object-array":
        arrays["image"] = np.array([object()] * 3, dtype=object)
        with open(path, "wb") as handle:
            np.savez(handle, allow_pickle=True, **arrays)
    elif damage == "bad-crc":
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "zip-version":  # "version needed to extract" 12.8: zipfile raises NotImplementedError
        data = bytearray(path.read_bytes())
        central = data.find(b"PK\x01\x02")
        data[central + 6:central + 8] = (128).to_bytes(2, "little")
        path.write_bytes(bytes(data))
    else:
        arrays["image"] = arrays["image"][:, :, :, :5]
        _rewrite(path, arrays)
    seal_bundle(root)  # checksums agree: only the content can refuse it
    proc = run_cli("validate", str(root))
    assert_refused(proc, "model.onnx.inputs.npz")
    assert_refused(device_validate(root, tmp_path), "inputs.npz")


def test_a_zip_with_an_unlisted_or_oversized_entry_is_refused_before_extracting(bundle, tmp_path):
    archive_path = tmp_path / "bundle.zip"
    write_zip(bundle, archive_path, root_name="b")
    grown = tmp_path / "grown.zip"
    with zipfile.ZipFile(archive_path) as source, zipfile.ZipFile(grown, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        target.writestr("b/extra.bin", b"\0" * (8 << 20))  # compresses to ~8 kB
    assert_refused(run_cli("validate", str(grown)), "extra.bin", "not listed")
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(archive_path) as source, zipfile.ZipFile(lying, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "b/model.onnx":
                data += b"\0" * (4 << 20)
            target.writestr(info.filename, data)
    assert_refused(run_cli("validate", str(lying)), "model.onnx", "declares")


@pytest.mark.parametrize("parity", [True, {"outputs": 3}, {"outputs": [-1]}, {"outputs": ["\x1b[31m"]},
                                    {"thresholds": ["min_cosine"]}, {"thresholds": {"min_cosine": "0.99"}}])
def test_a_recorded_parity_of_the_wrong_shape_is_a_manifest_error(bundle, tmp_path, parity):
    """validate reads the build's thresholds and per-output records: a manifest that passes the
    JSON schema but records them with the wrong types is refused (exit 2), never a crash."""
    root = copy(bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["artifacts"][0]["parity"] = parity
    (root / "manifest.json").write_text(json.dumps(manifest))  # manifest.json is not among its own checksums
    assert_refused(run_cli("validate", str(root)), "manifest", "parity")


def test_a_manifest_nested_100000_deep_is_a_bundle_error(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    (root / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    for command in (["validate", str(root)], ["inspect", str(root)]):
        assert_refused(run_cli(*command), "nested")
    assert_refused(device_validate(root, tmp_path), "nested")
    assert json_depth_exceeds(json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)))


# --- device reports ------------------------------------------------------------------------

def _report(bundle: Path, **latency) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    art = manifest["artifacts"][0]
    return {"schema_version": 1, "kind": "edgepack-device-report", "created_by": "device/validate.py",
            "bundle": {"model": manifest["model"]["name"], "target": manifest["target"]["name"]},
            "device": {"label": "Pixel \x1b[31mred\x1b[0m", "nested": {"x": [1] * 5}, "huge": "y" * 10_000},
            "artifacts": [{"file": art["file"], "sha256": art["sha256"], "status": "passed",
                           "latency": {"source": "device", "tool": "device/validate.py", "threads": 1, "runs": 5,
                                       **latency}}]}


@pytest.mark.parametrize("case, words", [("nan", "NaN"), ("negative", "greater than or equal to 0"),
                                         ("huge-threads", "threads")])
def test_ingest_refuses_impossible_measurements(bundle, tmp_path, case, words):
    """NaN or negative latencies and a 400-digit thread count are a bundle error (exit 2), and
    the manifest is left as it was: a budget never passes on such figures."""
    root = copy(bundle, tmp_path)
    raw = json.dumps(_report(root, p50_ms={"nan": float("nan"), "negative": -3.0, "huge-threads": 1.0}[case]))
    if case == "huge-threads":
        raw = raw.replace('"threads": 1', '"threads": ' + "9" * 400)
    report = tmp_path / "report.json"
    report.write_text(raw)
    before = (root / "manifest.json").read_bytes()
    assert_refused(run_cli("ingest", str(root), str(report)), words)
    assert (root / "manifest.json").read_bytes() == before


def test_ingest_refuses_dev_zero_and_deep_nesting_and_keeps_reports_small(bundle, tmp_path):
    root = copy(bundle, tmp_path)
    assert_refused(run_cli("ingest", str(root), "/dev/zero"), "not a regular file")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    assert_refused(run_cli("ingest", str(root), str(deep)), "nested")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**_report(root, p50_ms=1.0), "padding": "x" * (9 << 20)}))
    assert_refused(run_cli("ingest", str(root), str(big)), "over the")
    # a good report with a hostile device label: stored bounded and printed without control characters
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_report(root, p50_ms=1.0)))
    size_before = (root / "manifest.json").stat().st_size
    proc = run_cli("ingest", str(root), str(good))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "Pixel [31mred[0m" in proc.stderr
    manifest = json.loads((root / "manifest.json").read_text())
    device = manifest["device_measurements"][0]["device"]
    assert "nested" not in device and len(device["huge"]) <= 200
    assert (root / "manifest.json").stat().st_size < size_before + 8_000


def test_budgets_never_pass_on_missing_data():
    from edgepack.target import Budgets

    budgets = Budgets(max_bytes=100, max_latency_ms=5.0)
    assert budgets.failures(50, None) == ["no host p50 latency to judge max_latency_ms against"]
    assert budgets.failures(None, 1.0) == ["no size to judge max_bytes against"]
    assert not budgets.check(50, float("nan"))["passed"]
    assert budgets.check(50, 1.0)["passed"] and Budgets().check(10**9, None) is None


def test_report_helpers_bound_and_clean():
    assert printable("a\x1b[2Jb\x07c\x9b") == "a[2Jbc"
    assert len(printable("x" * 1000, 50)) == 50
    assert clean_device({"a": 1, "b": float("inf"), "c": [1], "d": "z" * 500})["d"] == "z" * 197 + "..."
    brief = brief_parity({"passed": True, "outputs": [{"name": "y", "cosine_min": float("nan"), "sqnr_db": 30,
                                                       "failures": ["f"] * 50}] * 100})
    assert len(brief["outputs"]) == 32 and brief["outputs"][0]["cosine_min"] is None
    assert len(brief["outputs"][0]["failures"]) == 5
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_json(b'{"x": Infinity}', "r.json", "device report")
