"""The Vulkan probe, run the way the GPU runner's process sees Vulkan: with lavapipe's
environment, with a loader but no driver, and without a loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgepack.emulators import lavapipe


@pytest.fixture(scope="module")
def driver():
    return lavapipe.ensure()


def _probe(env: dict[str, str]) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "edgepack.emulators.vulkan"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)
    return done.returncode, json.loads(done.stdout)


def test_lavapipe_is_a_cpu_device_with_what_webgpu_needs(driver):
    code, report = _probe(driver.environment())
    assert code == 0 and report["ok"] and report["error"] is None
    device = report["devices"][0]
    assert device["type"] == "cpu" and device["driver_name"] == "llvmpipe" and device["name"].startswith("llvmpipe")
    assert device["driver_info"].startswith("Mesa ") and int(device["driver_info"].split()[1].split(".")[0]) >= 25
    assert device["missing_for_webgpu"] == [] and device["shader_float16"]
    assert tuple(int(x) for x in device["api_version"].split(".")[:2]) >= (1, 3)


def test_a_loader_without_a_driver_says_so(driver, tmp_path):
    env = {**driver.environment(), "VK_ICD_FILENAMES": str(tmp_path / "none.json"),
           "VK_DRIVER_FILES": str(tmp_path / "none.json")}
    code, report = _probe(env)
    assert code == 1 and not report["ok"] and report["devices"] == []
    assert report["error"].endswith("no Vulkan driver found")


def test_no_loader_says_so(driver):
    env = {"LD_LIBRARY_PATH": "", "VK_ICD_FILENAMES": str(driver.icd)}
    code, report = _probe(env)
    if report["ok"] or "no Vulkan loader" not in (report["error"] or ""):
        pytest.skip("this host has a system Vulkan loader")
    assert code == 1 and report["error"].startswith("no Vulkan loader (libvulkan.so.1")
