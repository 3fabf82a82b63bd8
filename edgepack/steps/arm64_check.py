"""The device kit on real arm64 code, without a phone: device/validate.py runs under qemu-aarch64
user mode, once per CPU model, on the sealed bundle, and its outputs are judged here.

    records = check_bundle(root, manifest, settings, say=print)    # {file: EmulatedArm64Check}

Why: XNNPACK, LiteRT and onnxruntime pick their int8 kernels per instruction set (NEON SMLAL
without dot product, SDOT on A76-class cores, SMMLA with i8mm, SME on the newest), and those are
what a phone runs; the build host runs x86 kernels. Per artifact and CPU model the record holds
parity against the float reference (edgepack.parity, the build's thresholds, from the raw
outputs the kit writes), whether the outputs equal the build host's bit for bit
(golden/<file>.outputs.npz), the CPU features the guest saw and the kernel family they select
(inferred), and the emulated wall seconds, labelled: never latency. A parity failure, or a
difference from the host for a precision in ``identical``, fails the artifact (exit 1); a crash or
hang under emulation is a RuntimeCheckError (exit 3); an emulator that cannot be set up raises
EmulatorUnavailable (exit 2) when ``required``, else every artifact records skipped.

The kit that runs is this edgepack's own device/validate.py: a bundle is untrusted input and
qemu-user is no sandbox (the guest's system calls are the host's), so a bundle's script is never
executed here; the record says whether the bundle's copy is byte-identical to it.

With ``count_instructions``, each artifact and its float sibling (the bundle's fp32 artifact of
that format, else the fp32 baseline the build exported to time it) run N, N again and 2N times
under the plugin-enabled qemu (emulators/qemu_counting.py), the main thread counted in a window
around the inferences: (window(2N) - window(N)) / N is the executed aarch64 instructions per
inference. LiteRT and ExecuTorch counts repeat to the instruction; onnxruntime starts a helper
thread at import and its window moved by up to 192 of 381,726 instructions between runs
(``spread`` records it).

With a build cache (a build's, never `validate --arm64`'s), each emulated run's raw outputs and
the kit's report are stored under a key naming everything they are a function of: the artifact's
bytes, its golden inputs and IO, the kit's bytes, the guest (qemu version and package, the arm64
Python, the wheels' versions), the CPU model and the thread count. A rebuild with the same key
runs nothing under qemu and judges the stored outputs again with this build's thresholds and
golden data, so changed tolerances re-judge rather than reuse a verdict; the run's ``cache``
says it was a hit, when and where it was emulated. Instruction counts are not cached.

EDGEPACK_ARM64_CHECK=off (switched_off) makes a build record every artifact it would have run as
skipped, without setting anything up: the test suite's default, so that a test building an
Android profile for another reason pays no emulator; `validate --arm64` is an explicit request and
ignores it.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Callable

from ..bundle import ArtifactEntry, EmulatedArm64Check, EmulatedArm64Run, Manifest, sha256_file
from ..cache import BuildCache, stamp
from ..emulators import arm64_python, qemu, qemu_counting
from ..errors import BundleError, ConfigError, EmulatorUnavailable, RuntimeCheckError
from ..export import RUNTIME_FOR_FORMAT
from ..intake import confined, load_golden
from ..measure import usable_cpus
from ..parity import compare
from ..runtimes import forkserver
from ..runtimes.base import from_native
from .golden import Golden, agreement, recorded_masks

KIT = "device/validate.py"
OPT_IN = {"executorch": "opt-in: ExecuTorch under emulation needs 2.7 GB of aarch64 wheels; add executorch to "
                        "arm64_check.runtimes, or validate --arm64 --executorch (PyPI's aarch64 torch is the CUDA build)"}


SWITCH = "EDGEPACK_ARM64_CHECK"
SWITCHED_OFF = f"switched off ({SWITCH}=off)"


def switched_off() -> bool:
    """EDGEPACK_ARM64_CHECK: ``off`` skips a build's emulated runs; unset or ``on`` runs them."""
    setting = os.environ.get(SWITCH, "").strip().lower()
    if setting not in ("", "on", "off"):
        raise ConfigError(f"{SWITCH}={setting!r}: give on or off", f"unset {SWITCH} to run the profile's arm64_check")
    return setting == "off"


def _runnable(art: ArtifactEntry) -> bool:
    return bool(art.file and art.files and art.golden and art.io and art.parity)


def check_bundle(root: Path, manifest: Manifest, settings, *, say: Callable[[str], None],
                 floats: dict[str, Path] | None = None, only: str | None = None,
                 progress: Callable[[str], None] | None = None, passed_only: bool = False, off: bool = False,
                 cache: BuildCache | None = None) -> dict[str, EmulatedArm64Check]:
    """settings: the profile's Arm64CheckSettings (cpus, runtimes, identical, counting, required).
    floats: format -> an fp32 sibling to count against when the bundle ships none; progress: where
    the set-up's lines go (a line per download; default: say); passed_only: leave out artifacts
    the build already failed (their failure is recorded once); off: record what would run as
    skipped (EDGEPACK_ARM64_CHECK=off) and set nothing up; cache: the build cache for the emulated
    runs' outputs (None: run every one)."""
    records: dict[str, EmulatedArm64Check] = {}
    chosen = []
    for art in manifest.artifacts:
        if not _runnable(art) or (only is not None and art.file != only):
            continue
        runtime = RUNTIME_FOR_FORMAT.get(art.format)
        if passed_only and art.status != "ok":
            records[art.file] = EmulatedArm64Check(status="skipped", reason=f"its build status is {art.status}")
        elif runtime in settings.runtimes:
            chosen.append(art)
        else:
            records[art.file] = EmulatedArm64Check(
                status="skipped", reason=OPT_IN.get(runtime, f"{runtime} is not in arm64_check.runtimes"))
    if off:
        return {**records, **{a.file: EmulatedArm64Check(status="skipped", reason=SWITCHED_OFF) for a in chosen}}
    if not chosen:
        return records
    # The emulated runs use none of this process's runtime servers, which would idle through them
    # (MobileNetV2 android-arm64: 1,927 MB tree PSS during its cortex-a76 run, ExecuTorch's server
    # 310 MB of it); a later session starts its server again.
    forkserver.stop_fork_servers()
    runtimes = tuple(sorted(settings.runtimes))  # one guest site per runtime set, whichever files need it
    say(f"setting up the arm64 guest ({', '.join(runtimes)}; once per cache)")
    try:
        guest = arm64_python.ensure(arm64_python.runtime_pins(manifest.toolchain, runtimes), runtimes, progress or say)
        counter = qemu_counting.ensure(progress or say) if settings.count_instructions else None
    except EmulatorUnavailable as exc:
        if settings.required:
            raise
        return {**records, **{a.file: EmulatedArm64Check(status="skipped", reason=f"{exc.message} (hint: {exc.hint})")
                              for a in chosen}}
    kit = _kit(root)
    with tempfile.TemporaryDirectory(prefix="edgepack-arm64-") as scratch:
        for art in chosen:
            golden = Golden.load(root, manifest, art)
            keys = {cpu: run_key(cache, guest, kit, root, manifest, art, cpu) for cpu in settings.cpus} if cache else {}
            stored = bool(keys) and all(cache.get("arm64-run", key) for key in keys.values())  # replayed: in turn
            runs = _each_cpu(art.file, list(settings.cpus), say, lambda cpu, said: _run_kit(
                guest, kit, root, manifest, art, golden, cpu, settings, Path(scratch), said, cache, keys.get(cpu)),
                not stored)
            failed = [r for r in runs if r.status == "failed"]
            record = EmulatedArm64Check(
                status="failed" if failed else "passed", reason="; ".join(f"{r.cpu}: {r.reason}" for r in failed) or None,
                emulator={**guest.describe(), "kit": kit["note"]}, runs=runs)
            if counter is not None:
                float_path = _float_sibling(root, manifest, art, floats or {})
                record.instructions = count_artifact(guest, counter, root, manifest, art, float_path, settings,
                                                     Path(scratch), say)
            records[art.file] = record
    return records


def _each_cpu(file: str, cpus: list[str], say: Callable[[str], None], run: Callable, at_once: bool = True) -> list:
    """``run(cpu, say)`` for every CPU model, in the order given, (``at_once``) as many at once as
    this process has CPUs: each emulation keeps one host thread busy, so on 2 cores the cortex-a53
    and cortex-a76 runs overlap. Run at once, they are one step (one line) of the build's timings."""
    workers = min(len(cpus), usable_cpus()) if at_once else 1
    if workers < 2:
        return [run(cpu, say) for cpu in cpus]
    say(f"running {file} under qemu-aarch64 -cpu {', '.join(cpus)} at once (the device kit on arm64 code; emulated)")
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgepack-arm64") as pool:
        return list(pool.map(lambda cpu: run(cpu, lambda message: None), cpus))


def _kit(root: Path) -> dict:
    """This edgepack's device kit (the one that runs), and whether the bundle ships the same bytes."""
    with resources.as_file(resources.files("edgepack.device").joinpath("validate.py")) as path:
        mine = Path(path)
    try:
        same = sha256_file(confined(root, KIT)) == sha256_file(mine)
    except (BundleError, OSError):  # missing, a link, unreadable: not the same
        same = False
    note = ("the bundle's device/validate.py (byte-identical to this edgepack's)" if same else
            "this edgepack's device/validate.py (the bundle's copy differs; a bundle's script is never run here)")
    return {"path": mine, "same": same, "note": note, "sha256": sha256_file(mine)}


def run_key(cache: BuildCache, guest, kit: dict, root: Path, manifest: Manifest, art: ArtifactEntry, cpu: str) -> str:
    """What one emulated run's outputs are a function of (the bytes, read from the bundle)."""
    return cache.key({
        "kind": "arm64-run", "cpu": cpu, "guest": guest.describe(), "kit": kit["sha256"],
        "artifact": [[item.path, sha256_file(confined(root, item.path))] for item in art.files],
        "inputs": sha256_file(confined(root, art.golden.inputs)), "io": art.io.model_dump(mode="json"),
        "threads": (manifest.target.profile.get("device") or {}).get("threads")})


def _emulate(guest, kit: dict, root: Path, art: ArtifactEntry, cpu: str, settings, scratch: Path,
             say: Callable[[str], None]) -> tuple[Path, Path, float]:
    """The kit under qemu for one CPU model: (its report, its raw outputs, emulated seconds).
    A crash, a hang or a kit that could not check the artifact is a RuntimeCheckError."""
    what = f"{art.file} under qemu-aarch64 -cpu {cpu}"
    say(f"running {what} (the device kit on arm64 code; emulated)")
    report, outputs = scratch / f"{art.file}.{cpu}.json", scratch / f"{art.file}.{cpu}.npz"
    argv = [str(kit["path"]), "--bundle", str(root), "--artifact", art.file, "--runs", "1", "--warmup", "0", "--quiet",
            "--report", str(report), "--outputs", str(outputs), "--emulated", f"{guest.emulator.version}, -cpu {cpu}"]
    done = qemu.run(guest.command(cpu, argv), env=guest.environment(), timeout_s=settings.timeout_s, what=what)
    kit_report = _read_report(report)
    entry = next(iter(kit_report.get("artifacts") or []), {})
    if done.returncode not in (0, 1) or entry.get("status") not in ("passed", "parity-failed"):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        why = entry.get("reason") or kit_report.get("error") or tail
        raise RuntimeCheckError(f"{what}: the device kit ended with {qemu.ended_by(done.returncode)}: {why[:600]}",
                                "run the same with --debug, or `edgepack validate BUNDLE --arm64 --cpu CPU`")
    return report, outputs, done.seconds


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _cached_emulation(cache: BuildCache | None, guest, kit: dict, root: Path, art: ArtifactEntry, cpu: str,
                      settings, scratch: Path, say: Callable[[str], None],
                      key: str | None) -> tuple[dict, Path, float, dict | None]:
    """(the kit's report, its raw outputs, emulated seconds, the cache record or None): through the
    build cache when there is one, under ``key`` (run_key). Only a run that checked the artifact
    is stored."""
    if cache is None:
        report, outputs, seconds = _emulate(guest, kit, root, art, cpu, settings, scratch, say)
        return _read_report(report), outputs, seconds, None
    with cache.claim("arm64-run", key) as slot:
        if slot.entry is None:
            report, outputs, seconds = _emulate(guest, kit, root, art, cpu, settings, scratch, say)
            slot.store([report, outputs], {"seconds": seconds, "host": platform.node(), "cpu": cpu, "file": art.file})
        else:
            say(f"{art.file} under qemu-aarch64 -cpu {cpu}: cached emulated run (key {key[:12]}), judged again")
    stored = {path.suffix: path for path in slot.entry.files}  # read in place: entries are never rewritten
    record = slot.entry.record
    note = {"hit": slot.hit, "key": key, "emulated_at": stamp(record["created"]), "host": record.get("host")}
    return _read_report(stored[".json"]), stored[".npz"], float(record["seconds"]), note


def _run_kit(guest, kit: dict, root: Path, manifest: Manifest, art: ArtifactEntry, golden: Golden, cpu: str,
             settings, scratch: Path, say: Callable[[str], None], cache: BuildCache | None = None,
             key: str | None = None) -> EmulatedArm64Run:
    """One CPU model's run (or its cached outputs under ``key``, run_key's), judged against the
    bundle's golden data with the artifact's recorded thresholds."""
    kit_report, outputs, seconds, cached = _cached_emulation(cache, guest, kit, root, art, cpu, settings, scratch,
                                                             say, key)
    entry = next(iter(kit_report.get("artifacts") or []), {})
    samples = len(golden.reference)
    specs = golden.out_specs
    raw = load_golden(outputs, {t.name: (samples, *t.shape) for t in specs}, {t.name: t.dtype for t in specs})
    native = [[raw[t.name][i] for t in specs] for i in range(samples)]
    parity = compare(golden.reference, [from_native(n, specs) for n in native], art.parity.get("thresholds") or {},
                     golden.output_names, golden.score_outputs(art),
                     recorded_masks(root, manifest, art.parity.get("outputs") or [], samples))
    same = agreement(native, golden.host, specs)
    reasons = []
    if not parity.passed:
        reasons.append("parity failed: " + "; ".join(f for o in parity.outputs for f in o.failures))
    if art.precision in settings.identical and not same["identical"]:
        worst = ", ".join(f"{o['name']} max diff {o.get('max_abs_diff')} in {o.get('mismatched_values')} value(s)"
                          for o in same["outputs"] if not o["identical"])
        reasons.append(f"outputs differ from the build host's ({worst}); {art.precision} must be bit-identical "
                       f"(arm64_check.identical)")
    features = (kit_report.get("device") or {}).get("features") or []
    return EmulatedArm64Run(
        cpu=cpu, status="failed" if reasons else "passed", reason="; ".join(reasons) or None, features=features,
        kernel_family={**qemu.kernel_family(features, art.precision), "evidence": qemu.FAMILY_EVIDENCE},
        runtime=entry.get("runtime"), runtime_version=entry.get("runtime_version"), parity=parity.to_dict(),
        bit_identical=same["identical"], host_agreement=same,
        seconds={"label": qemu.NOT_DEVICE_TIME, "wall": seconds}, cache=cached)


# --- instructions per inference --------------------------------------------------------------

def _float_sibling(root: Path, manifest: Manifest, art: ArtifactEntry, floats: dict[str, Path]) -> tuple[Path, str] | None:
    if art.precision == "fp32":
        return None
    shipped = next((a for a in manifest.artifacts if a.format == art.format and a.precision == "fp32" and _runnable(a)),
                   None)
    if shipped is not None:
        return confined(root, shipped.file), f"artifact {shipped.file}"
    if art.format in floats:
        return Path(floats[art.format]), "fp32 baseline the build exported to time it (not shipped)"
    return None


def count_artifact(guest, counter, root: Path, manifest: Manifest, art: ArtifactEntry,
                   float_sibling: tuple[Path, str] | None, settings, scratch: Path,
                   say: Callable[[str], None]) -> dict:
    """Executed aarch64 instructions per inference of the artifact (and of its float sibling) under
    settings.count_cpu; repeatable is True when a second count of N inferences gave the same number."""
    runtime = RUNTIME_FOR_FORMAT[art.format]
    cpu, n = settings.count_cpu, settings.count_inferences
    mine = _count(guest, counter, runtime, confined(root, art.file), confined(root, art.golden.inputs), cpu, n,
                  settings.timeout_s, scratch, say)
    result = {"cpu": cpu, "inferences": n, "per_inference": mine["per_inference"], "by_class": mine["by_class"],
              "repeatable": mine["repeatable"], "counts": mine["counts"],
              "spread": mine["spread"],
              "method": (f"executed aarch64 instructions (qemu TCG plugin insnclass) of the main thread in a window "
                         f"around N={n} and 2N inferences of golden sample 0 (after 2 untimed ones), one runtime "
                         f"thread; per inference = (window(2N) - window(N)) / N; {' '.join(qemu.DETERMINISTIC_FLAGS)}, "
                         f"PYTHONHASHSEED=0, fixed-length arguments"),
              "emulator": counter.describe()}
    if float_sibling is not None:
        path, source = float_sibling
        other = _count(guest, counter, runtime, path, confined(root, manifest.golden.inputs), cpu, n,
                       settings.timeout_s, scratch, say)
        result["float_sibling"] = {"source": source, "per_inference": other["per_inference"],
                                   "by_class": other["by_class"], "repeatable": other["repeatable"],
                                   "spread": other["spread"]}
        result["ratio_to_float"] = round(mine["per_inference"] / other["per_inference"], 4)
    return result


def _count(guest, counter, runtime: str, model: Path, inputs: Path, cpu: str, n: int, timeout_s: float,
           scratch: Path, say: Callable[[str], None]) -> dict:
    """The counting window (the marking thread, around the timed inferences: guest_count.py) of N,
    N again and 2N inferences; per inference = (window(2N) - window(N)) / N."""
    with resources.as_file(resources.files("edgepack.emulators").joinpath("guest_count.py")) as script:
        windows = {}
        for label, times in (("n", n), ("n_again", n), ("2n", 2 * n)):
            out = scratch / f"count-{label}.json"
            say(f"counting instructions: {model.name}, {times} inference(s) under -cpu {cpu} (emulated)")
            command = guest.command(cpu, [str(script), runtime, str(model), str(inputs), f"{times:06d}"],
                                    deterministic=True, extra=counter.command_extra(out), binary=counter.binary)
            done = qemu.run(command, env=guest.environment(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"),
                            timeout_s=timeout_s, what=f"counting {model.name} under -cpu {cpu}")
            window = json.loads(out.read_text()).get("window") if done.returncode == 0 else None
            if window is None:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise RuntimeCheckError(f"counting {model.name} under -cpu {cpu}: {qemu.ended_by(done.returncode)}"
                                        f"{'' if done.returncode else ', no counting window'}: {tail[:400]}",
                                        "run `edgepack arm64-setup --counts` again, or report this")
            windows[label] = window
    per = {k: (windows["2n"][k] - windows["n"][k]) / n for k in windows["n"] if k != "vcpu"}
    return {"per_inference": round(per["total"]), "repeatable": windows["n"] == windows["n_again"],
            "spread": abs(windows["n"]["total"] - windows["n_again"]["total"]),
            "by_class": {k: round(v) for k, v in per.items() if k != "total" and v},
            "counts": {label: windows[label]["total"] for label in windows}}
