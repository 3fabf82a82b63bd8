#!/usr/bin/env python
"""Calibrate edgepack's device latency estimate (edgepack/costmodel.py) for arm64 phone CPUs.

    .venv/bin/python benchmarks/costmodel_fit.py measure   # count instructions under emulation (~30 min)
    .venv/bin/python benchmarks/costmodel_fit.py fit       # fit, check against published figures, print tables

Everything the fit reads and writes is in edgepack/costmodel_fit.json (in the repository, read by
the cost model at run time):

- ``published``: phone latencies with their sources, the phone's CPU (cores, clocks, core type) and
  which int8 kernel family the runtime used there;
- ``models``: MACs per op class (XNNPACK's kernel types: gemm = 1x1 conv and matmul, conv = spatial
  conv, depthwise) and elementwise outputs of each model's float ONNX graph (costmodel.node_costs);
- ``instructions``: executed aarch64 instructions per inference of each model's int8 and fp32
  .tflite (LiteRT's XNNPACK kernels), counted under qemu-aarch64 with edgepack's plugin: cortex-a76
  for fp32 and SDOT int8, cortex-a72 (out-of-order, no dot product) for NEON SMLAL int8;
- ``fitted``: instructions per MAC per op class and kernel family (non-negative least squares over
  the counted models), and the one constant that turns instructions into time (instructions per cycle of an
  A76-class core, fitted on the published figures, geometric mean).

``measure`` builds each model with a profile of int8 + fp32 .tflite and counts through the
product's own code (steps/arm64_check.py); ``fit`` is quick and deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgepack import costmodel  # noqa: E402

FIT = ROOT / "edgepack" / "costmodel_fit.json"
MODELS = {"digits-cnn": "models/digits_cnn.py", "mobilenet-v2": "models/mobilenet_v2.py",
          "efficientnet-lite0": "models/efficientnet_lite0.py"}
# kernel family -> the qemu CPU model whose features make XNNPACK pick it
COUNT_CPUS = {"fp32": "cortex-a76", "int8-sdot": "cortex-a76", "int8-smlal": "cortex-a72"}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_classes(spec_path: str, work: Path) -> dict:
    """MACs per op class and elementwise outputs of the model's float ONNX graph."""
    from edgepack.export.onnx_float import export_float_onnx
    from edgepack.spec import load_spec

    spec = load_spec(str(ROOT / spec_path))
    path = work / f"{spec.name}.onnx"
    export_float_onnx(spec.model, spec.example_inputs, path, spec.resolved_input_names(),
                      spec.resolved_output_names(1))
    return costmodel.class_counts(costmodel.node_costs(path))


def classes_cmd(args) -> None:
    """Recount the op classes of every model in the fit (no emulation)."""
    fit = json.loads(FIT.read_text())
    work = Path(tempfile.mkdtemp(prefix="costmodel-"))
    for name in fit["models"]:
        fit["models"][name] = {"spec": MODELS[name], **model_classes(MODELS[name], work)}
        say(f"{name}: {fit['models'][name]}")
    FIT.write_text(json.dumps(fit, indent=2) + "\n")


def measure(args) -> None:
    from edgepack.intake import load_bundle_manifest
    from edgepack.emulators import arm64_python, qemu_counting
    from edgepack.steps.arm64_check import count_artifact
    from edgepack.target import Arm64CheckSettings

    fit = json.loads(FIT.read_text())
    work = Path(tempfile.mkdtemp(prefix="costmodel-"))
    data = yaml.safe_load((ROOT / "targets" / "android-arm64.yaml").read_text())
    tflite = next(a for a in data["artifacts"] if a["format"] == "tflite")
    data.update(name="costmodel", artifacts=[tflite, {"name": "model_fp32", "format": "tflite", "precision": "fp32"}],
                parity={"calibration_samples": 8, "holdout_samples": 8})
    data["arm64_check"] = {"enabled": True, "cpus": ["cortex-a76"]}
    profile = work / "costmodel.yaml"
    profile.write_text(yaml.safe_dump(data, sort_keys=False))
    counter = qemu_counting.ensure(say)
    for name in args.models or list(MODELS):
        spec_path = MODELS[name]
        say(f"{name}: counting its float graph's ops")
        fit["models"][name] = {"spec": spec_path, **model_classes(spec_path, work)}
        say(f"{name}: edgepack build --target {profile.name} (int8 + fp32 .tflite)")
        done = subprocess.run([sys.executable, "-m", "edgepack.cli", "build", spec_path, "--target", str(profile),
                               "--out", str(work / "dist"), "--quiet", "--no-repro-check", "--no-zip"], cwd=ROOT,
                              check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name}: the build failed (exit {done.returncode})")
        bundle = next((work / "dist").glob(f"*/{profile.stem}"))
        manifest = load_bundle_manifest(bundle)
        assert manifest.model.source.endswith(spec_path), (manifest.model.source, spec_path)
        runtimes = ("litert", "onnxruntime")
        guest = arm64_python.ensure(arm64_python.runtime_pins(manifest.toolchain, runtimes), runtimes, say)
        counts = {}
        for family, cpu in COUNT_CPUS.items():
            precision = "fp32" if family == "fp32" else "int8"
            art = next(a for a in manifest.artifacts if a.precision == precision)
            settings = Arm64CheckSettings(count_cpu=cpu, count_inferences=args.inferences)
            record = count_artifact(guest, counter, bundle, manifest, art, None, settings, work, say)
            counts[family] = {"cpu": cpu, "file": art.file, "per_inference": record["per_inference"],
                              "repeatable": record["repeatable"], "by_class": record["by_class"]}
            say(f"  {family} on {cpu}: {record['per_inference']:,} instructions per inference")
        fit["instructions"][name] = counts
        FIT.write_text(json.dumps(fit, indent=2) + "\n")
        shutil.rmtree(bundle.parent)  # the next model's bundle is then the only one under dist/
    say(f"wrote {FIT}")


def solve(fit: dict) -> dict:
    """Per kernel family, the instructions around each multiply-accumulate instruction (loads, address
    arithmetic, requantization): every counted model's executed instructions over the MAC
    instructions its op classes need (fit["key_instructions_per_mac"]: an SDOT does 16 int8 MACs, an
    FMLA 4 fp32 ones...), geometric mean over the models. Instructions per MAC of a class = its key
    instructions per MAC x that overhead."""
    fitted = {}
    for family in COUNT_CPUS:
        key = fit["key_instructions_per_mac"][family]
        ratios = []
        for name, counts in fit["instructions"].items():
            classes = fit["models"][name]
            needed = sum(classes[f"{c}_macs"] * key[c] for c in costmodel.MAC_CLASSES)
            ratios.append(counts[family]["per_inference"] / needed)
        overhead = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        fitted[family] = {**{c: round(key[c] * overhead, 5) for c in costmodel.MAC_CLASSES}, "elementwise": 0.0,
                          "overhead": round(overhead, 4), "overhead_per_model": [round(r, 3) for r in ratios]}
    return fitted


def fit_cmd(args) -> None:
    fit = json.loads(FIT.read_text())
    fit["fitted"]["instructions_per"] = solve(fit)
    fit["fitted"]["instructions_per_cycle"] = 1.0
    ratios = [row["ms"] / costmodel.calibrated_ms(fit["models"][row["model"]], row["precision"], row["device"], fit)
              for row in fit["published"]]
    # time scales as 1/IPC: the IPC that minimises the log errors is the geometric mean of the ratios' inverses
    fit["fitted"]["instructions_per_cycle"] = round(1.0 / math.exp(sum(math.log(r) for r in ratios) / len(ratios)), 4)
    rows = []
    for row in fit["published"]:
        estimate = costmodel.calibrated_ms(fit["models"][row["model"]], row["precision"], row["device"], fit)
        rows.append({**{k: row[k] for k in ("model", "precision", "phone", "runtime", "ms")},
                     "estimate_ms": round(estimate, 2), "error": round(estimate / row["ms"] - 1, 4)})
    fit["residuals"] = rows
    FIT.write_text(json.dumps(fit, indent=2) + "\n")
    print("| model | precision | phone (CPU, threads) | runtime | published ms | estimate ms | error |")
    print("|---|---|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['model']} | {row['precision']} | {row['phone']} | {row['runtime']} | {row['ms']} | "
              f"{row['estimate_ms']:.2f} | {100 * row['error']:+.0f}% |")
    print(f"\ninstructions per cycle (A76-class core): {fit['fitted']['instructions_per_cycle']}")
    print(json.dumps(fit["fitted"]["instructions_per"], indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="count instructions per inference under emulation (builds each model)")
    m.add_argument("--models", nargs="*", choices=list(MODELS))
    m.add_argument("--inferences", type=int, default=2, help="N of the counting window (default 2)")
    sub.add_parser("classes", help="recount the models' op classes from their graphs (no emulation)")
    sub.add_parser("fit", help="fit the estimate and print its error against each published figure")
    args = parser.parse_args(argv)
    {"measure": measure, "classes": classes_cmd, "fit": fit_cmd}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
