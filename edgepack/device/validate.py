#!/usr/bin/env python3
"""Validate an edgepack bundle on the device it is meant for, and time it there.

Run from inside an unzipped bundle (it needs no edgepack and no torch, except that the
ExecuTorch pip runtime itself imports torch):

    python device/validate.py [--artifact FILE] [--runs N] [--warmup N] [--threads N] [--gpu]
                              [--report device_report.json] [--json] [--outputs FILE.npz] [--emulated WHAT]

Needs the Python standard library, numpy, and the runtime of each artifact to check:
onnxruntime (.onnx), ai-edge-litert or tflite-runtime (.tflite), executorch (.pte).
Artifacts whose runtime is not installed are skipped and listed as such. With --gpu, a .tflite
runs on the device's GPU through LiteRT's GPU accelerator (CompiledModel; ai-edge-litert 2.x),
judged under the thresholds the build's GPU check used (the manifest's emulated_gpu), and the
report says whether every op ran on the GPU.

For each artifact it
  1. checks the sha256 of every file the manifest lists (before loading anything),
  2. feeds golden/<file>.inputs.npz row by row: exactly the tensors the build host fed,
  3. dequantizes quantized outputs with the scale/zero_point the manifest records,
  4. compares them with golden/reference_outputs.npz (the float model in onnxruntime) under the
     artifact's parity thresholds: max/mean |error|, cosine (min/mean over samples), SQNR dB,
     top-1 agreement on class-score outputs; the same metrics as edgepack's parity check,
  5. reports how closely it agrees with the build host's own outputs of the same artifact,
  6. times it (warmup, then N runs on the first golden sample): p50/p90/min/mean ms,
and writes device_report.json (``edgepack ingest BUNDLE device_report.json`` merges it into
the manifest). Under an emulator (``edgepack validate --arm64`` runs this file under qemu-aarch64)
--emulated marks the report (device.emulated, latency source "emulated"): ingest refuses such a
report as a device measurement. --outputs writes the raw outputs for a bit-exact comparison.

Exit codes: 0 every checked artifact passed; 1 parity failed; 2 setup error (bad or missing
manifest or files, checksum mismatch, no runtime installed for any artifact, unknown
--artifact); 3 the runtime failed to load or run an artifact.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import stat
import subprocess
import sys
import time

REPORT_SCHEMA_VERSION = 1
REPORT_KIND = "edgepack-device-report"
TOOL = "device/validate.py"
EXIT_PASS, EXIT_PARITY, EXIT_SETUP, EXIT_RUNTIME = 0, 1, 2, 3
SQNR_CAP_DB = 200.0  # identical outputs: a finite number keeps the report valid JSON
RUNTIME_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "litert", "pte": "executorch"}
INSTALL_HINT = {"onnxruntime": "pip install onnxruntime",
                "litert": "pip install ai-edge-litert (or tflite-runtime)",
                "litert-gpu": "pip install ai-edge-litert (2.x: its CompiledModel API reaches the GPU)",
                "executorch": "pip install executorch (the version in the manifest's toolchain)"}

try:
    import numpy as np
except ImportError:  # checked in main() so the message is readable
    np = None


class SetupError(Exception):
    """The bundle or the environment is not usable (exit 2)."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message, self.hint = message, hint


class ArtifactRuntimeError(Exception):
    """A runtime failed to load or run an artifact (exit 3)."""


# --- manifest and files ------------------------------------------------------------------

MAX_MANIFEST_BYTES = 32 << 20
MAX_JSON_DEPTH = 64
MAX_ARRAY_BYTES = 512 << 20


def confined(bundle, relative):
    """The regular file ``relative`` inside the bundle: no absolute path, '..', backslash or NUL,
    and no symlink, device file, FIFO or directory on the way (a bundle is untrusted input)."""
    parts = relative.split("/") if isinstance(relative, str) else []
    if (not parts or "\x00" in relative or "\\" in relative or relative.startswith("/")
            or any(part in ("", ".", "..") for part in parts)):
        raise SetupError(f"manifest.json names the file {relative!r}, which is not a plain path inside the bundle",
                         "copy the bundle again")
    path = bundle
    for index, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise SetupError(f"{relative}: missing from the bundle", "copy the whole bundle directory to the device") from None
        except OSError as exc:
            raise SetupError(f"{relative}: cannot be read ({exc})", "copy the bundle again") from None
        if stat.S_ISLNK(mode):
            raise SetupError(f"{relative}: a symlink inside the bundle; refusing to follow it", "copy the bundle again")
        last = index == len(parts) - 1
        if (last and not stat.S_ISREG(mode)) or (not last and not stat.S_ISDIR(mode)):
            raise SetupError(f"{relative}: not a regular file inside the bundle", "copy the bundle again")
    return path


def json_too_deep(value, limit=MAX_JSON_DEPTH):
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def load_manifest(bundle):
    path = confined(bundle, "manifest.json")
    if os.path.getsize(path) > MAX_MANIFEST_BYTES:
        raise SetupError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes", "copy the bundle again")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path}: not valid JSON ({exc})", "copy the bundle again; the manifest is corrupt") from None
    except RecursionError:
        raise SetupError(f"{path}: nested too deeply to be a manifest", "copy the bundle again") from None
    if json_too_deep(manifest):
        raise SetupError(f"{path}: nested deeper than {MAX_JSON_DEPTH} levels", "copy the bundle again")
    problems = []
    if not isinstance(manifest, dict):
        raise SetupError(f"{path}: not a JSON object", "copy the bundle again")
    if manifest.get("schema_version") != 1:
        problems.append(f"schema_version {manifest.get('schema_version')!r} (this script reads 1)")
    for key, kind in (("artifacts", list), ("golden", dict), ("io", dict), ("target", dict), ("model", dict)):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"'{key}' missing or not a {kind.__name__}")
    if not problems:
        for index, art in enumerate(manifest["artifacts"]):
            if not isinstance(art, dict) or not isinstance(art.get("format"), str):
                problems.append(f"artifacts[{index}] has no format")
        if not isinstance(manifest["golden"].get("reference_outputs"), str):
            problems.append("golden.reference_outputs missing")
        if not isinstance(manifest["io"].get("outputs"), list):
            problems.append("io.outputs missing")
    if problems:
        raise SetupError(f"{path}: not an edgepack manifest: " + "; ".join(problems),
                         "use the device/validate.py shipped in the same bundle as the manifest")
    return manifest


def runnable(art):
    """Artifacts that shipped a file with golden data and parity thresholds."""
    return bool(art.get("file") and art.get("files") and isinstance(art.get("golden"), dict)
                and isinstance(art.get("parity"), dict) and isinstance(art.get("io"), dict))


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(bundle, manifest, selected):
    """sha256 of every file the manifest lists; returns how many were checked. Every file this
    script opens (each artifact's file, its golden data, the reference outputs) must be one of them."""
    entries = {}
    package = manifest.get("package") or {}
    for entry in package.get("files") or []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            entries[entry["path"]] = entry
    for art in selected:
        for entry in art.get("files") or []:
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                entries[entry["path"]] = entry
    needed = [manifest["golden"]["reference_outputs"], manifest["golden"]["inputs"]]
    for art in selected:
        needed += [art["file"], art["golden"]["inputs"], art["golden"]["outputs"]]
    for relative in needed:
        confined(bundle, relative)
        if relative not in entries:
            raise SetupError(f"{relative}: not checksummed by the manifest; refusing to use it",
                             "every file this script opens must be listed with its sha256; rebuild the bundle")
    for relative in sorted(entries):
        entry = entries[relative]
        path = confined(bundle, relative)
        size = os.path.getsize(path)
        if size != entry.get("bytes"):
            raise SetupError(f"{relative}: {size} bytes, the manifest says {entry.get('bytes')}",
                             "the file was modified or damaged in transfer; copy the bundle again (adb push / unzip)")
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            raise SetupError(
                f"checksum mismatch: {relative} has sha256 {actual[:16]}..., the manifest says "
                f"{str(entry.get('sha256'))[:16]}... ({size} bytes)",
                "the file was modified or damaged in transfer; copy the bundle again (adb push / unzip)")
    return len(entries)


def load_npz(path, expected=None):
    """A golden .npz, headers checked before any data is read: no object arrays (pickles), no
    array over MAX_ARRAY_BYTES, and the shapes in ``expected`` (name -> shape) when given."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else None
                if name is None:
                    raise SetupError(f"{path}: entry {info.filename!r} is not an array", "copy the bundle again")
                with archive.open(info) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                    else:
                        raise SetupError(f"{path}: {info.filename} uses .npy format {version}", "copy the bundle again")
                if dtype.hasobject:
                    raise SetupError(f"{path}: {name} holds Python objects (a pickle); refusing to load it",
                                     "copy the bundle again")
                nbytes = dtype.itemsize
                for dim in shape:
                    nbytes *= int(dim)
                if nbytes > MAX_ARRAY_BYTES:
                    raise SetupError(f"{path}: {name} declares {nbytes} bytes", "copy the bundle again")
                if expected and name in expected and tuple(expected[name]) != tuple(shape):
                    raise SetupError(f"{path}: {name} has shape {tuple(shape)}, the manifest says "
                                     f"{tuple(expected[name])}", "rebuild the bundle")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except SetupError:
        raise
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        raise SetupError(f"{path}: a damaged golden file ({type(exc).__name__}: {str(exc)[:200]})",
                         "copy the bundle again") from None


# --- runners: one per runtime, fed and returning native tensors ------------------------

def _io_names(io, key):
    return [t["name"] for t in io.get(key) or []]


class OrtRunner:
    runtime = "onnxruntime"

    def __init__(self, path, threads, io):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactRuntimeError(f"onnxruntime cannot load {os.path.basename(path)}: {exc}") from exc
        self.version = ort.__version__
        self.input_names = _io_names(io, "inputs") or [i.name for i in self.session.get_inputs()]
        self.output_names = _io_names(io, "outputs") or [o.name for o in self.session.get_outputs()]

    def run(self, feeds):
        return list(self.session.run(self.output_names, dict(zip(self.input_names, feeds))))


class LiteRTRunner:
    runtime = "litert"

    def __init__(self, path, threads, io):
        try:
            from ai_edge_litert.interpreter import Interpreter
            self.package = "ai-edge-litert"
        except ImportError:
            from tflite_runtime.interpreter import Interpreter
            self.package = "tflite-runtime"
        self.version = _dist_version(self.package)
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ArtifactRuntimeError(f"LiteRT cannot load {os.path.basename(path)}: {exc}") from exc
        signatures = self.interpreter.get_signature_list()
        if signatures:
            key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
            runner = self.interpreter.get_signature_runner(key)
            inputs, outputs = runner.get_input_details(), runner.get_output_details()
        else:
            inputs = {d["name"]: d for d in self.interpreter.get_input_details()}
            outputs = {d["name"]: d for d in self.interpreter.get_output_details()}
        want_in, want_out = _io_names(io, "inputs"), _io_names(io, "outputs")
        missing = [n for n in want_in if n not in inputs] + [n for n in want_out if n not in outputs]
        if missing:
            raise ArtifactRuntimeError(f"{os.path.basename(path)} has no tensor(s) {missing} that the manifest "
                                       f"names (it has {sorted(inputs)} -> {sorted(outputs)})")
        self.input_index = [inputs[n]["index"] for n in want_in]
        self.output_index = [outputs[n]["index"] for n in want_out]
        primary_in = {d["index"] for d in self.interpreter.get_input_details()}
        primary_out = {d["index"] for d in self.interpreter.get_output_details()}
        if set(self.input_index) != primary_in or set(self.output_index) != primary_out:
            raise ArtifactRuntimeError(f"{os.path.basename(path)}: the signature is not on the primary subgraph")

    def run(self, feeds):
        for index, value in zip(self.input_index, feeds):
            self.interpreter.set_tensor(index, value)
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(index) for index in self.output_index]


class ExecuTorchRunner:
    runtime = "executorch"

    def __init__(self, path, threads, io):
        import torch  # the ExecuTorch pybindings take and return torch tensors
        from executorch.runtime import Runtime

        self.torch = torch
        self.version = _dist_version("executorch")
        try:
            from executorch.extension.pybindings import portable_lib
            if portable_lib._threadpool_get_thread_count() != threads:
                portable_lib._unsafe_reset_threadpool(threads)  # only safe while nothing executes
        except (ImportError, AttributeError):
            pass  # older runtimes size the XNNPACK threadpool themselves
        try:  # quantized kernels (int8/int4 embeddings): an app links quantized_ops_lib instead
            import executorch.kernels.quantized  # noqa: F401
        except (ImportError, OSError):
            pass
        try:
            self.program = Runtime.get().load_program(path)
            self.method = self.program.load_method("forward")
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ArtifactRuntimeError(f"ExecuTorch cannot load {os.path.basename(path)}: {exc}") from exc

    def run(self, feeds):
        outputs = self.method.execute([self.torch.from_numpy(np.ascontiguousarray(f)) for f in feeds])
        return [o.numpy() if hasattr(o, "numpy") else np.asarray(o) for o in outputs]


class LiteRTGpuRunner:
    """LiteRT's GPU accelerator (--gpu): ops it does not take run on the CPU, as in a GPU app that
    allows it; fully_accelerated says whether any did (the accelerator's log names them)."""

    runtime = "litert-gpu"

    def __init__(self, path, threads, io):
        from ai_edge_litert.compiled_model import CompiledModel, CpuOptions, HardwareAccelerator, Options

        self.version = _dist_version("ai-edge-litert")
        options = Options(hardware_accelerators=HardwareAccelerator.GPU | HardwareAccelerator.CPU,
                          cpu_options=CpuOptions(num_threads=threads))
        try:
            self.model = CompiledModel.from_file(path, options=options)
        except (RuntimeError, ValueError) as exc:
            raise ArtifactRuntimeError(f"LiteRT's GPU accelerator cannot load {os.path.basename(path)}: {exc} "
                                       "(its log on stderr says why, e.g. no GPU driver)") from exc
        self.fully_accelerated = bool(self.model.is_fully_accelerated())
        signatures = self.model.get_signature_list()
        self.key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
        inputs, outputs = self.model.get_input_tensor_details(self.key), self.model.get_output_tensor_details(self.key)
        self.input_names, self.output_names = _io_names(io, "inputs"), _io_names(io, "outputs")
        missing = [n for n in self.input_names if n not in inputs] + [n for n in self.output_names if n not in outputs]
        if missing:
            raise ArtifactRuntimeError(f"{os.path.basename(path)} has no tensor(s) {missing} that the manifest names")
        self.shapes = {n: (list(outputs[n]["shape"]), np.dtype(outputs[n]["dtype"])) for n in self.output_names}
        self.in_buffers = {n: self.model.create_input_buffer_by_name(self.key, n) for n in self.input_names}
        self.out_buffers = {n: self.model.create_output_buffer_by_name(self.key, n) for n in self.output_names}

    def run(self, feeds):
        for name, value in zip(self.input_names, feeds):
            self.in_buffers[name].write(np.ascontiguousarray(value))
        self.model.run_by_name(self.key, self.in_buffers, self.out_buffers)
        return [self.out_buffers[n].read(int(np.prod(shape)), dtype).reshape(shape)
                for n, (shape, dtype) in self.shapes.items()]


RUNNERS = {"onnxruntime": OrtRunner, "litert": LiteRTRunner, "executorch": ExecuTorchRunner,
           "litert-gpu": LiteRTGpuRunner}


def runtime_available(runtime):
    """(True, version) or (False, why). Imports the runtime, as loading an artifact would."""
    try:
        if runtime == "onnxruntime":
            import onnxruntime
            return True, onnxruntime.__version__
        if runtime == "litert":
            try:
                import ai_edge_litert.interpreter  # noqa: F401
                return True, _dist_version("ai-edge-litert")
            except ImportError:
                import tflite_runtime.interpreter  # noqa: F401
                return True, _dist_version("tflite-runtime")
        if runtime == "executorch":
            import executorch.runtime  # noqa: F401
            return True, _dist_version("executorch")
        if runtime == "litert-gpu":
            import ai_edge_litert.compiled_model  # noqa: F401
            return True, _dist_version("ai-edge-litert")
    except (ImportError, OSError) as exc:  # OSError: a wheel whose shared library does not load here
        return False, f"{runtime} is not installed ({type(exc).__name__}: {exc}); {INSTALL_HINT[runtime]}"
    return False, f"no runner for runtime {runtime!r}"


def _dist_version(name):
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version(name)
    except (ImportError, PackageNotFoundError):
        return "unknown"


# --- parity: the same metrics as edgepack/parity.py, in numpy ------------------------------

def _cosine(a, b):
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def is_class_scores(shape, dtype):
    return len(shape) == 2 and shape[0] == 1 and shape[1] >= 2 and np.issubdtype(dtype, np.floating)


DECISIVE_SIGMAS = 4.0  # as edgepack/parity.py: a float margin above this many error RMS is decisive
MIN_DECISIVE = 4
MIN_DECISIVE_SHARE = 0.25
TIE_SHARE = 0.1  # ... and a near-tie is within this share of the float scores' range (max - min)


def top1_decisions(ref, out):
    """Top-1 agreement judged per decision (module docstring of edgepack/parity.py): with sigma the
    RMS of the artifact's error on a sample and band = DECISIVE_SIGMAS x sigma, a change of answer
    is a near-tie when the float model scored the artifact's answer within band of its own, and a
    decisive flip otherwise; a sample whose float runner-up is beyond band is decisive."""
    decisive = agree = flips = near = 0
    for r, a in zip(ref, out):
        top, choice = int(np.argmax(r)), int(np.argmax(a))
        # a tie: within what the error could flip, and a small part of the float scores' spread
        band = min(DECISIVE_SIGMAS * float(np.sqrt(np.mean((a - r) ** 2))), TIE_SHARE * float(np.ptp(r)))
        runner_up = float(np.sort(r)[-2])
        if choice != top and float(r[top] - r[choice]) > band:
            decisive += 1
            flips += 1
        elif float(r[top]) - runner_up > band:
            decisive += 1
            agree += 1
        elif choice != top:
            near += 1
    return {"decisive": decisive, "agreement": agree / decisive if decisive else None, "flips": flips,
            "near_tie_flips": near}


def _select(values, masks):
    if masks is None:
        return [np.asarray(v, dtype=np.float64).ravel() for v in values]
    picked = []
    for value, mask in zip(values, masks):
        value, mask = np.asarray(value, dtype=np.float64), np.asarray(mask) != 0
        if value.shape[:mask.ndim] != mask.shape:
            raise ValueError(f"mask of shape {mask.shape} does not lead output of shape {value.shape}")
        picked.append(value[mask].ravel())
    return picked


def compare_output(name, reference, actual, tolerance, scores=None, masks=None, masked_by=None):
    """reference/actual: one array per sample. Returns a dict like edgepack's OutputParity."""

    def result(max_abs, mean_abs, cos_mean, cos_min, sqnr, top1, violations, failures, decisions=None, notes=()):
        decisions = decisions or {}
        return {"name": name, "max_abs_error": max_abs, "mean_abs_error": mean_abs, "cosine_mean": cos_mean,
                "cosine_min": cos_min, "sqnr_db": sqnr, "top1_agreement": top1,
                "allclose_violations": violations, "passed": not failures, "failures": failures,
                "top1_decisive_samples": decisions.get("decisive"),
                "top1_decisive_agreement": decisions.get("agreement"),
                "top1_decisive_flips": decisions.get("flips"),
                "top1_near_tie_flips": decisions.get("near_tie_flips"),
                "notes": list(notes), "masked_by": masked_by}

    for r, a in zip(reference, actual):
        if np.shape(r) != np.shape(a):
            return result(math.inf, math.inf, 0.0, 0.0, -SQNR_CAP_DB, None, None,
                          [f"shape {np.shape(a)} differs from reference {np.shape(r)}"])
    ref, out = _select(reference, masks), _select(actual, masks)
    ref_all, out_all = np.concatenate(ref), np.concatenate(out)
    err = out_all - ref_all
    finite = bool(np.isfinite(out_all).all())
    max_abs = float(np.max(np.abs(err))) if finite and err.size else (0.0 if finite else math.inf)
    mean_abs = float(np.mean(np.abs(err))) if finite and err.size else (0.0 if finite else math.inf)
    cosines = [_cosine(r, a) for r, a in zip(ref, out)] if finite else [0.0]
    signal_power = float(np.sum(ref_all ** 2))
    noise_power = float(np.sum(err ** 2)) if finite else math.inf
    if noise_power == 0.0:
        sqnr = SQNR_CAP_DB
    elif signal_power <= 0.0 or not math.isfinite(noise_power):
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal_power / noise_power)))
    if scores is None:
        first = np.asarray(reference[0])
        scores = is_class_scores(first.shape, first.dtype) and masks is None
    top1, decisions = None, None
    if scores:
        top1 = float(np.mean([int(np.argmax(r) == np.argmax(a)) for r, a in zip(ref, out)]))
        decisions = top1_decisions(ref, out) if finite else {"decisive": 0, "agreement": None, "flips": 0,
                                                             "near_tie_flips": 0}
    violations = None
    failures, notes = [], []
    if not finite:
        failures.append("output contains NaN/Inf")
    atol, rtol = tolerance.get("atol"), tolerance.get("rtol")
    if atol is not None and rtol is not None:
        bound = atol + rtol * np.abs(ref_all)
        violations = int(np.sum(np.abs(err) > bound)) if finite else int(err.size)
        if violations:
            failures.append(f"{violations} value(s) outside atol={atol:g} + rtol={rtol:g}*|ref| (max|err| {max_abs:.3g})")
    if tolerance.get("min_cosine") is not None and min(cosines) < tolerance["min_cosine"]:
        failures.append(f"cosine min {min(cosines):.5f} < {tolerance['min_cosine']}")
    if tolerance.get("min_sqnr_db") is not None and sqnr < tolerance["min_sqnr_db"]:
        failures.append(f"SQNR {sqnr:.2f} dB < {tolerance['min_sqnr_db']} dB")
    threshold = tolerance.get("min_top1_agreement")
    if decisions is not None:
        if decisions["near_tie_flips"]:
            notes.append(f"top-1 changed on {decisions['near_tie_flips']} near-tie sample(s) where the float model "
                         f"scored both answers within the tie band (not a failure)")
        if threshold is not None and finite:
            needed = max(MIN_DECISIVE, math.ceil(MIN_DECISIVE_SHARE * len(ref)))
            if decisions["decisive"] < needed and not decisions["flips"]:
                notes.append(f"top-1 not judged: only {decisions['decisive']} of {len(ref)} sample(s) were decisive "
                             f"(at least {needed} needed): the artifact's error is as large as the float model's "
                             f"margins, or the samples are ones the model is unsure about")
            elif decisions["flips"]:
                failures.append(f"top-1 changed on {decisions['flips']} of {decisions['decisive']} decisive sample(s) "
                                f"(the float model ranked the artifact's answer clearly lower: beyond the tie band)")
            elif decisions["agreement"] < threshold:
                failures.append(f"top-1 agreement on decisive samples {decisions['agreement']:.3f} < {threshold}")
    return result(max_abs, mean_abs, float(np.mean(cosines)), float(np.min(cosines)), float(sqnr), top1,
                  violations, failures, decisions, notes)


def compare(reference, actual, tolerance, output_names, score_outputs=None, masks=None):
    """reference/actual: per sample, a list of model-level float outputs; masks: output name ->
    (input name, per-sample masks) for outputs judged only where the mask is nonzero."""
    outputs = []
    for index, name in enumerate(output_names):
        scores = None if score_outputs is None else name in score_outputs
        masked_by, sample_masks = (masks or {}).get(name, (None, None))
        outputs.append(compare_output(name, [s[index] for s in reference], [s[index] for s in actual],
                                      tolerance, scores, sample_masks, masked_by))
    thresholds = {k: v for k, v in tolerance.items() if v is not None}
    return {"passed": all(o["passed"] for o in outputs), "samples": len(reference), "thresholds": thresholds,
            "outputs": outputs}


def json_safe(value):
    """inf/nan are not JSON: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def dequantize(value, spec):
    if spec.get("scale") is not None:
        return ((value.astype(np.float32) - (spec.get("zero_point") or 0)) * spec["scale"]).astype(np.float32)
    return value


def host_agreement(native_outputs, host_outputs, specs):
    """How closely this device reproduces the build host's outputs of the same artifact (native units)."""
    rows = []
    for index, spec in enumerate(specs):
        mine = np.stack([sample[index] for sample in native_outputs]).astype(np.float64)
        theirs = np.asarray(host_outputs[spec["name"]], dtype=np.float64)
        if mine.shape != theirs.shape:
            rows.append({"name": spec["name"], "identical": False,
                         "detail": f"shape {list(mine.shape)} vs host {list(theirs.shape)}"})
            continue
        diff = np.abs(mine - theirs)
        finite = bool(np.isfinite(diff).all())
        rows.append({"name": spec["name"], "identical": bool(np.array_equal(mine, theirs)),
                     "max_abs_diff": float(diff.max()) if finite and diff.size else (0.0 if finite else math.inf),
                     "mismatched_values": int(np.count_nonzero(diff)), "values": int(diff.size)})
    return {"identical": all(r["identical"] for r in rows), "outputs": rows}


# --- the check of one artifact -------------------------------------------------------------

def latency_summary(times_ms):
    values = np.asarray(times_ms, dtype=np.float64)
    return {"runs": int(values.size), "p50_ms": round(float(np.percentile(values, 50)), 4),
            "p90_ms": round(float(np.percentile(values, 90)), 4), "min_ms": round(float(values.min()), 4),
            "mean_ms": round(float(values.mean()), 4)}


def golden_rows(bundle, art, manifest):
    io = art["io"]
    in_specs, out_specs = io.get("inputs") or [], io.get("outputs") or []
    samples = (manifest.get("golden") or {}).get("samples")

    def shapes(specs):
        if not isinstance(samples, int):
            return None
        return {t["name"]: (samples, *t["shape"]) for t in specs if isinstance(t, dict) and "shape" in t}

    inputs = load_npz(confined(bundle, art["golden"]["inputs"]), shapes(in_specs))
    reference = load_npz(confined(bundle, manifest["golden"]["reference_outputs"]),
                         shapes(manifest["io"].get("outputs") or []))
    host = load_npz(confined(bundle, art["golden"]["outputs"]), shapes(out_specs))
    model_outputs = _io_names(manifest["io"], "outputs")
    for label, data, names in ((art["golden"]["inputs"], inputs, [t["name"] for t in in_specs]),
                               (manifest["golden"]["reference_outputs"], reference, model_outputs),
                               (art["golden"]["outputs"], host, [t["name"] for t in out_specs])):
        missing = [n for n in names if n not in data]
        if missing:
            raise SetupError(f"{label}: no array(s) {missing}", "the bundle is inconsistent; rebuild it")
    if len(out_specs) != len(model_outputs):
        raise SetupError(f"{art['file']}: {len(out_specs)} outputs but the model has {len(model_outputs)}",
                         "the bundle is inconsistent; rebuild it")
    samples = {len(inputs[t["name"]]) for t in in_specs} | {len(reference[n]) for n in model_outputs}
    if len(samples) != 1:
        raise SetupError(f"{art['golden']['inputs']}: sample counts differ from the reference ({sorted(samples)})",
                         "the bundle is inconsistent; rebuild it")
    count = samples.pop()
    rows = []
    for i in range(count):
        row = []
        for spec in in_specs:
            value = np.ascontiguousarray(inputs[spec["name"]][i])
            if value.dtype.name != spec["dtype"] or list(value.shape) != list(spec["shape"]):
                raise SetupError(f"{art['golden']['inputs']}: {spec['name']} is {value.dtype.name}{list(value.shape)}, "
                                 f"the artifact takes {spec['dtype']}{spec['shape']}", "rebuild the bundle")
            row.append(value)
        rows.append(row)
    ref_rows = [[reference[n][i] for n in model_outputs] for i in range(count)]
    return rows, ref_rows, host, model_outputs


def recorded_masks(bundle, manifest, art, samples):
    """Outputs the build judged only where a model input is nonzero (``masked_by``): those
    masks, from the bundle's model-level golden inputs."""
    recorded = (art.get("parity") or {}).get("outputs") or []
    wanted = {o["name"]: o["masked_by"] for o in recorded if isinstance(o, dict) and o.get("masked_by")}
    if not wanted:
        return None
    shapes = {t["name"]: (samples, *t["shape"]) for t in manifest["io"].get("inputs") or []}
    model_inputs = load_npz(confined(bundle, manifest["golden"]["inputs"]), shapes)
    missing = [source for source in wanted.values() if source not in model_inputs]
    if missing:
        raise SetupError(f"{manifest['golden']['inputs']}: no input(s) {missing} to mask outputs with",
                         "the bundle is inconsistent; rebuild it")
    return {output: (source, [model_inputs[source][i] for i in range(samples)]) for output, source in wanted.items()}


def score_outputs_of(art, model_outputs):
    """Which outputs carry class scores: those the build judged by top-1 (else decide by shape)."""
    recorded = (art.get("parity") or {}).get("outputs")
    if not recorded or len(recorded) != len(model_outputs):
        return None
    return [o["name"] for o in recorded if o.get("top1_agreement") is not None]


def runtime_for(art, gpu):
    return "litert-gpu" if gpu and art["format"] == "tflite" else RUNTIME_FOR_FORMAT[art["format"]]


def check_artifact(bundle, manifest, art, threads, warmup, runs, say, runtime, emulated=None, outputs_path=None):
    rows, ref_rows, host, model_outputs = golden_rows(bundle, art, manifest)
    path = confined(bundle, art["file"])
    start = time.perf_counter()
    try:
        runner = RUNNERS[runtime](path, threads, art["io"])
    except ArtifactRuntimeError:
        raise
    except Exception as exc:  # whatever the runtime raises while loading: name the artifact, exit 3
        raise ArtifactRuntimeError(f"{runtime} cannot load {art['file']}: {type(exc).__name__}: {exc}") from exc
    load_ms = (time.perf_counter() - start) * 1000
    out_specs = art["io"]["outputs"]
    try:
        native = [runner.run(row) for row in rows]
    except ArtifactRuntimeError:
        raise
    except Exception as exc:  # the runtimes raise their own types; report which artifact failed
        raise ArtifactRuntimeError(f"{runtime} failed running {art['file']}: {type(exc).__name__}: {exc}") from exc
    if any(len(o) != len(out_specs) for o in native):
        raise ArtifactRuntimeError(f"{art['file']} returned {len(native[0])} outputs, the manifest lists {len(out_specs)}")
    outputs = [[dequantize(np.asarray(v), spec) for v, spec in zip(sample, out_specs)] for sample in native]
    tolerance = art["parity"].get("thresholds") or {}
    if runtime == "litert-gpu":  # the thresholds the build's GPU check judged this file by (fp16 arithmetic)
        tolerance = ((art.get("emulated_gpu") or {}).get("parity") or {}).get("thresholds") or tolerance
    parity = compare(ref_rows, outputs, tolerance, model_outputs, score_outputs_of(art, model_outputs),
                     recorded_masks(bundle, manifest, art, len(ref_rows)))
    agreement = host_agreement(native, host, out_specs)
    if outputs_path:  # the raw outputs, laid out like golden/<file>.outputs.npz, for a bit-exact comparison
        with open(outputs_path, "wb") as handle:
            np.savez(handle, **{spec["name"]: np.stack([s[i] for s in native]) for i, spec in enumerate(out_specs)})
    say(f"  timing {art['file']}: {warmup} warmup + {runs} runs, {threads} thread(s)")
    feeds = rows[0]
    times = []
    try:
        for _ in range(warmup):
            runner.run(feeds)
        for _ in range(runs):
            begin = time.perf_counter()
            runner.run(feeds)
            times.append((time.perf_counter() - begin) * 1000)
    except Exception as exc:
        raise ArtifactRuntimeError(f"{runtime} failed while timing {art['file']}: {type(exc).__name__}: {exc}") from exc
    latency = {"source": "device", "tool": TOOL, "runtime": runtime, "runtime_version": runner.version,
               "threads": threads, "warmup": warmup, "load_ms": round(load_ms, 3), **latency_summary(times)}
    if emulated:  # an emulator's seconds are not a device's: labelled so, and ingest refuses them
        latency.update(source="emulated", label=f"emulated ({emulated}): not device time")
    result = {"runtime": runtime, "runtime_version": runner.version,
              "status": "passed" if parity["passed"] else "parity-failed",
              "parity": parity, "host_agreement": agreement, "latency": latency}
    if runtime == "litert-gpu":
        result["fully_accelerated"] = runner.fully_accelerated
    return result


# --- device description, report ------------------------------------------------------------

def _getprop(name):
    if not shutil.which("getprop"):
        return None
    try:
        value = subprocess.run(["getprop", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return value or None


def cpu_features():
    """The CPU's feature flags an arm64 kernel choice depends on (/proc/cpuinfo "Features": asimddp,
    i8mm, sve, sme, ...); None where the file has no such line (x86 lists "flags" instead)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.split(":", 1)[0].strip() == "Features":
                    return line.split(":", 1)[1].split()[:128]
    except OSError:
        pass
    return None


def device_info():
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "hardware", "processor") and ":" in line:
                    value = line.split(":", 1)[1].strip()
                    if value and not value.isdigit():
                        cpu = value
                        if key != "processor":
                            break
    except OSError:
        pass
    info = {"platform": platform.platform(), "system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__}
    android = {key: _getprop(prop) for key, prop in (
        ("model", "ro.product.model"), ("manufacturer", "ro.product.manufacturer"),
        ("android_release", "ro.build.version.release"), ("soc", "ro.soc.model"), ("abi", "ro.product.cpu.abi"))}
    if any(android.values()):
        info["android"] = {k: v for k, v in android.items() if v}
    label = " ".join(v for v in (android.get("manufacturer"), android.get("model")) if v)
    info["label"] = label or f"{platform.system()} {platform.machine()} ({cpu or 'unknown cpu'})"
    features = cpu_features()
    if features:
        info["features"] = features
    return info


def write_report(path, report):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(json_safe(report), handle, indent=2)
        handle.write("\n")
    os.replace(temp, path)


def default_bundle():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(here, "manifest.json")):
        return here
    return os.getcwd()


def _summary(parity):
    bits = []
    for o in parity["outputs"]:
        text = f"{o['name']}: cos min {o['cosine_min']:.5f}, SQNR {o['sqnr_db']:.1f} dB, max|err| {o['max_abs_error']:.3g}"
        if o["top1_agreement"] is not None:
            text += f", top-1 {o['top1_agreement']:.1%}"
        if not o["passed"]:
            text += "  FAILED: " + "; ".join(o["failures"])
        bits.append(text)
    return bits


def run(args, say):
    bundle = os.path.abspath(args.bundle or default_bundle())
    manifest = load_manifest(bundle)
    profile = manifest["target"].get("profile") or {}
    threads = args.threads or max(1, min(int((profile.get("device") or {}).get("threads") or 1), os.cpu_count() or 1))
    latency_cfg = profile.get("latency") or {}
    warmup = args.warmup if args.warmup is not None else int(latency_cfg.get("warmup", 5))
    runs = args.runs if args.runs is not None else int(latency_cfg.get("runs", 30))
    if runs < 1 or warmup < 0 or threads < 1:
        raise SetupError("--runs and --threads must be >= 1, --warmup >= 0", "fix the arguments")
    candidates = [a for a in manifest["artifacts"] if runnable(a)]
    if args.artifact:
        chosen = [a for a in candidates if a["file"] == args.artifact]
        if not chosen:
            raise SetupError(f"no artifact {args.artifact!r} in this bundle",
                             "choose one of: " + ", ".join(a["file"] for a in candidates))
        candidates = chosen
    if not candidates:
        raise SetupError("the manifest lists no artifact to check (all failed or were not shipped)",
                         "rebuild the bundle")
    unknown = [a["file"] for a in candidates if a["format"] not in RUNTIME_FOR_FORMAT]
    if unknown:
        raise SetupError(f"unknown artifact format for {unknown}", "use the kit shipped with the bundle")
    if args.outputs and not args.artifact:
        raise SetupError("--outputs writes one artifact's outputs", "add --artifact FILE")
    if args.gpu and not any(a["format"] == "tflite" for a in candidates):
        raise SetupError("--gpu runs .tflite artifacts on the GPU and this bundle has none", "run without --gpu")

    report = {"schema_version": REPORT_SCHEMA_VERSION, "kind": REPORT_KIND, "created_by": TOOL,
              "created_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "bundle": {"model": manifest["model"].get("name"), "target": manifest["target"].get("name"),
                         "edgepack_version": manifest.get("edgepack_version"),
                         "payload_sha256": (manifest.get("package") or {}).get("payload_sha256")},
              "device": device_info(), "settings": {"threads": threads, "warmup": warmup, "runs": runs},
              "artifacts": [], "passed": False, "exit_code": EXIT_SETUP}
    emulated = args.emulated
    if emulated:
        report["device"]["emulated"] = {"by": emulated[:200], "note": "not a device: its seconds are not device latency"}

    available = {}
    for art in candidates:
        runtime = runtime_for(art, args.gpu)
        if runtime not in available:
            available[runtime] = runtime_available(runtime)
    to_run = [a for a in candidates if available[runtime_for(a, args.gpu)][0]]
    if not to_run:
        reasons = sorted({available[runtime_for(a, args.gpu)][1] for a in candidates})
        raise SetupError("no runtime installed for any artifact: " + "; ".join(reasons),
                         "install a runtime with pip, or run on a device that has one")
    checked = verify_files(bundle, manifest, to_run)
    say(f"checked sha256 of {checked} file(s) in {bundle}")
    report["files_verified"] = checked

    exit_code = EXIT_PASS
    for art in candidates:
        runtime = runtime_for(art, args.gpu)
        entry = {"file": art["file"], "format": art["format"], "precision": art.get("precision"),
                 "sha256": art.get("sha256"), "runtime": runtime}
        ok, version_or_reason = available[runtime]
        if not ok:
            entry.update(status="skipped", reason=version_or_reason)
            say(f"{art['file']}: skipped: {version_or_reason}")
            report["artifacts"].append(entry)
            continue
        say(f"{art['file']} ({art['format']} {art.get('precision')}) in {runtime} {version_or_reason}")
        try:
            entry.update(check_artifact(bundle, manifest, art, threads, warmup, runs, say, runtime, emulated,
                                        args.outputs))
        except ArtifactRuntimeError as exc:
            entry.update(status="error", reason=str(exc))
            say(f"  ERROR: {exc}")
            exit_code = EXIT_RUNTIME
            report["artifacts"].append(entry)
            continue
        for line in _summary(entry["parity"]):
            say("  " + line)
        agreement = entry["host_agreement"]
        say("  vs host outputs: " + ("identical" if agreement["identical"] else ", ".join(
            f"{o['name']} max diff {o.get('max_abs_diff', o.get('detail'))}" for o in agreement["outputs"])))
        if "fully_accelerated" in entry:
            say("  GPU: " + ("every op on the GPU" if entry["fully_accelerated"] else
                             "some ops run on the CPU (LiteRT's log above names them)"))
        lat = entry["latency"]
        say(f"  {'emulated time (not device latency)' if emulated else 'latency'}: p50 {lat['p50_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms, min {lat['min_ms']:.3f} ms "
            f"({lat['runs']} runs, {threads} thread(s)); {'PASS' if entry['status'] == 'passed' else 'PARITY FAILED'}")
        if entry["status"] != "passed" and exit_code == EXIT_PASS:
            exit_code = EXIT_PARITY
        report["artifacts"].append(entry)
    report["exit_code"] = exit_code
    report["passed"] = exit_code == EXIT_PASS
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="device/validate.py",
                                     description="Check an edgepack bundle's artifacts on this device: "
                                                 "checksums, parity against the golden outputs, latency.")
    parser.add_argument("--bundle", help="bundle directory (default: the one this script is in)")
    parser.add_argument("--artifact", help="check only this file, e.g. model.tflite")
    parser.add_argument("--runs", type=int, help="timed runs (default: the profile's latency.runs)")
    parser.add_argument("--warmup", type=int, help="untimed warmup runs (default: the profile's latency.warmup)")
    parser.add_argument("--threads", type=int, help="runtime threads (default: the profile's device.threads)")
    parser.add_argument("--gpu", action="store_true",
                        help="run .tflite files on the GPU (LiteRT's GPU accelerator) instead of the CPU interpreter")
    parser.add_argument("--report", default="device_report.json", help="where to write the report")
    parser.add_argument("--json", action="store_true", help="print the report on stdout")
    parser.add_argument("--outputs", help="write the artifact's raw outputs (every golden sample) to this .npz; "
                                          "needs --artifact")
    parser.add_argument("--emulated", default=os.environ.get("EDGEPACK_EMULATED"),
                        help="this run is under an emulator (e.g. 'qemu-aarch64 10.0.2 -cpu cortex-a76'): the report "
                             "says so and its seconds are labelled emulated, not device latency (also EDGEPACK_EMULATED)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    def say(message):
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    if np is None:
        print("error: numpy is not installed\n  hint: pip install numpy", file=sys.stderr)
        return EXIT_SETUP
    try:
        try:
            report = run(args, say)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:  # a manifest field of the wrong shape
            raise SetupError(f"manifest.json is malformed ({type(exc).__name__}: {exc})",
                             "use the device/validate.py shipped with this bundle, or rebuild it") from exc
    except SetupError as exc:
        print(f"error: {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        report = {"schema_version": REPORT_SCHEMA_VERSION, "kind": REPORT_KIND, "created_by": TOOL,
                  "created_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "passed": False, "exit_code": EXIT_SETUP, "error": exc.message, "artifacts": []}
    try:
        write_report(args.report, report)
        say(f"report: {os.path.abspath(args.report)}")
    except OSError as exc:
        print(f"error: cannot write {args.report}: {exc}\n  hint: pass --report to a writable path", file=sys.stderr)
        return EXIT_SETUP
    if args.json:
        json.dump(json_safe(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    if report["exit_code"] == EXIT_PASS:
        say("PASS")
    elif report["exit_code"] == EXIT_PARITY:
        say("FAIL: parity")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
