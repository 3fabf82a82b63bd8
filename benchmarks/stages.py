#!/usr/bin/env python
"""Structured pruning, measured end to end: what 50% of the channels buys on the digits CNN.

    .venv/bin/python benchmarks/stages.py                      # what `make bench` runs after run.py
    .venv/bin/python benchmarks/stages.py --rounds 7 --runs 300 --threads 1,2

(1) Build models/digits_cnn.py twice with edgepack's real pipeline (`edgepack build --json` in a
child process, into a work dir): with targets/android-arm64.yaml restricted to its int8 .pte plus
an fp32 .pte (so the effect of pruning alone is visible, and the int8 one has its float sibling),
and with the same profile plus one `prune-structured` stage (ratio 0.5, l1, fine-tuned 3 epochs,
as in tests/test_stages.py). (2) Read both manifests: params and MACs before/after the stage,
top-1 of the float model, of the pruned model and of every artifact in its runtime, parity and
bytes. (3) Time each pruned/unpruned .pte pair in one session of the ExecuTorch runtime each,
both loaded at once, alternating A/B (ABBA order) over several rounds at each thread count on the
same input; the figure is the median over rounds of each round's p50, and of each round's
pruned/unpruned ratio. (4) Print PASS/MISS for issue #5's criteria and write
benchmarks/results/stages.{json,md}. A failing build is recorded with its reason; never fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `benchmarks.*` when run as a script

from benchmarks.proc import run_measured  # noqa: E402
from benchmarks.run import machine_info  # noqa: E402

SPEC = "models/digits_cnn.py"
BASE_PROFILE = "android-arm64"
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "stages"
# tests/test_stages.py::test_structured_half_channels_finetuned_keeps_accuracy
PRUNE_STAGE = {"type": "prune-structured", "ratio": 0.5, "importance": "l1", "finetune_epochs": 3}
VARIANTS = ("unpruned", "pruned")
# Issue #5's thresholds.
MIN_MACS_CUT, MIN_PARAMS_CUT, MAX_TOP1_DROP_POINTS = 0.40, 0.40, 1.0
_START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds per pair and thread count (default 5)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per artifact per round (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs before each round's timed ones")
    parser.add_argument("--threads", help="comma-separated thread counts (default: the profile's, capped at "
                                          "the host's cores, and 1)")
    parser.add_argument("--no-fp32", action="store_true", help="build and time the int8 .pte pair only")
    parser.add_argument("--build-timeout", type=float, default=1800.0, help="seconds per build child")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--keep-work", action="store_true", help=f"keep the bundles under {WORK}")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--rounds and --runs must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- builds

def write_profiles(workdir: Path, with_fp32: bool) -> tuple[dict[str, Path], int]:
    """The shipped android-arm64 profile, restricted to its int8 .pte (+ an fp32 .pte), without and
    with the prune stage. Edits the profile's own YAML so every other setting stays as shipped."""
    import yaml

    from edgepack.target import load_target, targets_dir

    data = yaml.safe_load((targets_dir() / f"{BASE_PROFILE}.yaml").read_text())
    int8_pte = [a for a in data["artifacts"] if a["format"] == "pte" and a["precision"] == "int8"]
    if len(int8_pte) != 1:
        raise SystemExit(f"{BASE_PROFILE}.yaml: expected one int8 .pte artifact, found {len(int8_pte)}")
    artifacts = int8_pte + ([{"name": "model_fp32", "format": "pte", "precision": "fp32"}] if with_fp32 else [])
    paths = {}
    for variant in VARIANTS:
        profile = dict(data, name=f"{BASE_PROFILE}-{variant}", artifacts=artifacts,
                       stages=[dict(PRUNE_STAGE)] if variant == "pruned" else [],
                       description=f"{BASE_PROFILE}, .pte only, {variant} (benchmarks/stages.py)")
        path = workdir / "targets" / f"{profile['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(profile, sort_keys=False))
        load_target(path)  # fail here, not in the child, if the edit broke the profile
        paths[variant] = path
    threads = load_target(paths["unpruned"]).device.threads
    return paths, threads


def build(variant: str, profile: Path, out: Path, timeout_s: float) -> dict:
    # --no-repro-check: the second export only compares bytes; nothing here depends on it.
    argv = [sys.executable, "-m", "edgepack.cli", "build", SPEC, "--target", str(profile), "--json", "--quiet",
            "--keep-going", "--no-zip", "--no-repro-check", "--out", str(out)]
    say(f"edgepack build {SPEC} ({variant})")
    m = run_measured(argv, cwd=ROOT, timeout_s=timeout_s)
    record = {"variant": variant, "wall_s": round(m.wall_s, 1),
              "cpu_s": round(m.cpu_user_s + m.cpu_sys_s, 1), "peak_mb": round(m.peak_mb, 1)}
    manifest = m.json_stdout()
    if manifest is None:
        reason = m.failure_reason()
        record.update(status="error", reason=reason)
        say(f"  {variant}: build failed ({reason})")
        return record
    name, target = manifest["model"]["name"], manifest["target"]["name"]
    record.update(status=manifest["status"], failures=manifest.get("failures", []),
                  warnings=manifest.get("warnings", []), manifest=manifest,
                  bundle=str(out / name / (target if manifest["status"] == "passed" else f"{target}.failed")))
    say(f"  {variant}: {manifest['status']} in {m.wall_s:.1f} s")
    return record


def summarize(builds: dict[str, dict]) -> dict:
    """Stage and artifact figures from the manifests."""
    out: dict = {"stage": None, "artifacts": {}}
    for variant, record in builds.items():
        manifest = record.get("manifest")
        if manifest is None:
            continue
        float_top1 = ((manifest.get("accuracy") or {}).get("float") or {}).get("top1")
        out.setdefault("float_top1", float_top1)
        if variant == "pruned" and manifest.get("stages"):
            stage = manifest["stages"][0]
            before, after = stage["before"], stage["after"]
            out["stage"] = {
                "type": stage["type"], "config": PRUNE_STAGE, "seconds": stage.get("seconds"),
                "params": [before["params"], after["params"]], "macs": [before["macs"], after["macs"]],
                "top1": [(before.get("metrics") or {}).get("top1"), (after.get("metrics") or {}).get("top1")],
                "channels": stage.get("details", {}).get("channels"),
            }
        for art in manifest["artifacts"]:
            parity = art.get("parity") or {}
            worst = min(parity.get("outputs") or [{}], key=lambda o: o.get("cosine_min", 1.0))
            out["artifacts"][f"{variant}/{art['precision']}"] = {
                "variant": variant, "precision": art["precision"], "file": art.get("file"), "status": art["status"],
                "error": art.get("error"), "bytes": art.get("bytes"), "zip_bytes": art.get("zip_bytes"),
                "top1": (art.get("accuracy") or {}).get("top1"), "parity_passed": parity.get("passed"),
                "cosine_min": worst.get("cosine_min"), "sqnr_db": worst.get("sqnr_db"),
                "manifest_p50_ms": (art.get("latency") or {}).get("p50_ms"),
                "path": str(Path(record["bundle"]) / art["file"]) if art.get("file") else None,
            }
    return out


# --------------------------------------------------------------------------- latency

def time_pair(paths: dict[str, str], feeds: list[np.ndarray], threads: int, rounds: int, warmup: int,
              runs: int) -> dict:
    """Both .pte files loaded at once, each in its own ExecuTorch session; per round, each is
    warmed up and timed in turn, in ABBA order so neither always runs first."""
    from edgepack.measure import latency_summary
    from edgepack.runtimes.base import to_native
    from edgepack.runtimes.session import RuntimeSession

    per_round: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with contextlib.ExitStack() as stack:
        sessions = {v: stack.enter_context(RuntimeSession("executorch", paths[v], threads)) for v in VARIANTS}
        native = {v: to_native(feeds, s.inputs) for v, s in sessions.items()}
        for r in range(rounds):
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                bench = sessions[v].bench(native[v], warmup, runs)
                per_round[v].append(latency_summary(bench["times_ms"]))
    p50 = {v: [s["p50_ms"] for s in per_round[v]] for v in VARIANTS}
    ratios = [p / u for p, u in zip(p50["pruned"], p50["unpruned"])]
    return {
        "threads": threads, "rounds": rounds, "warmup": warmup, "runs": runs,
        "p50_ms": {v: round(statistics.median(p50[v]), 4) for v in VARIANTS},
        "min_ms": {v: round(min(s["min_ms"] for s in per_round[v]), 4) for v in VARIANTS},
        "round_p50_ms": p50,
        "ratio": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "rounds_pruned_faster": sum(x < 1.0 for x in ratios),
    }


def model_inputs(bundle: str) -> list[np.ndarray]:
    """Golden model-level sample 0 (calibration sample 0: what the pipeline itself times)."""
    with np.load(Path(bundle) / "golden" / "inputs.npz") as golden:
        return [np.ascontiguousarray(golden[name][0]) for name in golden.files]


# --------------------------------------------------------------------------- criteria and report

def criteria(summary: dict, latency: list[dict], profile_threads: int) -> list[dict]:
    lines = []

    def line(text: str, passed: bool | None, value: str) -> None:
        lines.append({"criterion": text, "result": "SKIP" if passed is None else ("PASS" if passed else "MISS"),
                      "value": value})

    stage = summary.get("stage")
    if stage:
        (p0, p1), (m0, m1), (t0, t1) = stage["params"], stage["macs"], stage["top1"]
        line(f"MACs reduced >= {MIN_MACS_CUT:.0%}", 1 - m1 / m0 >= MIN_MACS_CUT,
             f"-{1 - m1 / m0:.1%} ({m0:,} -> {m1:,})")
        line(f"params reduced >= {MIN_PARAMS_CUT:.0%}", 1 - p1 / p0 >= MIN_PARAMS_CUT,
             f"-{1 - p1 / p0:.1%} ({p0:,} -> {p1:,})")
        if t0 is not None and t1 is not None:
            line(f"pruned + fine-tuned top-1 within {MAX_TOP1_DROP_POINTS} point of float",
                 (t0 - t1) * 100 <= MAX_TOP1_DROP_POINTS, f"{t1:.2%} vs {t0:.2%} ({(t1 - t0) * 100:+.2f} points)")
    else:
        line("prune stage measured", None, "the pruned build did not produce a manifest")
    float_top1 = summary.get("float_top1")
    art = summary["artifacts"].get("pruned/int8")
    if art and art.get("top1") is not None and float_top1 is not None:
        line(f"pruned int8 .pte top-1 (ExecuTorch) within {MAX_TOP1_DROP_POINTS} point of float",
             (float_top1 - art["top1"]) * 100 <= MAX_TOP1_DROP_POINTS,
             f"{art['top1']:.2%} vs {float_top1:.2%} ({(art['top1'] - float_top1) * 100:+.2f} points)")
    for block in latency:
        if block["precision"] != "int8" or "error" in block:
            continue
        primary = " (the profile's threads, capped at the cores)" if block["threads"] == profile_threads else ""
        line(f"pruned int8 .pte p50 < unpruned, {block['threads']} thread(s){primary}", block["ratio"] < 1.0,
             f"{block['p50_ms']['pruned']:.4f} vs {block['p50_ms']['unpruned']:.4f} ms, ratio {block['ratio']:.3f} "
             f"(rounds {block['ratio_range'][0]:.3f}-{block['ratio_range'][1]:.3f}, "
             f"pruned faster in {block['rounds_pruned_faster']}/{block['rounds']})")
    return lines


def render(result: dict) -> str:
    mach, tc = result["machine"], result["toolchain"]
    out = ["# Structured pruning on the digits CNN: 50% of the channels + fine-tune", "",
           f"{result['date']}; {mach.get('cpu')}, {mach.get('cpu_count')} cores; load average "
           f"{mach['load_average_start']} at start, {mach.get('load_average_end')} at end"
           + (" (busy host: other work shared the cores)" if max(mach["load_average_start"][0],
              (mach.get("load_average_end") or [0])[0]) > (mach.get("cpu_count") or 1) * 0.5 else "") + "; "
           f"torch {tc.get('torch')}, executorch {tc.get('executorch')}, torch-pruning {tc.get('torch-pruning')}.", ""]
    stage = result["summary"].get("stage")
    if stage:
        (p0, p1), (m0, m1), (t0, t1) = stage["params"], stage["macs"], stage["top1"]
        out += ["| model | params | MACs | top-1 (torch) |", "|---|---:|---:|---:|",
                f"| float | {p0:,} | {m0:,} | {_pct(t0)} |",
                f"| pruned 50% + {PRUNE_STAGE['finetune_epochs']} epochs | {p1:,} (-{1 - p1 / p0:.1%}) "
                f"| {m1:,} (-{1 - m1 / m0:.1%}) | {_pct(t1)} |", ""]
    out += ["| artifact | status | bytes | zip bytes | top-1 (ExecuTorch) | cosine min | build p50 ms |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for key, a in result["summary"]["artifacts"].items():
        out.append(f"| {key} .pte | {a['status']} | {_int(a['bytes'])} | {_int(a['zip_bytes'])} | {_pct(a['top1'])} "
                   f"| {_num(a['cosine_min'], 5)} | {_num(a['manifest_p50_ms'], 4)} |")
    out += ["", f"Latency, one ExecuTorch session per .pte (both loaded), ABBA over {result['settings']['rounds']} "
            f"rounds of {result['settings']['warmup']} warm-up + {result['settings']['runs']} timed runs; "
            "median over rounds of each round's p50:", "",
            "| precision | threads | unpruned p50 ms | pruned p50 ms | pruned/unpruned | ratio range over rounds |",
            "|---|---:|---:|---:|---:|---:|"]
    for b in result["latency"]:
        if "error" in b:
            out.append(f"| {b['precision']} | {b['threads']} | error: {b['error']} | | | |")
            continue
        out.append(f"| {b['precision']} | {b['threads']} | {b['p50_ms']['unpruned']:.4f} | {b['p50_ms']['pruned']:.4f} "
                   f"| {b['ratio']:.3f} | {b['ratio_range'][0]:.3f}-{b['ratio_range'][1]:.3f} |")
    out += ["", "| criterion | result | measured |", "|---|---|---|"]
    out += [f"| {c['criterion']} | {c['result']} | {c['value']} |" for c in result["criteria"]]
    for variant, b in result["builds"].items():
        if b.get("reason") or b.get("failures"):
            out.append(f"\n{variant} build: {b.get('reason') or '; '.join(b['failures'])}")
    return "\n".join(out) + "\n"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def _int(x) -> str:
    return "-" if x is None else f"{x:,}"


def _num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    WORK.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="stages-", dir=WORK.parent))
    try:
        profiles, profile_threads = write_profiles(workdir, with_fp32=not args.no_fp32)
        capped = min(profile_threads, os.cpu_count() or 1)
        threads = ([int(t) for t in args.threads.split(",")] if args.threads
                   else sorted({capped, 1}, reverse=True))
        builds = {v: build(v, profiles[v], workdir / "dist", args.build_timeout) for v in VARIANTS}
        summary = summarize(builds)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        latency = []
        if all(b.get("bundle") for b in builds.values()):
            feeds = model_inputs(builds["unpruned"]["bundle"])
            for n in threads:
                for precision in ("int8", "fp32"):
                    pair = {v: (summary["artifacts"].get(f"{v}/{precision}") or {}).get("path") for v in VARIANTS}
                    if not all(p and Path(p).is_file() for p in pair.values()):
                        continue
                    say(f"timing the {precision} .pte pair, {n} thread(s), {args.rounds} rounds x {args.runs} runs")
                    try:
                        block = time_pair(pair, feeds, n, args.rounds, args.warmup, args.runs)
                    except Exception as exc:  # noqa: BLE001 - a runtime failure is a result for this block
                        block = {"threads": n, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                    block["precision"] = precision
                    latency.append(block)
                    if "error" not in block:
                        say(f"  unpruned {block['p50_ms']['unpruned']:.4f} ms, pruned {block['p50_ms']['pruned']:.4f} "
                            f"ms, ratio {block['ratio']:.3f}")
        info["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        for b in builds.values():
            b.pop("manifest", None)
            b.pop("bundle", None)
        for a in summary["artifacts"].values():
            a.pop("path", None)
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **info,
                  "settings": {"spec": SPEC, "profile": BASE_PROFILE, "stage": PRUNE_STAGE, "rounds": args.rounds,
                               "warmup": args.warmup, "runs": args.runs, "threads": threads,
                               "profile_threads": profile_threads},
                  "builds": builds, "summary": summary, "latency": latency,
                  "criteria": criteria(summary, latency, capped),
                  "elapsed_s": round(time.perf_counter() - _START, 1)}
    finally:
        if args.keep_work:
            if WORK.exists():
                shutil.rmtree(WORK)
            workdir.rename(WORK)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stages.json").write_text(json.dumps(result, indent=2) + "\n")
    text = render(result)
    (args.out / "stages.md").write_text(text)
    print(text)
    for c in result["criteria"]:
        print(f"{c['result']:4}  {c['criterion']}: {c['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
