"""Debian's formats without network: dpkg's version order (dpkg itself is the oracle), dependency
fields, control paragraphs, and .deb extraction that keeps only what is asked and nothing that
would land outside the destination."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from edgepack.emulators.debian_format import DebFormatError, compare_versions, extract, parse_relations, \
    parse_stanzas, satisfies

PAIRS = [("25.0.7-2~bpo12+1", "25.0.7-2"), ("25.0.7-2~bpo12+1", "22.3.6-1+deb12u1"), ("1:15.0.6-4+b1", "15.0.7"),
         ("1.0~rc1", "1.0"), ("1.0", "1.0-0"), ("2.4.123-1~bpo12+1", "2.4.121"), ("1.3.239.0-1", "1.3.239.0-1"),
         ("1.0a", "1.0"), ("1.0+b1", "1.0.1"), ("0:1.2", "1.2"), ("2.36-9+deb12u10", "2.36-9+deb12u4"),
         ("10", "9"), ("1.002", "1.2"), ("1.0~~", "1.0~"), ("1-1.0", "1-1.0.0")]


@pytest.mark.parametrize("a,b", PAIRS)
def test_version_order_is_dpkgs(a, b):
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg (the oracle) is not installed")
    for x, y in ((a, b), (b, a)):
        for op, holds in (("lt", lambda c: c < 0), ("eq", lambda c: c == 0), ("gt", lambda c: c > 0)):
            dpkg = subprocess.run(["dpkg", "--compare-versions", x, op, y], check=False).returncode == 0
            assert holds(compare_versions(x, y)) == dpkg, (x, op, y)


def test_relations_and_satisfies():
    groups = parse_relations("libc6 (>= 2.34), libdrm2 (>= 2.4.121) | libdrm-x, libz3-4:any, libllvm15 (= 1:15.0.6-4+b1)")
    assert groups == [[("libc6", ">=", "2.34")], [("libdrm2", ">=", "2.4.121"), ("libdrm-x", None, None)],
                      [("libz3-4", None, None)], [("libllvm15", "=", "1:15.0.6-4+b1")]]
    assert satisfies("2.4.114-1+b1", None, None) and not satisfies(None, None, None)
    assert not satisfies("2.4.114-1+b1", ">=", "2.4.121") and satisfies("2.4.123-1~bpo12+1", ">=", "2.4.121")
    assert satisfies("1.0", "<<", "1.0.1") and not satisfies("1.0", ">>", "1.0")


def test_stanzas_keep_continuation_lines_and_select_fields():
    text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nDepends: a (>= 1),\n c\nVersion: 2\n"
    assert parse_stanzas(text) == [{"Package": "a", "Version": "1", "Description": "x\nmore"},
                                   {"Package": "b", "Depends": "a (>= 1),\nc", "Version": "2"}]
    assert parse_stanzas(text, frozenset({"Package", "Depends"}))[1] == {"Package": "b", "Depends": "a (>= 1),\nc"}


def _deb(members: dict[str, bytes | str], compression: str = "xz") -> bytes:
    """A .deb as dpkg-deb writes it: ar of debian-binary, control.tar.xz, data.tar.<compression>.
    A str value makes a symlink to it, ("hardlink", path) a hard link."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode=f"w:{compression}") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            elif isinstance(content, tuple):  # ("hardlink", target)
                info.type, info.linkname = tarfile.LNKTYPE, content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    out = b"!<arch>\n"
    for name, blob in (("debian-binary", b"2.0\n"), ("control.tar.xz", b""), (f"data.tar.{compression}", data.getvalue())):
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(blob):<10}`\n".encode() + blob
        out += b"\n" if len(blob) % 2 else b""
    return out


def test_extract_keeps_only_matching_files_and_symlinks(tmp_path):
    deb = _deb({"./usr/lib/x86_64-linux-gnu/libvulkan.so.1.3.239": b"\x7fELF", "./usr/share/doc/copyright": b"text",
                "./usr/lib/x86_64-linux-gnu/libvulkan.so.1": "libvulkan.so.1.3.239"}, "gz")
    kept = extract(deb, tmp_path, (r"usr/lib/x86_64-linux-gnu/[^/]+\.so(\.[0-9]+)*$",))
    assert kept == ["usr/lib/x86_64-linux-gnu/libvulkan.so.1", "usr/lib/x86_64-linux-gnu/libvulkan.so.1.3.239"]
    lib = tmp_path / "usr/lib/x86_64-linux-gnu"
    assert (lib / "libvulkan.so.1").read_bytes() == b"\x7fELF" and (lib / "libvulkan.so.1").is_symlink()
    assert not (tmp_path / "usr/share").exists()


@pytest.mark.parametrize("member", [{"../evil.so": b"x"}, {"./usr/lib/evil.so": "/etc/passwd"},
                                    {"./usr/lib/evil.so": "../../../evil"}])
def test_extract_refuses_paths_outside_the_destination(tmp_path, member):
    destination = tmp_path / "root"
    with pytest.raises(DebFormatError, match="outside the destination"):
        extract(_deb(member), destination, (r".*",))
    assert not (tmp_path / "evil.so").exists() and not (destination / "usr/lib/evil.so").exists()


def test_extract_puts_absolute_paths_under_the_destination(tmp_path):
    assert extract(_deb({"/etc/evil.so": b"x"}), tmp_path, (r".*",)) == ["etc/evil.so"]
    assert (tmp_path / "etc/evil.so").read_bytes() == b"x" and not Path("/etc/evil.so").exists()


def test_a_sysroot_keeps_absolute_links_inside_itself(tmp_path):
    """python3.11's sitecustomize.py -> /etc/python3.11/sitecustomize.py: in a sysroot for qemu -L the
    host kernel would resolve it to the host's file, so it becomes a relative link inside the root."""
    deb = _deb({"./etc/python3.11/sitecustomize.py": b"# guest's", "./etc/passwd": b"guest",
                "./usr/lib/python3.11/sitecustomize.py": "/etc/python3.11/sitecustomize.py",
                "./usr/lib/evil.so": "/etc/passwd"})
    kept = extract(deb, tmp_path, (r".*",), sysroot=True)
    assert "usr/lib/python3.11/sitecustomize.py" in kept
    link = tmp_path / "usr/lib/python3.11/sitecustomize.py"
    assert str(link.readlink()) == "../../../etc/python3.11/sitecustomize.py" and link.read_bytes() == b"# guest's"
    assert (tmp_path / "usr/lib/evil.so").read_bytes() == b"guest"  # the root's /etc/passwd, never the host's
    with pytest.raises(DebFormatError, match="outside the destination"):  # without sysroot: refused, as before
        extract(deb, tmp_path / "plain", (r".*",))


def test_hard_links_come_along_with_their_file(tmp_path):
    deb = _deb({"./usr/bin/perl5.36": b"\x7fELF", "./usr/bin/perl": ("hardlink", "./usr/bin/perl5.36"),
                "./usr/share/doc/x": b"doc", "./usr/bin/doclink": ("hardlink", "./usr/share/doc/x")})
    kept = extract(deb, tmp_path, (r"usr/bin/",))
    assert kept == ["usr/bin/perl", "usr/bin/perl5.36"]  # doclink's file is not kept, so neither is it
    assert (tmp_path / "usr/bin/perl").read_bytes() == b"\x7fELF"
    assert (tmp_path / "usr/bin/perl").stat().st_ino == (tmp_path / "usr/bin/perl5.36").stat().st_ino


def test_extract_says_what_is_wrong_with_a_damaged_deb(tmp_path):
    with pytest.raises(DebFormatError, match="not a .deb"):
        extract(b"<html>proxy error</html>", tmp_path, (r".*",))
    good = _deb({"a": b"x" * 1000})
    damaged = good[:200] + bytes(255 - b for b in good[200:260]) + good[260:]
    with pytest.raises(DebFormatError, match="data archive"):
        extract(damaged, tmp_path, (r".*",))
