#!/usr/bin/env python
"""edgepack benchmark: pipeline cost, artifact quality and plain-toolchain baselines, side by side.

    .venv/bin/python benchmarks/run.py            # full run (digits, MobileNetV2 224, tiny encoder if it loads)
    .venv/bin/python benchmarks/run.py --quick    # smoke test: digits only, fewer latency runs
    .venv/bin/python benchmarks/run.py --models digits --targets x86-64,android-arm64

Per model: (1) load the spec once (trains and caches the digits CNN, so training is not timed);
(2) per target, time `edgepack build SPEC --target T --json --quiet --keep-going --out TMP` in a
child process (wall, CPU, peak RSS of the tree); (3) export the plain baselines (baselines.py),
one child per toolchain; (4) run every baseline and every built artifact through edgepack's
RuntimeSession on the same input (calibration sample 0) with the profile's threads, warmup and
runs, one after another; (5) write benchmarks/results/latest.{json,md,png} and print the table
and PASS/MISS per target line. A failing combination is recorded with its reason; the run goes on.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `benchmarks.*` when run as a script

from benchmarks import report  # noqa: E402
from benchmarks.baselines import BASELINES, EAGER, FLOAT_OF_FORMAT, GROUPS  # noqa: E402
from benchmarks.proc import run_measured  # noqa: E402

MODELS = {"digits": "models/digits_cnn.py", "mobilenet-v2": "models/mobilenet_v2.py",
          "tiny-encoder": "models/tiny_encoder.py"}
TARGETS = ("x86-64", "android-arm64", "android-gpu")
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"
BASELINE_CALIBRATION = 64   # the pipeline exporters' default calibration cap, so both see the same samples
QUICK_WARMUP, QUICK_RUNS = 2, 20  # 20 is the profile schema's minimum
ARM64_COUNT_CPU = "cortex-a76"  # instructions per inference are counted under this CPU model
_START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: digits only, warmup {QUICK_WARMUP} / runs {QUICK_RUNS}")
    parser.add_argument("--models", help=f"comma-separated: {', '.join(MODELS)} or spec file paths")
    parser.add_argument("--targets", help=f"comma-separated: {', '.join(TARGETS)}")
    parser.add_argument("--warmup", type=int, help="override every profile's latency warmup (pipeline and baselines)")
    parser.add_argument("--runs", type=int, help="override every profile's latency runs (>= 20)")
    parser.add_argument("--mobilenet-res", type=int, default=224, help="EDGEPACK_MNV2_RES (default 224)")
    parser.add_argument("--mobilenet-width", type=float, default=1.0, help="EDGEPACK_MNV2_WIDTH (default 1.0)")
    parser.add_argument("--build-timeout", type=float, default=1800.0, help="seconds per build or export child")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep-work", action="store_true", help=f"keep bundles and baseline files under {WORK}")
    parser.add_argument("--no-arm64-counts", dest="arm64_counts", action="store_false",
                        help="build android-arm64 with its shipped arm64_check only: no instruction counts (default: "
                             "counted, building the counting qemu on first use)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: re-check the targets and rewrite the .md/.png of a results JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or "digits"
        args.warmup = QUICK_WARMUP if args.warmup is None else args.warmup
        args.runs = QUICK_RUNS if args.runs is None else args.runs
    if args.runs is not None and args.runs < 20:
        parser.error("--runs must be >= 20 (the profile schema's minimum)")
    by_path = {path: key for key, path in MODELS.items()}
    args.model_list = [by_path.get(m.strip().removeprefix("./"), m.strip())
                       for m in (args.models or ",".join(MODELS)).split(",") if m.strip()]
    args.target_list = [t.strip() for t in (args.targets or ",".join(TARGETS)).split(",") if t.strip()]
    if not args.model_list or not args.target_list:
        parser.error("--models and --targets need at least one name each")
    return args


def machine_info() -> dict:
    from edgepack.provenance import host_info, toolchain_versions

    info = host_info()
    info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_flags"] = _cpu_flags()
    try:
        info["mem_total_mb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (ValueError, OSError):
        pass
    return {"machine": info, "toolchain": toolchain_versions()}


def _cpu_flags() -> list[str]:
    """The SIMD features host latency depends on (int8 kernels differ with and without VNNI)."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
              "asimd", "asimddp", "i8mm", "sve")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                present = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def resolve_targets(names: list[str], args, workdir: Path) -> dict[str, dict]:
    """name -> {profile, arg (what --target gets), threads, warmup, runs}. With --warmup/--runs,
    the builds get a copy of the shipped profile with only `latency` changed."""
    import yaml

    from edgepack.target import load_target, targets_dir

    resolved = {}
    for name in names:
        profile = load_target(name)
        target_arg = name
        counts = args.arm64_counts and profile.arm64_check.enabled and profile.name == "android-arm64"
        if args.warmup is not None or args.runs is not None or counts:
            # Edit the profile's own YAML, not a dump of the loaded model: a dump would pin every
            # default as of now, and defaults may change while the run goes on.
            source = Path(name) if Path(name).is_file() else targets_dir() / f"{name}.yaml"
            data = yaml.safe_load(source.read_text())
            data["latency"] = {"warmup": args.warmup if args.warmup is not None else profile.latency.warmup,
                               "runs": args.runs if args.runs is not None else profile.latency.runs}
            if counts:  # instructions per inference vs the float sibling, for the shipped runtimes: not the
                # .pte, whose guest needs ExecuTorch's 2.7 GB of aarch64 wheels and ~15 min of emulation for
                # its six count runs on this host (opt-in: add executorch to arm64_check.runtimes)
                data["arm64_check"] = {**data["arm64_check"], "count_instructions": True, "count_cpu": ARM64_COUNT_CPU}
            path = workdir / "targets" / f"{profile.name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            profile = load_target(path)
            target_arg = str(path)
        resolved[name] = {"profile": profile, "arg": target_arg,
                          "threads": min(profile.device.threads, os.cpu_count() or 1),
                          "warmup": profile.latency.warmup, "runs": profile.latency.runs}
    return resolved


# --------------------------------------------------------------------------- per model

def timings_coverage(manifest: dict, wall_s: float) -> float | None:
    """The share of a build's wall time (measured around its process) its manifest's steps account for."""
    timings = manifest.get("timings") or []
    return round(sum(float(t.get("seconds") or 0) for t in timings) / wall_s, 3) if timings and wall_s else None


class ModelRun:
    """Everything measured for one model: builds, baseline exports, latency block."""

    def __init__(self, key: str, spec_path: str, targets: dict[str, dict], args, workdir: Path):
        self.key, self.spec_path, self.targets, self.args = key, spec_path, targets, args
        self.workdir = workdir / key.replace("/", "_")
        self.info: dict = {"key": key, "spec": spec_path}
        self.pipeline: list[dict] = []
        self.rows: list[dict] = []
        self.exports: dict[str, dict] = {}     # baseline name -> export record
        self.export_cost: list[dict] = []      # one per toolchain group child
        self.manifests: dict[str, dict] = {}   # target -> manifest
        self.arm64: list[dict] = []            # per artifact: its emulated arm64 runs and instruction counts
        self.bundles: dict[str, Path] = {}
        self.spec = None

    # 1 -------------------------------------------------------------------
    def load_spec(self) -> bool:
        from edgepack.errors import EdgepackError
        from edgepack.spec import calibration_list, load_spec

        if not (ROOT / self.spec_path).is_file():
            self.info.update(status="skipped", reason=f"{self.spec_path} does not exist")
            return False
        say(f"{self.key}: loading {self.spec_path} (trains and caches weights on first use; not timed)")
        start = time.perf_counter()
        try:
            spec = load_spec(str(ROOT / self.spec_path))
            example = tuple(spec.example_inputs)
            self.calibration = calibration_list(spec.calibration, "calibration", example, 1024)
            self.holdout = (calibration_list(spec.holdout, "holdout", example, 1024)
                            if spec.holdout is not None else [])
        except EdgepackError as exc:
            self.info.update(status="skipped", reason=f"spec does not load: {exc.message}")
            return False
        self.spec = spec
        self.info.update(status="ok", name=spec.name, spec_load_s=round(time.perf_counter() - start, 2),
                         params=int(sum(p.numel() for p in spec.model.parameters())),
                         inputs=[[list(t.shape), str(t.dtype)] for t in example], notes=list(spec.notes))
        return True

    # 2 -------------------------------------------------------------------
    def build_all(self) -> None:
        for target, t in self.targets.items():
            out = self.workdir / "dist"
            argv = [sys.executable, "-m", "edgepack.cli", "build", self.spec_path, "--target", t["arg"],
                    "--json", "--quiet", "--keep-going", "--out", str(out)]
            say(f"{self.key}: edgepack build --target {target} (cold: an empty build cache)")
            # Cold: a build cache of its own, empty; then the same build again, which must be all hits.
            cache = self.workdir / f"build-cache-{target}"
            shutil.rmtree(cache, ignore_errors=True)
            env = {**os.environ, "EDGEPACK_BUILD_CACHE": str(cache)}
            m = run_measured(argv, cwd=ROOT, env=env, timeout_s=self.args.build_timeout)
            row = {"model": self.key, "target": target, "threads": t["threads"], **m.to_dict()}
            row["argv"] = " ".join(a if a != t["arg"] else target for a in row["argv"][1:])
            manifest = m.json_stdout()
            if manifest is None:
                row.update(status="error", reason=m.failure_reason())
            else:
                row.update(status=manifest["status"], failures=manifest.get("failures", []),
                           warnings=manifest.get("warnings", []), timings_coverage=timings_coverage(manifest, m.wall_s))
                if manifest.get("failures"):
                    row["reason"] = "; ".join(f.splitlines()[0] for f in manifest["failures"])
                self.manifests[target] = manifest
                self.arm64 += arm64_rows(self.key, target, manifest)
                name = manifest["model"]["name"]
                bundle = out / name / (target if manifest["status"] == "passed" else f"{target}.failed")
                self.bundles[target] = bundle
            say(f"  {target}: {row['status']} in {m.wall_s:.1f} s, peak {m.peak_mb:.0f} MB"
                + (f" ({row['reason'][:200]})" if row.get("reason") else ""))
            if manifest is not None:
                warm = run_measured(argv, cwd=ROOT, env=env, timeout_s=self.args.build_timeout)
                again = warm.json_stdout() or {}
                row["warm"] = {"wall_s": warm.wall_s, "peak_mb": warm.peak_mb,
                               "cache_hit": (again.get("cache") or {}).get("hit"),
                               "timings_coverage": timings_coverage(again, warm.wall_s),
                               "same_payload": (again.get("package") or {}).get("payload_sha256")
                               == (manifest.get("package") or {}).get("payload_sha256")}
                say(f"  {target}: again, warm cache: {warm.wall_s:.1f} s, hit {row['warm']['cache_hit']}, "
                    f"same payload {row['warm']['same_payload']}")
            self.pipeline.append(row)

    # 3 -------------------------------------------------------------------
    def export_baselines(self) -> None:
        outdir = self.workdir / "baselines"
        for group in GROUPS:
            say(f"{self.key}: plain {group} baseline export(s)")
            argv = [sys.executable, str(ROOT / "benchmarks" / "baselines.py"), group, self.spec_path, str(outdir),
                    str(BASELINE_CALIBRATION)]
            m = run_measured(argv, cwd=ROOT, timeout_s=self.args.build_timeout)
            self.export_cost.append({"model": self.key, "group": group, **m.to_dict()})
            result_path = outdir / f"{group}.json"
            names = [b.name for b in BASELINES if b.group == group]
            if m.exit_code == 0 and result_path.is_file():
                for record in json.loads(result_path.read_text())["baselines"]:
                    self.exports[record["name"]] = record
            else:
                reason = "timed out" if m.timed_out else f"exit {m.exit_code}, signal {m.signal}: {m.stderr_tail(4)}"
                for name in names:
                    self.exports[name] = {"name": name, "status": "failed", "error": f"export child failed: {reason}"}
            for name in names:
                record = self.exports[name]
                say(f"  {name}: {record['status']}" + (f" ({record['error']})" if record.get("error") else ""))

    # 4 -------------------------------------------------------------------
    def measure(self) -> None:
        """One latency block per distinct thread count: every baseline, then every built artifact,
        each in its own RuntimeSession with the same feeds, warmup and runs."""
        import torch

        from edgepack.parity import compare

        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        feeds = [t.numpy() for t in self.calibration[0]]
        first = next(iter(self.targets.values()))["profile"]
        parity_set = self.calibration[: first.parity.calibration_samples] + self.holdout[: first.parity.holdout_samples]
        with torch.no_grad():
            reference = [_as_list(self.spec.model(*s)) for s in parity_set]
        output_names = self.spec.resolved_output_names(len(reference[0]))
        score_outputs = list(self.spec.score_outputs) if self.spec.score_outputs is not None else None
        groups: dict[int, list[str]] = {}
        for target, t in self.targets.items():
            groups.setdefault(t["threads"], []).append(target)
        quality_done: set[str] = set()
        for threads, targets in sorted(groups.items()):
            warmup, runs = self.targets[targets[0]]["warmup"], self.targets[targets[0]]["runs"]
            say(f"{self.key}: latency block, {threads} thread(s), warmup {warmup}, runs {runs}")
            for baseline in BASELINES:
                row = self._baseline_row(baseline, threads, warmup, runs)
                if row["status"] != "ok":
                    self.rows.append(row)
                    continue
                path = self.spec_path if baseline.name == EAGER else row.pop("_path")
                want_quality = baseline.name not in quality_done
                try:
                    result = self._session(baseline.runtime, path, threads, feeds, warmup, runs,
                                           parity_set if want_quality else None)
                except Exception as exc:  # noqa: BLE001 - a runtime failure is a result for this row
                    row.update(status="failed", reason=_reason(exc))
                    self.rows.append(row)
                    continue
                row.update(result["latency"])
                if want_quality:
                    quality_done.add(baseline.name)
                    parity = compare(reference, result["outputs"], {}, output_names, score_outputs)
                    row.update(_parity_figures(parity.to_dict()), accuracy=result["accuracy"])
                else:
                    row["quality_from_threads"] = "first latency block"
                self.rows.append(row)
                say(f"  {baseline.name}: p50 {row['p50_ms']:.3f} ms")
            for target in targets:
                for row, path, runtime in self._pipeline_rows(target, threads):
                    if path is not None:
                        try:
                            result = self._session(runtime, str(path), threads, feeds, warmup, runs, None)
                            row.update(result["latency"])
                            say(f"  {target}/{row['file']}: p50 {row['p50_ms']:.3f} ms (manifest {row['manifest_p50_ms']})")
                        except Exception as exc:  # noqa: BLE001 - recorded; the manifest figures stand
                            row["rebench_error"] = _reason(exc)
                            say(f"  {target}/{row['file']}: re-bench failed: {row['rebench_error']}")
                    self.rows.append(row)
        self._derive()

    def _baseline_row(self, baseline, threads: int, warmup: int, runs: int) -> dict:
        row = {"model": self.key, "source": "baseline", "label": baseline.name, "target": None,
               "format": baseline.format, "precision": baseline.precision, "runtime": baseline.runtime,
               "recipe": baseline.recipe, "threads": threads, "warmup": warmup, "runs": runs, "status": "ok"}
        if baseline.name == EAGER:
            row["bytes"] = row["zip_bytes"] = None
            return row
        record = self.exports.get(baseline.name, {"status": "failed", "error": "not exported"})
        row["export_s"] = record.get("export_s")
        if record["status"] != "ok":
            row.update(status="failed", reason=record.get("error"))
            return row
        from edgepack.measure import zip_bytes

        files = [Path(f) if Path(f).is_absolute() else ROOT / f for f in record["files"]]
        row.update(_path=str(files[0]), files=[f.name for f in files], bytes=sum(f.stat().st_size for f in files),
                   zip_bytes=zip_bytes(files))
        return row

    def _session(self, runtime: str, path: str, threads: int, feeds, warmup: int, runs: int, parity_set) -> dict:
        from edgepack.measure import latency_summary
        from edgepack.runtimes.base import from_native, to_native
        from edgepack.runtimes.session import RuntimeSession

        out: dict = {}
        with RuntimeSession(runtime, path, threads) as session:
            if parity_set is not None:
                def fn(sample):
                    native = to_native([t.numpy() for t in sample], session.inputs)
                    return tuple(torch_tensor(o) for o in from_native(session.run(native), session.outputs))

                out["outputs"] = [[np.asarray(o) for o in fn(s)] for s in parity_set]
                out["accuracy"] = ({k: float(v) for k, v in self.spec.evaluate(fn).items()}
                                   if self.spec.evaluate is not None else None)
            bench = session.bench(to_native(feeds, session.inputs), warmup, runs)
            summary = latency_summary(bench["times_ms"])
            out["latency"] = {"p50_ms": summary["p50_ms"], "p90_ms": summary["p90_ms"], "min_ms": summary["min_ms"],
                              "load_ms": round(session.load_ms, 1), "worker_peak_rss_mb": round(bench["peak_rss_mb"], 1),
                              "runtime_version": str(session.info.get("version", ""))}
        return out

    def _pipeline_rows(self, target: str, threads: int):
        """(row, path to re-bench or None, runtime) per artifact in the target's manifest."""
        from edgepack.export import RUNTIME_FOR_FORMAT

        manifest = self.manifests.get(target)
        build = next((p for p in self.pipeline if p["target"] == target), None)
        if manifest is None:
            yield ({"model": self.key, "source": "pipeline", "label": f"{target} (build failed)", "target": target,
                    "format": None, "precision": None, "threads": threads, "status": "build-failed",
                    "reason": (build or {}).get("reason")}, None, None)
            return
        float_accuracy = (manifest.get("accuracy") or {}).get("float") or {}
        for art in manifest["artifacts"]:
            file_name = art.get("file") or f"{art['name']}.{art['format']}"
            row = {"model": self.key, "source": "pipeline", "label": f"{target}/{file_name}",
                   "target": target, "file": art.get("file"), "format": art["format"], "precision": art["precision"],
                   "runtime": art.get("runtime"), "threads": threads, "status": art["status"],
                   "reason": art.get("error"), "bytes": art.get("bytes"), "zip_bytes": art.get("zip_bytes"),
                   "accuracy": art.get("accuracy"), "float_accuracy": float_accuracy or None}
            latency = art.get("latency") or {}
            row.update(manifest_p50_ms=latency.get("p50_ms"), manifest_p90_ms=latency.get("p90_ms"),
                       manifest_threads=latency.get("threads"), warmup=latency.get("warmup"), runs=latency.get("runs"),
                       ratio_to_float_reference_onnx=(art.get("size") or {}).get("ratio_to_float"))
            if art.get("parity"):
                row.update(_parity_figures(art["parity"]))
            path = self.bundles[target] / art["file"] if art.get("file") else None
            if path is not None and not path.is_file():
                path = None
            if art["status"] == "not-validated":
                # built for a device this host cannot run (a Vulkan .pte): the build said so
                row["rebench_skipped"] = "not runnable on this host (the build did not validate it)"
                path = None
            yield row, path, RUNTIME_FOR_FORMAT.get(art["format"])

    def _derive(self) -> None:
        derive(self.rows)


def arm64_rows(model: str, target: str, manifest: dict) -> list[dict]:
    """Each artifact's emulated_arm64 record, flattened: per CPU model pass / bit-identical / kernel
    family / emulated seconds, and instructions per inference against the float sibling's, beside
    the host's latency ratio of the same pair from the build."""
    rows = []
    for art in manifest["artifacts"]:
        record = art.get("emulated_arm64")
        if not record:
            continue
        counts = record.get("instructions") or {}
        sibling = counts.get("float_sibling") or {}
        host = ((art.get("latency") or {}).get("float_comparison") or {}).get("ratio_to_float")
        rows.append({"model": model, "target": target, "file": art.get("file"), "precision": art["precision"],
                     "status": record["status"], "reason": record.get("reason"),
                     "runs": [{"cpu": r["cpu"], "status": r["status"], "bit_identical": r.get("bit_identical"),
                               "kernel_family": (r.get("kernel_family") or {}).get("family"),
                               "emulated_s": (r.get("seconds") or {}).get("wall"),
                               "cosine_min": min((o["cosine_min"] for o in (r.get("parity") or {}).get("outputs", [])),
                                                 default=None)} for r in record.get("runs", [])],
                     "count_cpu": counts.get("cpu"), "instructions": counts.get("per_inference"),
                     "float_instructions": sibling.get("per_inference"), "float_source": sibling.get("source"),
                     "instruction_ratio": counts.get("ratio_to_float"), "host_p50_ratio": host,
                     "repeatable": counts.get("repeatable") if counts else None,
                     "float_repeatable": sibling.get("repeatable")})
    return rows


def derive(rows: list[dict]) -> None:
    """Derived figures of one model's rows, in place (idempotent, so --render re-derives):
    every latency over torch eager's p50 at the same thread count; bytes over the plain fp32
    baseline of the same format; accuracy against the float model's, in points."""
    eager = {r["threads"]: r["p50_ms"] for r in rows
             if r["label"] == EAGER and r["status"] == "ok" and r.get("p50_ms")}
    floats = {r["format"]: r["bytes"] for r in rows
              if r["source"] == "baseline" and r["label"] in FLOAT_OF_FORMAT.values() and r.get("bytes")}
    eager_accuracy = next((r.get("accuracy") for r in rows if r["label"] == EAGER and r.get("accuracy")), None)
    for row in rows:
        base = eager.get(row["threads"])
        for key in ("p50_ms", "p90_ms", "manifest_p50_ms"):
            if base and row.get(key):
                row[key.replace("_ms", "_x_eager")] = float(f"{row[key] / base:.4g}")
        if row.get("bytes") and row.get("format") in floats:
            row["ratio_to_float"] = round(row["bytes"] / floats[row["format"]], 4)
            row["float_artifact"] = FLOAT_OF_FORMAT[row["format"]]
        reference = row.get("float_accuracy") or eager_accuracy
        if row.get("accuracy") and reference:
            key = next(iter(row["accuracy"]))
            if key in reference:
                row["accuracy_delta_pts"] = round(100 * (row["accuracy"][key] - reference[key]), 2)


def torch_tensor(array):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))


def _as_list(result) -> list:
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t.detach().numpy() for t in items]


def _parity_figures(parity: dict) -> dict:
    from edgepack.parity import headline

    worst = headline(parity)
    if not worst:
        return {}
    top1 = worst["top1_agreement"]
    return {"cosine_min": round(worst["cosine_min"], 6), "sqnr_db": round(worst["sqnr_db"], 2),
            "top1_agreement": round(top1, 4) if top1 is not None else None,
            "parity_samples": parity.get("samples")}


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {text.strip().splitlines()[0][:300] if text.strip() else ''}"


# --------------------------------------------------------------------------- main

def write_results(result: dict, out: Path) -> None:
    result["targets"] = report.check_targets(result)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(result, out / "latest.json")
    markdown = report.markdown(result)
    report.write_text(markdown, out / "latest.md")
    plot = report.plot(result, out / "latest.png")
    print(markdown)
    warning = report.load_warning(result)
    if warning:
        say("warning: " + warning)
    if plot:
        say(f"plot not written: {plot}")
    say(f"wrote {out / 'latest.json'}, latest.md, latest.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        for model in {r["model"] for r in result["rows"]}:
            derive([r for r in result["rows"] if r["model"] == model])
        write_results(result, args.out)
        return 0
    os.environ["EDGEPACK_MNV2_RES"] = str(args.mobilenet_res)
    os.environ["EDGEPACK_MNV2_WIDTH"] = f"{args.mobilenet_width:g}"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.chdir(ROOT)
    WORK.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    say(f"work dir {workdir}")
    unknown = [t for t in args.target_list if t not in TARGETS and not Path(t).is_file()]
    if unknown:
        say(f"note: targets {unknown} are not among the shipped ones {TARGETS}; trying them anyway")
    result = {"schema": "edgepack-bench/1", "created": created, "quick": args.quick,
              "settings": {"models": args.model_list, "targets": args.target_list, "warmup_override": args.warmup,
                           "runs_override": args.runs, "mobilenet": {"resolution": args.mobilenet_res,
                                                                     "width": args.mobilenet_width},
                           "baseline_calibration_samples": BASELINE_CALIBRATION,
                           "latency_input": "calibration sample 0 of each model"},
              **machine_info(), "models": [], "pipeline": [], "export_cost": [], "rows": [], "arm64": []}
    try:
        targets = resolve_targets(args.target_list, args, workdir)
        result["targets_resolved"] = {n: {k: v for k, v in t.items() if k not in ("profile", "arg")}
                                      for n, t in targets.items()}
        for key in args.model_list:
            run = ModelRun(key, MODELS.get(key, key), targets, args, workdir)
            if run.load_spec():
                try:
                    run.build_all()
                    run.export_baselines()
                    run.measure()
                except Exception as exc:  # noqa: BLE001 - a bug here must not cost the other models' results
                    run.info.update(status="error", reason=_reason(exc), traceback=traceback.format_exc()[-3000:])
                    say(f"{key}: benchmark error, going on with the next model: {run.info['reason']}")
            else:
                say(f"{key}: skipped ({run.info['reason']})")
            result["models"].append(run.info)
            result["pipeline"] += run.pipeline
            result["export_cost"] += run.export_cost
            result["rows"] += run.rows
            result["arm64"] += run.arm64
    finally:
        if not args.keep_work:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_s"] = round(time.perf_counter() - _START, 1)
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
