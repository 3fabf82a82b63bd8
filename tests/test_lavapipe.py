"""lavapipe set up by the product itself (Debian bookworm-backports, in the user's cache), its
child environment, and the error a user sees when it cannot be set up."""

from __future__ import annotations

import json
import time

import pytest

from conftest import run_cli
from edgepack.emulators import lavapipe
from edgepack.emulators.debian import CacheUnwritable, DownloadRefused, cache_root


def test_ensure_sets_up_once_then_reads_the_cache(monkeypatch):
    driver = lavapipe.ensure()  # first use in this cache: downloads ~11.5 MB (a few seconds)
    monkeypatch.setenv("EDGEPACK_DEBIAN_MIRROR", "http://127.0.0.1:9")  # the second call must not need the network
    started = time.perf_counter()
    again = lavapipe.ensure(say=pytest.fail)
    assert time.perf_counter() - started < 2.0
    assert again.device == driver.device and again.icd == driver.icd
    assert driver.directory == cache_root() / "lavapipe" and driver.icd.is_file()
    icd = json.loads(driver.icd.read_text())
    assert icd["ICD"]["library_path"] == str(driver.library_dir / "libvulkan_lvp.so")
    env = driver.environment()
    assert env["VK_ICD_FILENAMES"] == env["VK_DRIVER_FILES"] == str(driver.icd)
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(driver.library_dir)
    assert env["MESA_SHADER_CACHE_DIR"] == str(driver.directory / "mesa_shader_cache")


def test_describe_names_the_driver_and_says_it_is_not_a_phone_driver():
    described = lavapipe.ensure().describe()
    assert described["name"] == "Mesa lavapipe" and described["device_type"] == "cpu"
    assert described["driver_info"].startswith(f"Mesa {described['package_version']}")
    assert "not a phone GPU driver" in described["not_a_phone_gpu_driver"]
    assert {p["package"] for p in described["packages"]} >= {"mesa-vulkan-drivers", "libvulkan1"}


def test_a_refused_download_fails_with_a_hint_and_exit_code_2(tmp_path):
    """`edgepack gpu-setup` on a host that may not reach the mirror (simulated with an unreachable one)."""
    proc = run_cli("gpu-setup", env={"EDGEPACK_CACHE": str(tmp_path), "EDGEPACK_DEBIAN_MIRROR": "http://127.0.0.1:9"},
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "emulator unavailable: cannot download http://127.0.0.1:9/debian/dists/bookworm/InRelease" in proc.stderr
    assert "hint:" in proc.stderr and "EDGEPACK_DEBIAN_MIRROR" in proc.stderr
    assert not (tmp_path / "lavapipe").exists() and not (tmp_path / "debian" / "lavapipe").exists()


def test_an_unwritable_cache_fails_with_a_hint(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(CacheUnwritable, match="cannot write edgepack's cache"):
        lavapipe.ensure()
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setenv("EDGEPACK_DEBIAN_MIRROR", "http://127.0.0.1:9")
    with pytest.raises(DownloadRefused):
        lavapipe.ensure()


def test_gpu_setup_command_reports_the_driver():
    lavapipe.ensure()
    proc = run_cli("gpu-setup", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    described = json.loads(proc.stdout)
    assert described["name"] == "Mesa lavapipe" and described["environment"]["VK_ICD_FILENAMES"].endswith("lvp_icd.json")
