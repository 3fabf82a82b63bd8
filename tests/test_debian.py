"""Fetching Debian packages privately: where the cache is, how dependencies are chosen, and that
every way it can fail says so clearly and leaves no partial tree. The real fetch is lavapipe's
(tests/test_lavapipe.py sets it up through the product's own code path, once per cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.emulators import debian, lavapipe
from edgepack.emulators.debian import BOOKWORM, CacheUnwritable, DownloadRefused, IntegrityError, Recipe, Suite, \
    ToolMissing, UnsupportedHost, Want, _Candidates, cache_root, fetch, resolve, verified_release
from edgepack.errors import EmulatorUnavailable, RuntimeUnavailable

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once
ANY_HOST = {"host_machine": None, "host_codenames": None}


def _recipe(**changes) -> Recipe:
    return Recipe(**{"name": "test-recipe", "architecture": "amd64", "suites": BOOKWORM,
                     "roots": (Want("libvulkan1"),), **ANY_HOST, **changes})


def test_cache_root_is_edgepack_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("EDGEPACK_CACHE")
    assert cache_root() == tmp_path / "xdg" / "edgepack"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "edgepack"


def test_errors_are_emulator_unavailable_with_exit_code_2():
    for error in (DownloadRefused, UnsupportedHost, ToolMissing, IntegrityError, CacheUnwritable):
        assert issubclass(error, EmulatorUnavailable) and issubclass(error, RuntimeUnavailable)
        assert error("m", "h").exit_code == 2


def test_a_refused_download_is_clear_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path))
    monkeypatch.setenv("EDGEPACK_DEBIAN_MIRROR", UNREACHABLE)
    messages = []
    with pytest.raises(DownloadRefused) as info:
        fetch(_recipe(), say=messages.append)
    assert f"cannot download {UNREACHABLE}/debian/dists/bookworm/InRelease" in info.value.message
    assert "EDGEPACK_DEBIAN_MIRROR" in info.value.hint and "deb.debian.org" in info.value.hint
    assert messages == ["test-recipe: reading Debian's signed index of bookworm (amd64)"]
    assert not (tmp_path / "debian" / "test-recipe").exists()
    assert not [p for p in (tmp_path / "debian").iterdir() if p.name.startswith(".")]


def test_an_unwritable_cache_is_clear(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("EDGEPACK_CACHE", str(blocker / "cache"))
    with pytest.raises(CacheUnwritable) as info:
        fetch(_recipe())
    assert str(blocker / "cache" / "debian") in info.value.message and "EDGEPACK_CACHE" in info.value.hint


def test_a_host_the_recipe_does_not_run_on_is_refused_before_any_download(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path))
    with pytest.raises(UnsupportedHost, match="needs Linux on riscv64; this host is Linux on"):
        fetch(_recipe(host_machine="riscv64"))
    with pytest.raises(UnsupportedHost, match="built for Debian no-such-release; this host is") as info:
        fetch(_recipe(host_machine=None, host_codenames=("no-such-release",)))
    assert "Debian 12" in info.value.hint
    assert not (tmp_path / "debian").exists()


def test_without_the_archive_keyring_nothing_is_trusted(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path))
    monkeypatch.setenv("EDGEPACK_DEBIAN_KEYRING", str(tmp_path / "no-keyring.gpg"))
    with pytest.raises(ToolMissing, match="no-keyring.gpg is missing") as info:
        fetch(_recipe())
    assert "debian-archive-keyring" in info.value.hint


def test_an_index_signed_by_another_key_is_refused(monkeypatch):
    """Debian's real InRelease checked against the keyring of keys Debian retired: gpgv refuses."""
    removed = Path("/usr/share/keyrings/debian-archive-removed-keys.gpg")
    if not removed.is_file():
        pytest.skip("debian-archive-keyring's removed-keys ring is not installed")
    monkeypatch.setenv("EDGEPACK_DEBIAN_KEYRING", str(removed))
    with pytest.raises(IntegrityError, match="bookworm-backports/InRelease: bad signature"):
        verified_release(Suite("bookworm-backports", priority=100))


def _stanza(name: str, version: str, suite: str = "bookworm", priority: int = 500, **fields) -> dict:
    return {"Package": name, "Version": version, "_suite": suite, "_priority": str(priority), "SHA256": "0" * 64,
            "_url": f"http://x/{name}.deb", **fields}


def test_resolve_prefers_the_host_then_regular_suites_then_backports():
    candidates = _Candidates([
        _stanza("mesa-vulkan-drivers", "25.0.7-2~bpo12+1", "bookworm-backports", 100,
                Depends="libc6 (>= 2.34), libdrm2 (>= 2.4.121), libdrm-amdgpu1, libllvm15, libz | libz-ng"),
        _stanza("mesa-vulkan-drivers", "22.3.6-1+deb12u1"),
        _stanza("libdrm2", "2.4.114-1+b1"), _stanza("libdrm2", "2.4.123-1~bpo12+1", "bookworm-backports", 100),
        _stanza("libllvm15", "1:15.0.6-4+b1"), _stanza("libllvm15", "1:15.0.7-1~bpo12+1", "bookworm-backports", 100),
        _stanza("libz-ng", "2.0"), _stanza("libdrm-amdgpu1", "2.4.114-1+b1"),
    ])
    host = {"libc6": [("2.36-9+deb12u10", "libc6")], "libdrm2": [("2.4.114-1+b1", "libdrm2")]}
    recipe = _recipe(roots=(Want("mesa-vulkan-drivers", suite="bookworm-backports", min_version="25"),),
                     skip=("libdrm-amdgpu1",))
    chosen, notes = resolve(recipe, candidates, host)
    # libdrm2: the host's is too old and only backports has >= 2.4.121; libllvm15: the regular
    # suite wins over a newer backport (apt's pin); libz: the first alternative nobody has -> the next
    assert {n: s["Version"] for n, s in chosen.items()} == {
        "mesa-vulkan-drivers": "25.0.7-2~bpo12+1", "libdrm2": "2.4.123-1~bpo12+1", "libllvm15": "1:15.0.6-4+b1",
        "libz-ng": "2.0"}
    assert notes == ["libdrm-amdgpu1 not fetched (needed by mesa-vulkan-drivers; the recipe skips it)"]
    with pytest.raises(UnsupportedHost, match=r"needs libc6 >= 2.34; this host has 2.31"):
        resolve(recipe, candidates, {**host, "libc6": [("2.31-13", "libc6")]})
    with pytest.raises(DownloadRefused, match="no mesa-vulkan-drivers >= 26 in bookworm-backports"):
        resolve(_recipe(roots=(Want("mesa-vulkan-drivers", suite="bookworm-backports", min_version="26"),)),
                candidates, host)


def test_a_foreign_architecture_brings_its_whole_closure(monkeypatch):
    """An arm64 sysroot on an x86-64 host: libc6 (host_only for the host's own architecture) and
    whatever the host has installed are fetched for arm64 all the same."""
    candidates = _Candidates([_stanza("python3.11", "3.11.2-6+deb12u9", Depends="libc6 (>= 2.36), libssl3 (>= 3.0.0)"),
                              _stanza("libc6", "2.36-9+deb12u13"), _stanza("libssl3", "3.0.17-1~deb12u2")])
    monkeypatch.setattr(debian.platform, "machine", lambda: "x86_64")
    sysroot = _recipe(architecture="arm64", roots=(Want("python3.11"),), host_only=("libc6",), sysroot=True)
    assert debian.host_packages("arm64") == {}  # dpkg's status file is never read for a foreign architecture
    chosen, _ = resolve(sysroot, candidates, {})
    assert sorted(chosen) == ["libc6", "libssl3", "python3.11"]
    # the same recipe for the host's own architecture must take libc6 from the host
    with pytest.raises(UnsupportedHost, match="needs libc6 >= 2.36; this host has none"):
        resolve(_recipe(roots=(Want("python3.11"),), host_only=("libc6",)), candidates, {})
    # follow_depends=False: the roots alone (headers for a build)
    assert sorted(resolve(_recipe(roots=(Want("python3.11"),), follow_depends=False), candidates, {})[0]) == ["python3.11"]


def test_recipes_made_before_the_sysroot_fields_keep_their_fingerprint():
    """New Recipe fields at their default leave the fingerprint (and so every user's cache) as it was."""
    assert lavapipe.RECIPE.fingerprint() == _recipe_fingerprint_without_new_fields(lavapipe.RECIPE)
    assert _recipe(sysroot=True).fingerprint() != _recipe().fingerprint()


def _recipe_fingerprint_without_new_fields(recipe: Recipe) -> str:
    import dataclasses
    import hashlib
    import json

    fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in ("sysroot", "follow_depends")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def test_a_fetched_recipe_is_read_from_its_stamp_without_network(monkeypatch):
    """lavapipe's real fetch (the product's recipe, in the user's cache): the packages the host
    lacks, verified, only the kept files; a second fetch touches no network."""
    lavapipe.ensure()
    monkeypatch.setenv("EDGEPACK_DEBIAN_MIRROR", UNREACHABLE)
    fetched = debian.fetch(lavapipe.RECIPE, say=pytest.fail)
    names = {p["package"] for p in fetched.packages}
    assert {"mesa-vulkan-drivers", "libvulkan1"} <= names and not names & {"libdrm-amdgpu1", "libdrm-common", "libc6"}
    mesa = next(p for p in fetched.packages if p["package"] == "mesa-vulkan-drivers")
    assert mesa["suite"] == "bookworm-backports" and mesa["url"].startswith("http://deb.debian.org/debian/pool/")
    assert len(mesa["sha256"]) == 64 and mesa["bytes"] > 5_000_000
    assert sorted(mesa["files"]) == ["usr/lib/x86_64-linux-gnu/libvulkan_lvp.so", "usr/share/vulkan/icd.d/lvp_icd.json"]
    assert (fetched.library_dir / "libvulkan.so.1").exists() and (fetched.library_dir / "libvulkan_lvp.so").is_file()
    kept = [p for p in fetched.root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in kept) < 20_000_000
