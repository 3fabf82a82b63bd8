"""The build cache: content-addressed entries of files plus a JSON record, shared by builds.

    cache = BuildCache.from_env()     # EDGEPACK_BUILD_CACHE, else $EDGEPACK_CACHE/builds; None when "off"
    key = cache.key({"artifact": config, "reference": digest, ...})   # sha256 of canonical JSON
    with cache.claim("export", key) as slot:           # one process computes a key at a time
        if slot.entry is None:
            ...compute files...
            slot.store([paths], {"record": ...})      # copied in, published atomically
        files, record = slot.entry.files, slot.entry.record

An entry is a directory ``<kind>/<key[:2]>/<key>/`` with ``record.json`` and its files. It is
written under a temporary name and renamed into place, so a reader sees a whole entry or none.
``claim`` holds an exclusive lock file per key (fcntl.flock) while the caller computes: two
builds wanting one key produce it once, the second waits and reads it. A key names every input
that can change the output (edgepack's own source, toolchain versions, the model's float ONNX
bytes, the inputs, the artifact's settings); nothing else is trusted. Above the size cap the
least recently used entries are removed after each store (``EDGEPACK_CACHE_MAX_GB``, default 10).

Host measurements (latency) go through ``measured``, a runtime's outputs on fixed inputs through
``replayed``: keyed by this host as well (its name, CPU model and count), a hit returns what was
stored with when and where it was measured or run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from .emulators.debian import cache_root
from .provenance import host_info

RECORD = "record.json"
DEFAULT_MAX_GB = 10.0
KINDS_DIR = "builds"


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over edgepack's own Python files: a changed edgepack never reads an older entry."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def digest_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def digest_arrays(samples: list[list[Any]]) -> str:
    """sha256 over a list of samples of numpy arrays (dtype, shape and bytes of each)."""
    digest = hashlib.sha256()
    for sample in samples:
        for array in sample:
            digest.update(f"{array.dtype}{tuple(array.shape)}".encode())
            digest.update(array.tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _plain_parts(name: str, tensor: Any) -> Any:
    """(name, plain tensor) pairs holding a state_dict entry's data. A tensor subclass that wraps
    others (torchao's quantized weights: an int8 embedding table is IntxUnpackedToInt8Tensor,
    whose data and scales are inner tensors) has no bytes of its own and refuses view/reshape:
    its inner tensors are digested instead, named under it with its class."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        yield name, tensor
        return
    inner, _ = tensor.__tensor_flatten__()
    for attr in inner:
        yield from _plain_parts(f"{name}:{type(tensor).__name__}.{attr}", getattr(tensor, attr))


def weights_digest(model: Any) -> str:
    """sha256 over a module's state_dict: names, shapes, dtypes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        for name, tensor in _plain_parts(key, value):
            array = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}{tuple(tensor.shape)}{array.dtype}".encode())
            digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(model: Any) -> dict[str, str]:
    """What a model's exports depend on, without tracing it: its weights and buffers, its
    structure (repr: layer types and hyper-parameters) and the source files of every module class
    outside torch (so an edited forward() in a spec's sibling file changes the key). Code that
    forward() calls from a file defining no module class is not covered: --no-cache after
    changing only such a file."""
    sources = hashlib.sha256()
    files = set()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls.__module__.startswith(("torch.", "builtins")):
                continue
            for value in vars(cls).values():  # forward() and the rest, wherever they were defined
                code = getattr(getattr(value, "__func__", value), "__code__", None)
                if code is not None:
                    files.add(code.co_filename)
    for path in sorted(files):
        sources.update(path.encode() + b"\0")
        with contextlib.suppress(OSError):
            sources.update(Path(path).read_bytes())
    return {"weights": weights_digest(model), "structure": hashlib.sha256(repr(model).encode()).hexdigest(),
            "sources": sources.hexdigest()}


def stamp(seconds: float) -> str:
    """A cache record's time as UTC ISO 8601, for the manifest."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def computed(cache: "BuildCache | None", kind: str, parts: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``'s JSON-able result, once per key: for what is a pure function of ``parts``
    (and edgepack's source, in every key) but costs imports or work a cached build need not pay."""
    if cache is None:
        return compute()
    with cache.claim(kind, cache.key({**parts, "kind": kind})) as slot:
        if slot.entry is None:
            slot.store([], {"result": compute()})
    return slot.entry.record["result"]


def _host_key() -> dict[str, Any]:
    host = host_info()
    return {"node": platform.node(), "cpu": host.get("cpu"), "cpu_count": host.get("cpu_count"),
            "machine": host.get("machine")}


def measured(cache: "BuildCache | None", kind: str, parts: dict[str, Any], measure: Callable[[], dict[str, Any]]
             ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(figures, cache note): ``measure()`` run once per key on this host, its JSON-able figures
    stored; a later build with the same ``parts`` on the same host reuses them. The note (None
    without a cache) says hit, key, when (measured_at) and where (host) they were measured."""
    if cache is None:
        return measure(), None
    key = cache.key({**parts, "kind": kind, "host": _host_key()})
    with cache.claim(kind, key) as slot:
        if slot.entry is None:
            slot.store([], {"figures": measure(), "host": platform.node()})
    record = slot.entry.record
    return record["figures"], {"hit": slot.hit, "key": key, "measured_at": stamp(record["created"]),
                               "host": record.get("host")}


def replayed(cache: "BuildCache | None", kind: str, parts: dict[str, Any],
             run: Callable[[], tuple[dict[str, Any], dict[str, Any]]]
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(record, arrays, cache note) of ``run()``: a runtime's outputs on fixed inputs (arrays by
    name, stored as an .npz) and a JSON-able record. They are a function of the artifact's bytes,
    the runtime and this host's CPU, so with the same ``parts`` on this host they are read back
    instead of run again; the note says hit, key, when (run_at) and where (host) they were made."""
    import numpy as np

    if cache is None:
        return (*run(), None)
    key = cache.key({**parts, "kind": kind, "host": _host_key()})
    with cache.claim(kind, key) as slot:
        if slot.entry is None:
            record, arrays = run()
            with tempfile.TemporaryDirectory(prefix="edgepack-replay-") as scratch:
                path = Path(scratch) / "arrays.npz"
                np.savez(path, **arrays)
                slot.store([path], {"result": record, "host": platform.node()})
    with np.load(slot.entry.files[0], allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    record = slot.entry.record
    return record["result"], arrays, {"hit": slot.hit, "key": key, "run_at": stamp(record["created"]),
                                      "host": record.get("host")}


@dataclass
class Entry:
    directory: Path
    record: dict[str, Any]

    @property
    def files(self) -> list[Path]:
        return [self.directory / name for name in self.record.get("files", [])]


class Slot:
    """A claimed key: ``entry`` is the stored entry or None; ``store`` publishes one."""

    def __init__(self, cache: "BuildCache", kind: str, key: str) -> None:
        self.cache, self.kind, self.key = cache, kind, key
        self.entry = cache.get(kind, key)
        self.hit = self.entry is not None

    def store(self, files: list[Path], record: dict[str, Any]) -> Entry:
        self.entry = self.cache.put(self.kind, self.key, files, record)
        return self.entry


class BuildCache:
    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes if max_bytes is not None else int(
            float(os.environ.get("EDGEPACK_CACHE_MAX_GB", DEFAULT_MAX_GB)) * 1e9)

    @classmethod
    def default(cls) -> "BuildCache":
        return cls(cache_root() / KINDS_DIR)

    @classmethod
    def from_env(cls) -> "BuildCache | None":
        """EDGEPACK_BUILD_CACHE: a directory, or ``off``; unset: $EDGEPACK_CACHE/builds."""
        setting = os.environ.get("EDGEPACK_BUILD_CACHE", "").strip()
        if setting.lower() in ("off", "0", "no", "none", "false"):
            return None
        return cls(Path(setting)) if setting else cls.default()

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        text = json.dumps({"edgepack_source": source_digest(), **parts}, sort_keys=True, separators=(",", ":"),
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _dir(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def get(self, kind: str, key: str) -> Entry | None:
        directory = self._dir(kind, key)
        try:
            record = json.loads((directory / RECORD).read_text())
        except (OSError, ValueError):
            return None
        entry = Entry(directory, record)
        if not all(path.is_file() for path in entry.files):
            return None
        with contextlib.suppress(OSError):
            os.utime(directory / RECORD)  # least recently used goes first
        return entry

    def put(self, kind: str, key: str, files: list[Path], record: dict[str, Any]) -> Entry:
        final = self._dir(kind, key)
        staging = self.root / "tmp" / f"{key}-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            names = []
            for path in files:
                shutil.copyfile(path, staging / path.name)
                names.append(path.name)
            (staging / RECORD).write_text(json.dumps({**record, "files": names, "created": time.time()},
                                                     indent=1, default=str))
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging, final)
            except OSError:  # another process published the same key first: theirs stands
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.evict()
        return Entry(final, json.loads((final / RECORD).read_text()))

    @contextlib.contextmanager
    def claim(self, kind: str, key: str) -> Iterator[Slot]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{kind}-{key}.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield Slot(self, kind, key)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def entries(self) -> list[tuple[str, Path, int, float]]:
        """(kind, directory, bytes, last used) of every entry."""
        found = []
        for record in self.root.glob(f"*/??/*/{RECORD}"):
            directory = record.parent
            kind = directory.parent.parent.name
            if kind in ("tmp", "locks"):
                continue
            size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
            found.append((kind, directory, size, record.stat().st_mtime))
        return found

    def evict(self) -> list[Path]:
        entries = sorted(self.entries(), key=lambda e: e[3])
        total = sum(e[2] for e in entries)
        removed = []
        while entries and total > self.max_bytes:
            kind, directory, size, _ = entries.pop(0)
            shutil.rmtree(directory, ignore_errors=True)
            total -= size
            removed.append(directory)
        return removed

    def info(self) -> dict[str, Any]:
        kinds: dict[str, dict[str, int]] = {}
        for kind, _, size, _ in self.entries():
            row = kinds.setdefault(kind, {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += size
        return {"directory": str(self.root), "max_bytes": self.max_bytes, "kinds": kinds,
                "entries": sum(k["entries"] for k in kinds.values()), "bytes": sum(k["bytes"] for k in kinds.values())}

    def clear(self) -> int:
        count = len(self.entries())
        if self.root.exists():
            shutil.rmtree(self.root)
        return count


# --- what a build takes from the cache besides exports, and what its manifest says of it ------

def cached_model_stats(cache: BuildCache | None, model: Any, example: tuple) -> dict[str, int]:
    """modelstats.model_stats (parameters, bytes, MACs), cached by the model's fingerprint and the
    example: the MAC count's first use of torch's FLOP counter imports 1-2.5 s of torch (measured
    on the build host) that a cached build needs nowhere else."""
    from .modelstats import model_stats
    from .provenance import toolchain_versions

    if cache is None:
        return model_stats(model, example)
    return computed(cache, "modelstats", {"model": model_fingerprint(model), "toolchain": toolchain_versions(),
                                          "example": digest_arrays([[t.detach().cpu().numpy() for t in example]])},
                    lambda: model_stats(model, example))


def cache_summary(cache: BuildCache | None, exports: list[dict[str, Any]],
                  latency: list[dict[str, Any]]) -> dict[str, Any]:
    """manifest.cache. hit: every export came from the cache; latency: each host latency figure,
    reused (hit) or measured in this build (latency_log)."""
    if cache is None:
        return {"enabled": False, "hit": False, "exports": []}
    return {"enabled": True, "directory": str(cache.root), "hit": bool(exports) and all(e["hit"] for e in exports),
            "exports": exports, "latency": latency}


def latency_log(reference: dict[str, Any], artifacts: list) -> list[dict[str, Any]]:
    """Per latency figure of a manifest (the float reference's, each artifact's, each comparison
    with fp32): whether it came from the cache and when it was measured."""
    found = [("float reference", reference.get("cache"))]
    for art in artifacts:
        latency = art.latency or {}
        found += [(art.file, latency.get("cache")),
                  (f"{art.file} vs fp32", (latency.get("float_comparison") or {}).get("cache"))]
    return [{"what": what, "hit": note["hit"], "measured_at": note["measured_at"]} for what, note in found if note]


def with_arm64_runs(summary: dict[str, Any], records: dict) -> dict[str, Any]:
    """manifest.cache with ``arm64_runs``: per emulated run (file, CPU model), reused or run here."""
    if not summary.get("enabled"):
        return summary
    return {**summary, "arm64_runs": [{"file": file, "cpu": run.cpu, "hit": run.cache["hit"],
                                       "emulated_at": run.cache["emulated_at"]}
                                      for file, record in records.items() for run in record.runs if run.cache]}
