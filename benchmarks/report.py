"""Target checks, the markdown report and the plot for benchmarks/run.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

MOBILENET, DIGITS = "mobilenet-v2", "digits"
TARGET_PTE = "android-arm64"
MAX_PTE_X_EAGER = 0.5
MAX_INT8_SIZE_RATIO = 0.30
MAX_ACCURACY_DROP_PTS = 1.0
MAX_MOBILENET_RSS_MB = 2048.0   # parallel fleet builds on one 24 GB machine need each under 2 GB
MAX_DIGITS_WALL_S = 30.0        # digits, a cold build (an empty build cache)
MAX_WARM_WALL_S = 10.0          # the same build again: every export a cache hit
MIN_TIMINGS_COVERAGE = 0.95     # the manifest's per-step timings, summed, over the build's measured wall
MAX_BUILD_X_PT2E = 1.0          # android-arm64 cold build / the plain PT2E int8 .pte + .tflite conversions
PT2E_PEERS = ("pte-int8-pt2e", "tflite-int8-pt2e")


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_json(result: dict, path: Path) -> None:
    _atomic_write(path, (json.dumps(result, indent=2, default=str) + "\n").encode())


def write_text(text: str, path: Path) -> None:
    _atomic_write(path, text.encode())


# --------------------------------------------------------------------------- targets

def check_targets(result: dict) -> list[dict]:
    """One line per checked figure: PASS, MISS, or SKIP when the run did not measure it."""
    rows, pipeline = result["rows"], result["pipeline"]
    models = {m["key"]: m for m in result["models"]}
    lines: list[dict] = []

    def add(target: str, status: str, detail: str) -> None:
        lines.append({"target": target, "status": status, "detail": detail})

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    # 1, 2: android-arm64 int8 .pte on MobileNetV2 224 vs torch eager and every plain baseline.
    mnv2 = result["settings"]["mobilenet"]
    config = "" if (mnv2["resolution"], mnv2["width"]) == (224, 1.0) else \
        f" [run at {mnv2['resolution']} px, width {mnv2['width']:g}, not the 224 / 1.0 the target names]"
    t1 = f"{TARGET_PTE} int8 .pte on MobileNetV2 224: p50 <= {MAX_PTE_X_EAGER}x torch eager fp32 p50"
    t2 = f"{TARGET_PTE} int8 .pte on MobileNetV2 224: p50 <= every plain baseline's p50"
    pte = [r for r in rows if r["model"] == MOBILENET and r["source"] == "pipeline" and r["target"] == TARGET_PTE
           and r.get("format") == "pte" and str(r.get("precision", "")).startswith("int8")]
    if MOBILENET not in models or models[MOBILENET].get("status") != "ok":
        reason = models.get(MOBILENET, {}).get("reason", "not in this run")
        add(t1, "SKIP", reason)
        add(t2, "SKIP", reason)
    elif not pte or pte[0].get("p50_ms") is None:
        why = pte[0].get("reason") if pte else f"no {TARGET_PTE} build in this run"
        add(t1, "MISS" if pte else "SKIP", f"no latency: {why}")
        add(t2, "MISS" if pte else "SKIP", f"no latency: {why}")
    else:
        row = pte[0]
        ratio = row.get("p50_x_eager")
        manifest = f"; build manifest p50 {row['manifest_p50_ms']} ms ({row.get('manifest_p50_x_eager')}x)"
        if ratio is None:
            add(t1, "MISS", "torch eager baseline did not run" + config)
        else:
            add(t1, verdict(ratio <= MAX_PTE_X_EAGER),
                f"p50 {row['p50_ms']:.3f} ms = {ratio:.3f}x eager{manifest}{config}")
        plain = [r for r in rows if r["model"] == MOBILENET and r["source"] == "baseline" and r["label"] != "torch-eager"
                 and r["threads"] == row["threads"]]
        measured = [r for r in plain if r.get("p50_ms") is not None]
        missing = [r["label"] for r in plain if r.get("p50_ms") is None]
        if not measured:
            add(t2, "MISS", "no plain baseline was measured" + config)
        else:
            best = min(measured, key=lambda r: r["p50_ms"])
            detail = (f"p50 {row['p50_ms']:.3f} ms vs fastest plain baseline {best['label']} {best['p50_ms']:.3f} ms"
                      + (f"; not measured: {', '.join(missing)}" if missing else "") + config)
            add(t2, verdict(row["p50_ms"] <= best["p50_ms"] and not missing), detail)

    # 3: int8 artifacts' bytes vs the float artifact of the same format.
    int8 = [r for r in rows if r["source"] == "pipeline" and str(r.get("precision") or "").startswith("int8")]
    if not int8:
        add(f"int8 artifacts bytes <= {MAX_INT8_SIZE_RATIO}x the float artifact", "SKIP", "no int8 artifact built")
    for r in int8:
        name = f"int8 bytes <= {MAX_INT8_SIZE_RATIO}x float: {r['model']} {r['label']}"
        if r.get("ratio_to_float") is not None:
            add(name, verdict(r["ratio_to_float"] <= MAX_INT8_SIZE_RATIO),
                f"{r['bytes']:,} B = {r['ratio_to_float']:.3f}x {r['float_artifact']} (plain fp32, same format)")
        elif r.get("ratio_to_float_reference_onnx") is not None:
            add(name, verdict(r["ratio_to_float_reference_onnx"] <= MAX_INT8_SIZE_RATIO),
                f"{r['bytes']:,} B = {r['ratio_to_float_reference_onnx']:.3f}x the float reference ONNX "
                "(no plain fp32 baseline of this format)")
        else:
            add(name, "MISS", f"no size: {r.get('reason') or r['status']}")

    # 4: digits accuracy within 1 point of float.
    digits = [r for r in rows if r["model"] == DIGITS and r["source"] == "pipeline"]
    if not digits:
        add(f"digits accuracy within {MAX_ACCURACY_DROP_PTS} point of float", "SKIP", "digits not built in this run")
    for r in digits:
        name = f"digits top-1 within {MAX_ACCURACY_DROP_PTS} pt of float: {r['label']}"
        if r.get("accuracy_delta_pts") is None:
            add(name, "MISS", f"no accuracy: {r.get('reason') or r['status']}")
        else:
            key = next(iter(r["accuracy"]))
            add(name, verdict(r["accuracy_delta_pts"] >= -MAX_ACCURACY_DROP_PTS),
                f"{key} {100 * r['accuracy'][key]:.2f}% vs float {100 * r['float_accuracy'][key]:.2f}% "
                f"({r['accuracy_delta_pts']:+.2f} pts)")

    # 5, 6: pipeline cost.
    for model, check in ((MOBILENET, "rss"), (DIGITS, "wall")):
        builds = [p for p in pipeline if p["model"] == model]
        label = (f"pipeline peak memory <= {MAX_MOBILENET_RSS_MB / 1024:g} GB for MobileNetV2" if check == "rss"
                 else f"pipeline wall time <= {MAX_DIGITS_WALL_S:g} s per target for the digits CNN")
        if not builds:
            add(label, "SKIP", f"{model} not built in this run")
        for p in builds:
            failed = "" if p["status"] in ("passed", "failed") and not p.get("timed_out") else \
                f" (build {p['status']}: {str(p.get('reason'))[:120]})"
            if p["status"] == "failed":  # ran to the end; some artifact failed parity, a budget or export
                failed_note = " (build completed with failures: " + str(p.get("reason"))[:120] + ")"
            else:
                failed_note = ""
            if check == "rss":
                add(f"{label}: {p['target']}", verdict(p["peak_mb"] <= MAX_MOBILENET_RSS_MB and not failed),
                    f"{p['peak_mb']:.0f} MB (largest process {p['peak_rss_mb']:.0f} MB, sampled tree PSS sum "
                    f"{_f(p.get('tree_pss_peak_mb'), '{:.0f}')} MB, RSS sum {p['tree_rss_peak_mb']:.0f} MB)"
                    f"{failed}{failed_note}{config}")
            else:
                add(f"{label}: {p['target']}", verdict(p["wall_s"] <= MAX_DIGITS_WALL_S and not failed),
                    f"{p['wall_s']:.1f} s wall, {p['cpu_user_s'] + p['cpu_sys_s']:.1f} s CPU{failed}{failed_note}")

    # 7: a second identical build, with the first one's cache: every export a hit, the same payload.
    for p in pipeline:
        label = f"second identical build <= {MAX_WARM_WALL_S:g} s, cached, same payload: {p['model']} {p['target']}"
        warm = p.get("warm")
        if not warm:
            add(label, "SKIP", "the cold build wrote no manifest")
        else:
            add(label, verdict(warm["wall_s"] <= MAX_WARM_WALL_S and bool(warm["cache_hit"]) and warm["same_payload"]),
                f"{warm['wall_s']:.1f} s wall (cold {p['wall_s']:.1f} s), cache hit {warm['cache_hit']}, "
                f"same payload_sha256 {warm['same_payload']}")

    # 7b: the manifest's step timings account for the build's wall time, cold and warm.
    for p in pipeline:
        label = f"step timings cover >= {MIN_TIMINGS_COVERAGE:.0%} of wall, cold and warm: {p['model']} {p['target']}"
        shares = [p.get("timings_coverage"), (p.get("warm") or {}).get("timings_coverage")]
        if None in shares:
            add(label, "SKIP", "no manifest, or a run from before coverage was recorded")
        else:
            add(label, verdict(min(shares) >= MIN_TIMINGS_COVERAGE), f"cold {shares[0]:.1%}, warm {shares[1]:.1%}")

    # 8: an android-arm64 cold build (parity, latency, the speed comparison, the reproducibility check)
    # against what a user spends on the plain PT2E int8 conversions alone (their export seconds,
    # measured in a process that had already imported the toolchain; the build's wall includes its own start).
    for p in (p for p in pipeline if p["target"] == TARGET_PTE):
        label = (f"{TARGET_PTE} cold build <= {MAX_BUILD_X_PT2E:g}x the plain PT2E int8 .pte + .tflite "
                 f"conversions: {p['model']}")
        peers = {r["label"]: r.get("export_s") for r in rows
                 if r["model"] == p["model"] and r["source"] == "baseline" and r["label"] in PT2E_PEERS}
        if any(peers.get(name) is None for name in PT2E_PEERS):
            add(label, "SKIP", f"a plain PT2E conversion did not run: {peers}")
            continue
        total = sum(peers.values())
        add(label, verdict(p["wall_s"] <= MAX_BUILD_X_PT2E * total),
            f"{p['wall_s']:.1f} s / ({' + '.join(f'{peers[n]:.1f}' for n in PT2E_PEERS)} s) = "
            f"{p['wall_s'] / total:.2f}x")
    return lines


# --------------------------------------------------------------------------- markdown

def _f(value, fmt: str = "{:.3f}", none: str = "-") -> str:
    if value is None:
        return none
    return fmt.format(value)


def _accuracy(row: dict) -> str:
    acc = row.get("accuracy")
    if not acc:
        return "-"
    key = next(iter(acc))
    text = f"{key} {100 * acc[key]:.1f}%"
    if row.get("accuracy_delta_pts") is not None:
        text += f" ({row['accuracy_delta_pts']:+.1f})"
    return text


def markdown(result: dict) -> str:
    m, tc = result["machine"], result["toolchain"]
    s = result["settings"]
    out = [f"# edgepack benchmark, {result['created']}", ""]
    out.append(f"Host: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('mem_total_mb', '?')} MB, "
               f"{' '.join(m.get('cpu_flags') or []) or 'flags unknown'}), "
               f"load average {m['load_average_start'][0]} at start, {m['load_average_end'][0]} at end. "
               f"Python {tc.get('python')}; " + ", ".join(f"{k} {v}" for k, v in tc.items() if k != "python") + ".")
    overrides = ([f"warmup {s['warmup_override']}"] if s["warmup_override"] is not None else []) + \
                ([f"runs {s['runs_override']}"] if s["runs_override"] is not None else [])
    out.append(f"Run: {'--quick, ' if result['quick'] else ''}models {', '.join(s['models'])}; targets "
               f"{', '.join(s['targets'])}; latency settings "
               f"{'overridden: ' + ', '.join(overrides) if overrides else 'from each target profile'}; "
               f"{result['elapsed_s']:.0f} s in all.")
    out.append("")
    out.append("All latencies are **host** latencies (this machine's CPU, the profile's thread count capped at "
               "its cores), measured on calibration sample 0 through edgepack's RuntimeSession; they are not "
               "device latencies. `x eager` is p50 / torch eager fp32 p50 of the same model, same threads, "
               "same run.")
    warning = load_warning(result)
    if warning:
        out += ["", f"> **Warning:** {warning}"]
    skipped = [mi for mi in result["models"] if mi.get("status") != "ok"]
    for mi in skipped:
        out.append(f"\nModel `{mi['key']}` {'skipped' if mi.get('status') == 'skipped' else 'stopped early'}: "
                   f"{mi.get('reason')}")
    out += ["", "## Targets", ""]
    for line in result["targets"]:
        out.append(f"- **{line['status']}** {line['target']}: {line['detail']}")

    out += ["", "## Pipeline cost: `edgepack build --json --quiet --keep-going` in a child process", "",
            "Memory: largest single process of the build's tree (VmHWM) / largest sampled PSS sum of "
            "the live tree (the build process plus its runtime workers; shared pages split among the processes "
            "mapping them) / the same sum over RSS (shared pages counted once per process). Weights cached "
            "before timing.", "",
            "| model | target | status | wall s | CPU s | peak MB (largest proc RSS / tree PSS / tree RSS) | note |",
            "|---|---|---|---:|---:|---:|---|"]
    for p in result["pipeline"]:
        out.append(f"| {p['model']} | {p['target']} | {p['status']} | {p['wall_s']:.1f} | "
                   f"{p['cpu_user_s'] + p['cpu_sys_s']:.1f} | {p['peak_rss_mb']:.0f} / "
                   f"{_f(p.get('tree_pss_peak_mb'), '{:.0f}')} / {p['tree_rss_peak_mb']:.0f} | "
                   f"{_cell(p.get('reason'))} |")

    out += ["", "## Artifacts (pipeline) and plain baselines", "",
            "p50/p90: measured side by side in this run's latency block; `manifest p50` is the figure the build "
            "itself recorded. `x float`: bytes / the plain fp32 export of the same format. cos min / SQNR: "
            "vs the float model over the parity set (pipeline: float ONNX in onnxruntime, from the manifest; "
            "baselines: torch eager). accuracy: digits top-1 on its 20% held-out split, MobileNetV2 top-1 "
            "agreement with float on held-out photos; (pts vs float).", "",
            "| model | artifact | format | precision | thr | p50 ms | p90 ms | x eager | manifest p50 (x eager) "
            "| bytes | zip | x float | cos min | SQNR dB | accuracy | status |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        label = f"**{r['label']}**" if r["source"] == "pipeline" else r["label"]
        manifest = "-" if r.get("manifest_p50_ms") is None else \
            f"{r['manifest_p50_ms']:.3f} ({_f(r.get('manifest_p50_x_eager'), '{:.3g}')})"
        status = r["status"] + (f": {_cell(r['reason'])}" if r.get("reason") else "")
        if r.get("rebench_error"):
            status += f" (re-bench failed: {_cell(r['rebench_error'])})"
        out.append(" | ".join([
            f"| {r['model']}", label, str(r.get("format") or "-"), str(r.get("precision") or "-"), str(r["threads"]),
            _f(r.get("p50_ms")), _f(r.get("p90_ms")), _f(r.get("p50_x_eager"), "{:.3g}"), manifest,
            _f(r.get("bytes"), "{:,}"), _f(r.get("zip_bytes"), "{:,}"), _f(r.get("ratio_to_float"), "{:.3f}"),
            _f(r.get("cosine_min"), "{:.5f}"), _f(r.get("sqnr_db"), "{:.1f}"), _accuracy(r), status]) + " |")

    if result.get("arm64"):
        out += ["", "## arm64 kernels under emulation (qemu-aarch64 user mode)", "",
                "The bundle's device kit run on arm64 code per CPU model: parity vs the float reference, whether "
                "the outputs equal this host's bit for bit, the kernel family the CPU's features select "
                "(inferred), and the emulated wall seconds (not device time). Instructions: executed aarch64 "
                "instructions per inference (deterministic, qemu plugin), the artifact's and its fp32 sibling's, "
                "under the same CPU model; `x float` = their ratio, beside the host p50 ratio of the same pair "
                "from the build (host timings move, counts do not).", "",
                "| model | artifact | precision | emulated runs (CPU: result, vs host, kernel family, s) | CPU | "
                "instructions | fp32 sibling | x float (instructions) | x float (host p50) |",
                "|---|---|---|---|---|---:|---:|---:|---:|"]
        for r in result["arm64"]:
            runs = "; ".join(f"{x['cpu']}: {x['status']}, {'bit-identical' if x['bit_identical'] else 'differs'}, "
                             f"{x['kernel_family']}, {_f(x.get('emulated_s'), '{:.1f}')}" for x in r["runs"]) or \
                _cell(f"{r['status']}: {r.get('reason') or ''}")
            out.append(f"| {r['model']} | {r['target']}/{r['file']} | {r['precision']} | {runs} | "
                       f"{r.get('count_cpu') or '-'} | {_f(r.get('instructions'), '{:,}')} | "
                       f"{_f(r.get('float_instructions'), '{:,}')} | {_f(r.get('instruction_ratio'), '{:.3f}')} | "
                       f"{_f(r.get('host_p50_ratio'), '{:.3f}')} |")

    if result["export_cost"]:
        out += ["", "## Plain baseline export cost (one child per toolchain, for comparison)", "",
                "| model | toolchain | wall s | CPU s | peak MB (largest proc RSS / tree PSS / tree RSS) |",
                "|---|---|---:|---:|---:|"]
        for e in result["export_cost"]:
            out.append(f"| {e['model']} | {e['group']} | {e['wall_s']:.1f} | {e['cpu_user_s'] + e['cpu_sys_s']:.1f} "
                       f"| {e['peak_rss_mb']:.0f} / {_f(e.get('tree_pss_peak_mb'), '{:.0f}')} / {e['tree_rss_peak_mb']:.0f} |")
    out.append("")
    return "\n".join(out)


def load_warning(result: dict) -> str | None:
    """A loaded host makes latency (torch eager's OpenMP threads above all) unreliable: say so."""
    m = result["machine"]
    cores = m.get("cpu_count") or 1
    # At the end the benchmark's own last process adds ~1 to the load average; at the start it adds nothing.
    start, end = m["load_average_start"][0], m.get("load_average_end", [0.0])[0]
    if start <= 0.5 * cores and end <= cores:
        return None
    load = max(start, end)
    return (f"the host was busy (1-minute load average up to {load:.1f} on {cores} cores). Latencies, and "
            "multi-threaded torch eager above all (OpenMP threads wait for each other when the cores are "
            "shared), are not trustworthy; re-run on a quiet machine before quoting any figure or ratio.")


def _cell(text) -> str:
    if not text:
        return ""
    return str(text).replace("|", "/").replace("\n", " ")[:160]


# --------------------------------------------------------------------------- plot

def plot(result: dict, path: Path) -> str | None:
    """Latency (x torch eager) vs size per artifact, one panel per model; colour = cosine vs
    float, marker size = accuracy. Returns why nothing was drawn, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import colors
    except ImportError as exc:
        return f"matplotlib is not importable ({exc})"
    models = [m["key"] for m in result["models"] if m.get("status") == "ok"]
    panels = {k: [r for r in result["rows"] if r["model"] == k and r.get("bytes") and r.get("p50_ms")]
              for k in models}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return "no artifact with both a size and a latency"
    # One colour scale for every panel (a colour means the same cosine everywhere), and points
    # numbered with a key under each panel instead of labels that overlap where points crowd.
    every_cos = [r.get("cosine_min") for rows in panels.values() for r in rows if r.get("cosine_min") is not None]
    norm = colors.Normalize(vmin=min(min(every_cos, default=1.0), 0.999), vmax=1.0)
    longest = max(len(rows) for rows in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2 + 0.16 * longest), squeeze=False)
    for ax, (model, rows) in zip(axes[0], panels.items()):
        use_ratio = all(r.get("p50_x_eager") for r in rows)
        rows = sorted(rows, key=lambda r: (r["bytes"], r["p50_ms"]))
        key = []
        for number, r in enumerate(rows, 1):
            c = r.get("cosine_min") if r.get("cosine_min") is not None else 1.0
            acc = r.get("accuracy") or {}
            size = 40 + 260 * float(next(iter(acc.values()))) if acc else 60
            y = r["p50_x_eager"] if use_ratio else r["p50_ms"]
            ax.scatter(r["bytes"], y, s=size, c=[c], cmap="viridis", norm=norm,
                       marker="o" if r["source"] == "pipeline" else "s", edgecolors="black", linewidths=0.6)
            ax.annotate(str(number), (r["bytes"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
            key.append(f"{number}  {r['label']}")
        if use_ratio:
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
            ax.text(ax.get_xlim()[0], 1.0, " torch eager fp32", fontsize=7, color="grey", va="bottom")
        ax.margins(x=0.12, y=0.08)
        ax.set_xscale("log")
        ax.set_yscale("log")  # ratios: 0.5x and 2x sit symmetrically around eager
        ax.set_xlabel("artifact bytes (log scale)")
        ax.set_ylabel("host p50 / torch eager fp32 p50 (log scale)" if use_ratio else "host p50 ms (log scale)")
        ax.set_title(f"{model}: o edgepack, \u25a1 plain baseline; size = accuracy", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        ax.text(0.0, -0.16, "\n".join(key), transform=ax.transAxes, fontsize=6.5, va="top", family="monospace")
    fig.subplots_adjust(wspace=0.38)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=list(axes[0]),
                 label="cosine min vs float (one scale for every panel)")
    fig.suptitle(f"edgepack benchmark {result['created']} (host latency, not device latency)", fontsize=10)
    partial = path.with_name(path.name + ".partial.png")
    fig.savefig(partial, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(partial, path)
    return None
