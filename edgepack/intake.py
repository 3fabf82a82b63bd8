"""Reading bundles, zips, golden .npz files and device reports as untrusted input.

A bundle travels (CI machine, artifact store, phone, back through ``validate`` and ``ingest``),
so everything read here is treated as hostile (README "Trust model"):

- confinement: a file is read only if its path, as the manifest names it, stays inside the
  bundle and every component is a plain directory or, last, a regular file: no symlink, device
  file or FIFO is followed or opened (the final open also uses O_NOFOLLOW);
- size: manifest.json and device reports have a byte cap; an .npz array's header (shape, dtype)
  is read and checked against what the manifest says before any data is loaded; a zip's entry
  list and declared sizes are checked against the manifest before anything is extracted;
- depth: JSON nested deeper than MAX_JSON_DEPTH is refused before it reaches a recursive parser;
- no pickles: object arrays are refused and numpy never unpickles (allow_pickle=False).

Every refusal is a BundleError (exit 2) naming the file and what to do.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
from pydantic import ValidationError

from .bundle import Manifest, load_json_schema
from .errors import BundleError

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 32 << 20  # a real manifest is 10-500 kB; ingests add a few kB each
MAX_REPORT_BYTES = 8 << 20  # a device report is a few kB per artifact
MAX_JSON_DEPTH = 64  # a manifest is ~10 levels deep
MAX_ARRAY_BYTES = 512 << 20  # one golden array, whatever the manifest claims
_REBUILD = "the bundle was damaged or tampered with; copy or rebuild it"


# --- confinement ---------------------------------------------------------------------------

def confined(root: Path, relative: str) -> Path:
    """The regular file ``relative`` (a bundle-relative POSIX path) inside bundle ``root``.

    Refuses absolute paths, '..', backslashes and NULs, and any symlink, device file, FIFO or
    directory on the way (lstat, never following a link)."""
    path = PurePosixPath(relative) if isinstance(relative, str) else None
    if (path is None or not relative or "\x00" in relative or "\\" in relative or path.is_absolute()
            or ".." in path.parts or relative != path.as_posix()):
        raise BundleError(f"manifest.json names {relative!r}, which is not a plain path inside the bundle",
                          _REBUILD)
    current = Path(root)
    for index, part in enumerate(path.parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise BundleError(f"{current}: missing", "the bundle is incomplete; copy or rebuild it") from None
        except OSError as exc:
            raise BundleError(f"{current}: cannot be read ({exc.strerror or exc})", _REBUILD) from None
        if stat.S_ISLNK(mode):
            raise BundleError(f"{current}: a symlink inside the bundle; bundles hold regular files only, and "
                              f"edgepack never follows a link out of one", _REBUILD)
        last = index == len(path.parts) - 1
        if not last and not stat.S_ISDIR(mode):
            raise BundleError(f"{current}: not a directory", _REBUILD)
        if last and not stat.S_ISREG(mode):
            raise BundleError(f"{current}: not a regular file (a directory, device file or FIFO)", _REBUILD)
    return current


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of regular file ``path`` (not a link, device or FIFO), at most ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BundleError(f"{path}: cannot open the {what} ({exc.strerror or exc})",
                          "pass a regular file (not a symlink, device or FIFO)") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path}: the {what} is not a regular file", "pass a regular file")
        if info.st_size > limit:
            raise BundleError(f"{path}: the {what} is {info.st_size:,} bytes, over the {limit:,}-byte limit",
                              f"a real {what} is far smaller; this one was damaged or made to exhaust memory")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: the {what} grew past {limit:,} bytes while being read", "pass a finished file")
    return data


# --- JSON ----------------------------------------------------------------------------------

def json_depth_exceeds(data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json(data: bytes, where: str, what: str) -> Any:
    """JSON from untrusted bytes: valid UTF-8, no NaN/Infinity literals, nesting bounded."""
    def refuse_constant(name: str) -> float:
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: the {what} is not valid JSON ({str(exc)[:200]})", _REBUILD) from None
    except RecursionError:
        raise BundleError(f"{where}: the {what} is nested too deeply to be a {what}", _REBUILD) from None
    if json_depth_exceeds(value):
        raise BundleError(f"{where}: the {what} nests deeper than {MAX_JSON_DEPTH} levels", _REBUILD)
    return value


# --- manifest ------------------------------------------------------------------------------

def parse_manifest(data: bytes, where: str) -> Manifest:
    """A Manifest from untrusted bytes: JSON limits, then the JSON Schema, then pydantic."""
    import jsonschema

    value = parse_json(data, where, "manifest")
    error = jsonschema.exceptions.best_match(_schema_validator().iter_errors(value))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise BundleError(f"{where}: does not match the manifest schema at {path}: {error.message[:300]}",
                          "the manifest was edited or comes from another version; rebuild the bundle")
    try:
        manifest = Manifest.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = "/".join(str(p) for p in first["loc"]) or "(top level)"
        raise BundleError(f"{where}: invalid manifest at {path}: {first['msg'][:300]}",
                          "the manifest was edited or comes from another version; rebuild the bundle") from None
    for art in manifest.artifacts:
        listed = {entry.path for entry in art.files}
        if art.file is not None and art.files and art.file not in listed:
            raise BundleError(f"{where}: artifact {art.file!r} is not among its checksummed files "
                              f"{sorted(listed)[:4]}", "every file a runtime opens must be checksummed; " + _REBUILD)
    return manifest


def load_bundle_manifest(bundle_dir: Path) -> Manifest:
    """Read and check a bundle's manifest.json (confined, size- and depth-limited, schema-checked)."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{bundle_dir}: not a bundle directory", "pass dist/<model>/<target>")
    path = confined(root, MANIFEST)
    return parse_manifest(read_limited(path, MAX_MANIFEST_BYTES, "manifest"), str(path))


@lru_cache(maxsize=1)
def _schema_validator():
    import jsonschema

    schema = load_json_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    return validator_cls(schema)


def checksummed_paths(manifest: Manifest) -> dict[str, Any]:
    """Every bundle-relative path the manifest vouches for, with its FileEntry."""
    entries = {}
    if manifest.package is not None:
        entries.update({e.path: e for e in manifest.package.files})
    for art in manifest.artifacts:
        entries.update({e.path: e for e in art.files})
    return entries


# --- golden arrays -------------------------------------------------------------------------

def array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every array in an .npz, read from the headers only."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy") or "/" in info.filename:
                raise BundleError(f"{path}: entry {info.filename!r} is not a golden array", _REBUILD)
            with archive.open(info) as handle:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                else:
                    raise BundleError(f"{path}: {info.filename} uses .npy format {version}", _REBUILD)
            headers[info.filename[: -len(".npy")]] = (tuple(int(d) for d in shape), dtype)
    return headers


def load_golden(path: Path, expected: dict[str, tuple[int, ...]] | None = None,
                dtypes: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a golden .npz, after checking each header: no object dtype, at most
    MAX_ARRAY_BYTES, and when given, exactly the ``expected`` shape and ``dtypes``. Damage
    (bad CRC, truncation, a header that lies) is a BundleError naming the file."""
    try:
        headers = array_headers(path)
        for name, (shape, dtype) in headers.items():
            if dtype.hasobject:
                raise BundleError(f"{path}: array {name!r} holds Python objects (a pickle); refusing to load it",
                                  _REBUILD)
            size = math.prod(shape) * dtype.itemsize
            if size > MAX_ARRAY_BYTES:
                raise BundleError(f"{path}: array {name!r} declares {size:,} bytes (shape {shape})", _REBUILD)
            if expected is not None and name in expected and tuple(expected[name]) != shape:
                raise BundleError(f"{path}: array {name!r} has shape {shape}, the manifest says "
                                  f"{tuple(expected[name])}", _REBUILD)
            if dtypes is not None and name in dtypes and str(dtype) != dtypes[name]:
                raise BundleError(f"{path}: array {name!r} is {dtype}, the manifest says {dtypes[name]}", _REBUILD)
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except BundleError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
            NotImplementedError) as exc:  # NotImplementedError: a zip version or method zipfile lacks
        raise BundleError(f"{path}: a damaged golden file ({type(exc).__name__}: {str(exc)[:200]})", _REBUILD) \
            from None


# --- zips ----------------------------------------------------------------------------------

def read_zip_manifest(archive: zipfile.ZipFile, zip_path: Path, prefix: str) -> Manifest:
    info = archive.getinfo(prefix + MANIFEST)
    if info.file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{zip_path}: manifest.json declares {info.file_size:,} bytes", _REBUILD)
    try:
        data = archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise BundleError(f"{zip_path}: cannot read manifest.json ({exc})", "copy or rebuild the archive") from None
    return parse_manifest(data, f"{zip_path}!{prefix}{MANIFEST}")


def check_zip_against_manifest(infos: Iterable[zipfile.ZipInfo], manifest: Manifest, zip_path: Path,
                               prefix: str) -> list[zipfile.ZipInfo]:
    """The entries to extract: every file entry must be manifest.json or a file the manifest
    checksums, with the declared size the manifest records (nothing unlisted, nothing larger)."""
    if manifest.package is None:
        raise BundleError(f"{zip_path}: the manifest is not sealed (no package section)", _REBUILD)
    listed = checksummed_paths(manifest)
    keep = []
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename[len(prefix):]
        if name == MANIFEST:
            keep.append(info)
            continue
        entry = listed.get(name)
        if entry is None:
            raise BundleError(f"{zip_path}: entry {name!r} is not listed in the manifest; refusing to extract",
                              "the archive was modified after the build; rebuild it")
        if info.file_size != entry.bytes:
            raise BundleError(f"{zip_path}: entry {name!r} declares {info.file_size:,} bytes, the manifest "
                              f"records {entry.bytes:,}", "the archive was modified after the build; rebuild it")
        keep.append(info)
    return keep


# --- device reports ------------------------------------------------------------------------

_CONTROL = dict.fromkeys([*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)])


def printable(text: Any, limit: int = 400) -> str:
    """``text`` without control characters (no ANSI escape reaches a terminal), at most ``limit``."""
    cleaned = str(text).translate(_CONTROL)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def clean_device(device: dict[str, Any]) -> dict[str, Any]:
    """A report's device description, bounded: at most 64 scalar fields, printable strings of at
    most 200 characters, finite numbers; anything else is dropped."""
    cleaned: dict[str, Any] = {}
    for key, value in list(device.items())[:64]:
        if isinstance(value, bool) or value is None:
            cleaned[printable(key, 64)] = value
        elif isinstance(value, (int, float)) and math.isfinite(value) and abs(value) < 1e15:
            cleaned[printable(key, 64)] = value
        elif isinstance(value, str):
            cleaned[printable(key, 64)] = printable(value, 200)
    return cleaned


def brief_parity(parity: dict[str, Any] | None) -> dict[str, Any] | None:
    """The figures of a report's parity block worth keeping in a manifest, bounded."""
    if not isinstance(parity, dict):
        return None

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) else None

    outputs = []
    for output in (parity.get("outputs") if isinstance(parity.get("outputs"), list) else [])[:32]:
        if not isinstance(output, dict):
            continue
        failures = output.get("failures") if isinstance(output.get("failures"), list) else []
        outputs.append({"name": printable(output.get("name"), 100), "passed": output.get("passed") is True,
                        **{key: number(output.get(key)) for key in ("cosine_min", "cosine_mean", "sqnr_db",
                                                                     "max_abs_error", "top1_agreement")},
                        "failures": [printable(f, 200) for f in failures[:5]]})
    return {"passed": parity.get("passed") is True, "outputs": outputs}
