"""Debian's formats, without network: version order, dependency fields, control paragraphs
(Packages, dpkg's status file) and .deb archives (ar with a data.tar inside). debian.py fetches.

    compare_versions("25.0.7-2~bpo12+1", "25.0.7-2") < 0        # the same order as dpkg
    parse_relations("a (>= 1) | b, c")                         # [[(a, >=, 1), (b, None, None)], [(c, ...)]]
    extract(deb_bytes, destination, keep=(r"libvulkan\\.so",))  # selected files of data.tar
"""

from __future__ import annotations

import io
import lzma
import posixpath
import re
import tarfile
import zlib
from pathlib import Path


class DebFormatError(ValueError):
    """Bytes that are not the Debian format they should be."""


# --- Debian versions and dependency fields ------------------------------------------------

def _order(char: str) -> int:
    if char == "":
        return 0
    if char == "~":
        return -1
    if char.isdigit():
        return 0
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_fragment(a: str, b: str) -> int:
    """dpkg's verrevcmp: non-digit runs by _order, then digit runs by value."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac, bc = _order(a[i] if i < len(a) else ""), _order(b[j] if j < len(b) else "")
            if ac != bc:
                return ac - bc
            i, j = i + 1, j + 1
        start_i, start_j = i, j
        while i < len(a) and a[i].isdigit():
            i += 1
        while j < len(b) and b[j].isdigit():
            j += 1
        x, y = int(a[start_i:i] or 0), int(b[start_j:j] or 0)
        if x != y:
            return x - y
    return 0


def compare_versions(a: str, b: str) -> int:
    """<0, 0, >0 as Debian version a sorts before, equal to or after b (dpkg --compare-versions)."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch or 0), upstream, revision

    (ea, ua, ra), (eb, ub, rb) = split(a), split(b)
    if ea != eb:
        return ea - eb
    return _compare_fragment(ua, ub) or _compare_fragment(ra, rb)


_RELATIONS = {">=": lambda c: c >= 0, "<=": lambda c: c <= 0, ">>": lambda c: c > 0, "<<": lambda c: c < 0,
              "=": lambda c: c == 0, ">": lambda c: c >= 0, "<": lambda c: c <= 0}  # > and < are dpkg's old >= <=
_ALTERNATIVE = re.compile(r"^\s*([a-z0-9][a-z0-9.+-]*)(?::[a-z0-9-]+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?")


def satisfies(version: str | None, relation: str | None, wanted: str | None) -> bool:
    return version is not None and (relation is None or _RELATIONS[relation](compare_versions(version, wanted)))


def parse_relations(text: str | None) -> list[list[tuple[str, str | None, str | None]]]:
    """'a (>= 1) | b, c:any' -> [[('a', '>=', '1'), ('b', None, None)], [('c', None, None)]]"""
    groups = []
    for group in filter(None, (g.strip() for g in (text or "").split(","))):
        alternatives = []
        for alternative in group.split("|"):
            match = _ALTERNATIVE.match(alternative)
            if match:
                alternatives.append((match.group(1), match.group(2), match.group(3)))
        if alternatives:
            groups.append(alternatives)
    return groups


def parse_stanzas(text: str, fields: frozenset[str] | None = None) -> list[dict[str, str]]:
    """Debian control-file paragraphs (Packages, dpkg status) as dicts; continuation lines kept."""
    stanzas, current, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t":
            if key is not None:
                current[key] += "\n" + line.strip()
        else:
            name, _, value = line.partition(":")
            key = name if fields is None or name in fields else None
            if key is not None:
                current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


# --- .deb files ---------------------------------------------------------------------------

def deb_members(data: bytes) -> dict[str, bytes]:
    """The members of a .deb (an ar archive): debian-binary, control.tar.*, data.tar.*."""
    if data[:8] != b"!<arch>\n":
        raise DebFormatError("not a .deb (no ar header)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode(errors="replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode(errors="replace").strip())
        except ValueError:
            raise DebFormatError(f"damaged .deb (bad size in the header of member {name!r})") from None
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def extract(deb: bytes, destination: Path, keep: tuple[str, ...], sysroot: bool = False) -> list[str]:
    """Extract the data.tar members whose path matches one of ``keep``; returns their paths.

    sysroot: the destination is a root file system for another machine (an arm64 sysroot run
    under qemu -L), so an absolute symlink means a path in that root: it is rewritten as a
    relative link inside the destination (python3.11's sitecustomize.py -> /etc/python3.11/...
    would otherwise be resolved by the host kernel to the host's file). Without it, an absolute
    link is refused like any link leaving the destination."""
    data = next((blob for name, blob in deb_members(deb).items() if name.startswith("data.tar")), None)
    if data is None:
        raise DebFormatError("the .deb has no data.tar")
    patterns = [re.compile(p) for p in keep]
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            members = [m for m in archive.getmembers()
                       if (m.isfile() or m.issym()) and any(p.search(m.name) for p in patterns)]
            kept = {posixpath.normpath(m.name).lstrip("/") for m in members}
            # a hard link comes along when the file it links to does (Debian ships a few)
            members += [m for m in archive.getmembers() if m.islnk() and any(p.search(m.name) for p in patterns)
                        and posixpath.normpath(m.linkname).lstrip("/") in kept]
            if sysroot:
                for member in members:
                    if member.issym() and member.linkname.startswith("/"):
                        parent = posixpath.dirname(posixpath.normpath(member.name).lstrip("/"))
                        member.linkname = posixpath.relpath(posixpath.normpath(member.linkname).lstrip("/"),
                                                            parent or ".")
            # the "data" filter refuses absolute paths, '..' and links pointing out of destination
            archive.extractall(destination, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise DebFormatError(f"the .deb holds a path that would land outside the destination: {exc}") from None
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error) as exc:  # zstd is not in 3.11's tarfile
        raise DebFormatError(f"cannot read the .deb's data archive (xz, gz and bz2 are supported): {exc}") from None
    return sorted(posixpath.normpath(m.name).lstrip("/") for m in members)  # paths relative to destination
