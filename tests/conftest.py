"""Shared fixtures. Tests run the real exporters and runtimes on small models."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# One torch thread in the test process: on a shared 2-core machine two OpenMP threads fighting
# other processes made small forward passes many times slower. Runtimes in worker processes use
# the profile's thread count as usual.
torch.set_num_threads(1)

# Builds in tests export afresh (a test of the build cache sets its own EDGEPACK_BUILD_CACHE):
# a cache hit would skip the very exports, checks and failures a test is about.
os.environ.setdefault("EDGEPACK_BUILD_CACHE", "off")

# Builds of Android profiles in tests skip the emulated arm64 runs (recorded as skipped): one
# emulator setup and four qemu runs per build would cost ~30 s each. The tests about it
# (test_arm64_check.py) switch it back on for their build.
os.environ.setdefault("EDGEPACK_ARM64_CHECK", "off")

# A test that runs a whole build, itself or through a fixture, is marked `build`: `make test-fast`
# (pytest -m "not build and not slow") leaves those out for a quick inner loop; CI runs everything.
# A test module's build helper is named `_build...` (test_arm64_check.py's `_build_digits`).
_BUILD_CALL = re.compile(r"\bbuild\(|\b_build\w*\(|[\"']build[\"']")


def _runs_a_build(function) -> bool:
    try:
        return bool(_BUILD_CALL.search(inspect.getsource(function)))
    except (OSError, TypeError):
        return False


# Tests that take 10-60 s on a busy 2-core host (pytest --durations), each a whole export-and-run
# cycle or more: `slow`, so `make test-fast` stays near 3 minutes. `make test` runs them all.
SLOW = {
    "test_cache.py::test_a_second_identical_build_replays_every_export_byte_for_byte",
    "test_diagnose.py::test_diagnosis_ranks_the_hostile_layer_first",
    "test_fuzz.py::test_fuzz_driver_classifies_every_case",
    "test_fuzz.py::test_fuzzing_manifests_golden_files_zips_reports_and_links",
    "test_stages.py::test_distill_transfers_the_teacher_into_the_half_channel_student",
    "test_stages.py::test_qat_int8_matches_or_beats_ptq_in_executorch",
    "test_stages.py::test_gradual_80_percent_halves_the_download",
    "test_judge.py::test_a_mostly_float_dynamic_form_is_not_shipped_as_int8",
    "test_api.py::test_the_example_builds_validates_and_says_so",
    "test_recipe.py::test_observer_options_give_different_valid_artifacts",
    "test_commands.py::test_diagnose_says_when_nothing_needs_keeping_in_float",
    "test_speed.py::test_the_policy_acts_on_the_measured_ratio",
    "test_fallback.py::test_fallback_keeps_a_few_layers_float_and_passes",
    "test_tiny_encoder.py::test_static_int8_pte_of_an_encoder_layer",
    # 5-16 s each here (2026-12-06, quiet host): with them `make test-fast` took 5 min 25 s
    "test_onnx_quant.py::test_int8_tiny_mobilenet_v2_quantizes_every_conv",
    "test_onnx_quant.py::test_int8_calibrated_on_zeros_fails_thresholds",
    "test_lane.py::test_the_lane_calibrates_once_for_the_pte_and_the_tflite",
    "test_lane.py::test_the_lane_exports_the_bytes_the_build_process_does_and_reports_the_exporters_error",
    "test_tflite.py::test_int8_dynamic_of_an_encoder_with_lookup_tables_loads",
    "test_judge.py::test_a_static_int8_failure_ships_int8_dynamic_when_the_profile_says_so",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        functions = [item.function] + [d.func for defs in fixtures.values() for d in defs]
        if any(_runs_a_build(f) for f in functions):
            item.add_marker(pytest.mark.build)
        if f"{item.path.name}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)



REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
TEST_MODELS = Path(__file__).resolve().parent / "models"
TARGETS = REPO / "targets"


@pytest.fixture(scope="session")
def digits_spec():
    """The digits CNN spec, trained once per test session (cache: EDGEPACK_CACHE or ~/.cache/edgepack)."""
    from edgepack.spec import load_spec

    return load_spec(str(MODELS / "digits_cnn.py"))


@pytest.fixture(scope="session")
def hostile():
    """tests/models/hostile.py: one 1x1 conv with a 1000x outlier channel that int8 cannot hold."""
    from edgepack.spec import load_spec

    return load_spec(str(TEST_MODELS / "hostile.py"))


def write_profile(tmp_path: Path, base: str, name: str | None = None, **changes) -> Path:
    """Copy a shipped profile with top-level keys replaced; returns the new YAML path."""
    data = yaml.safe_load((TARGETS / f"{base}.yaml").read_text())
    data.update(changes)
    if name:
        data["name"] = name
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def leftovers(root: Path) -> list[Path]:
    """Temp dirs a build may leave beside its bundle (there must be none)."""
    return [p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
