"""The tables the commands print (rich): a build's or a bundle's manifest, a re-validation, the
GPU path, the emulated arm64 runs and their instruction counts, a diagnosis, a fleet (and its report's markdown table). Everything printed from a bundle
or report goes through _escape."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape as _escape
from rich.table import Table


# Below this width a manifest prints one block per artifact instead of one wide table.
NARROW = 100
ARTIFACT_COLUMNS = ("file", "precision", "status", "bytes", "x float", "cosine min", "SQNR dB", "top-1",
                    "host p50 ms", "device est ms", "device p50 ms", "accuracy", "note")


def _artifact_row(art, parity_headline) -> dict[str, str]:
    """One artifact's cells. Host p50 is this build host's time; the device estimate is the cost
    model's (profile device figures); device p50 appears once a device report is ingested."""
    row = {"file": art.file or f"{art.name}.{art.format}", "precision": art.precision}
    if art.status == "failed":
        return {**row, "status": "[red]failed[/]", "note": _escape((art.error or "")[:80])}
    row.update({"bytes": f"{art.bytes:,}", "x float": f"{art.size['ratio_to_float']:.3f}"})
    if art.status == "not-validated":
        return {**row, "status": "[yellow]not-validated[/]", "note": "not run on this host"}
    worst = parity_headline(art.parity)
    estimate = (art.latency or {}).get("device_estimate") or {}
    device = art.device_latency
    row.update({
        "status": f"[{'green' if art.status == 'ok' else 'red'}]{art.status}[/]",
        "cosine min": f"{worst['cosine_min']:.5f}", "SQNR dB": f"{worst['sqnr_db']:.1f}",
        "top-1": "-" if worst["top1_agreement"] is None else f"{worst['top1_agreement']:.1%}",
        "host p50 ms": f"{art.latency['p50_ms']:.3f}",
        "device est ms": "-" if estimate.get("latency_ms") is None else f"{estimate['latency_ms']:.2f}",
        "device p50 ms": "-" if device is None or device.p50_ms is None else f"{device.p50_ms:.3f}",
        "accuracy": ", ".join(f"{k} {v:.4g}" for k, v in (art.accuracy or {}).items()),
    })
    return row


def bundles_table(folder, rows: list[dict]) -> Table:
    """`edgepack inspect dist/<model>`: the bundles a model folder holds."""
    table = Table(title=f"bundles in {_escape(str(folder))}")
    for column in ("target", "status", "artifacts", "bundle"):
        table.add_column(column)
    for row in rows:
        status = row["status"]
        style = "green" if status == "passed" else "red"
        table.add_row(_escape(row["target"]), f"[{style}]{_escape(status)}[/]",
                      _escape(", ".join(row["artifacts"]) or row.get("error", "")[:80]), _escape(row["bundle"]))
    return table


def print_manifest(manifest, console: Console) -> None:
    from .parity import headline as parity_headline

    console.print(f"[bold]{manifest.model.name}[/] for [bold]{manifest.target.name}[/]: "
                  f"{'[green]passed[/]' if manifest.status == 'passed' else '[red]failed[/]'}  "
                  f"({manifest.model.params:,} params, {manifest.model.macs:,} MACs)")
    if manifest.stages:
        stages = Table(title="stages")
        for column in ("stage", "params", "nonzero", "MACs", "seconds"):
            stages.add_column(column, justify="right" if column != "stage" else "left")
        for record in manifest.stages:
            b, a = record["before"], record["after"]
            stages.add_row(record["name"], f"{b['params']:,} -> {a['params']:,}",
                           f"{b['nonzero_params']:,} -> {a['nonzero_params']:,}", f"{b['macs']:,} -> {a['macs']:,}",
                           f"{record['seconds']:.1f}")
        console.print(stages)
    rows = [_artifact_row(art, parity_headline) for art in manifest.artifacts]
    if console.width >= NARROW:
        table = Table(title="artifacts")
        for column in ARTIFACT_COLUMNS:
            table.add_column(column, justify="left" if column in ("file", "precision", "status", "note") else "right")
        for row in rows:
            table.add_row(*(row.get(column, "") for column in ARTIFACT_COLUMNS))
        console.print(table)
    else:  # a narrow terminal (a CI log, a phone-width pane): one block per artifact
        for row in rows:
            console.print(f"[bold]{row['file']}[/] ({row['precision']}): {row['status']}")
            for column in ARTIFACT_COLUMNS[3:]:
                if row.get(column) not in (None, "", "-"):
                    console.print(f"  {column:<13} {row[column]}")
    checked = [(art.file, art.emulated_gpu) for art in manifest.artifacts if art.emulated_gpu is not None]
    if checked:
        console.print(gpu_table(checked, "GPU path: LiteRT's GPU accelerator on an emulated Vulkan GPU "
                                         "(not a phone driver; emulated time)"))
    match = (manifest.host or {}).get("matches_target") or {}
    if match.get("matches") is False:
        console.print(f"[dim]host p50 is this build host's time: {_escape(match.get('reason', ''))}[/]")
    emulated = [(art.file, art.emulated_arm64) for art in manifest.artifacts if art.emulated_arm64 is not None]
    if emulated:
        console.print(arm64_table(emulated, "arm64 kernels under qemu-aarch64 (emulated: its seconds are not device time)"))
        counted = [(art, art.emulated_arm64.instructions) for art in manifest.artifacts
                   if art.emulated_arm64 is not None and art.emulated_arm64.instructions]
        if counted:
            console.print(instructions_table(counted))
    if manifest.accuracy.get("float"):
        console.print("float accuracy: " + ", ".join(f"{k} {v:.4g}" for k, v in manifest.accuracy["float"].items()))
    for failure in manifest.failures:
        console.print(f"[red]failure:[/] {failure}")


def _worst_error(outputs: list[dict]) -> str:
    errors = [o["max_abs_error"] for o in outputs]
    return "inf/NaN" if any(e is None for e in errors) else f"{max(errors):.3g}"


def gpu_table(records: list, title: str) -> Table:
    """LiteRT's GPU path per .tflite: parity vs the reference and the CPU interpreter, ops, emulated time."""
    table = Table(title=title)
    for column in ("file", "GPU", "result", "cos min ref", "max|err| ref", "cos min CPU", "max|diff| CPU", "top-1 CPU",
                   "ops on CPU", "1st run s", "later ms"):
        table.add_column(column, justify="left" if column in ("file", "GPU", "result", "ops on CPU") else "right")
    for file, record in records:
        if record.status == "skipped" or record.parity is None:
            table.add_row(file, record.precision or "-", f"[yellow]{record.status}[/]", *["-"] * 7,
                          _escape((record.reason or "")[:60]))
            continue
        ref, cpu = record.parity["outputs"], record.cpu_agreement["outputs"]
        top1 = [o["top1_agreement"] for o in cpu if o.get("top1_agreement") is not None]
        seconds = record.seconds or {}
        later = seconds.get("later_runs_p50")
        table.add_row(file, f"{record.precision} {(record.driver or {}).get('name', '')}",
                      "[green]pass[/]" if record.status == "passed" else "[red]FAILED[/]",
                      f"{min(o['cosine_min'] for o in ref):.6f}", _worst_error(ref),
                      f"{min(o['cosine_min'] for o in cpu):.6f}", _worst_error(cpu),
                      f"{min(top1):.1%}" if top1 else "-",
                      ", ".join(record.fallback_ops) or ("none" if record.fully_accelerated else "?"),
                      f"{seconds.get('first_run', 0):.2f}", "-" if later is None else f"{later * 1000:.1f}")
    return table


def arm64_table(records: list, title: str) -> Table:
    """The device kit per artifact x emulated CPU model: parity, bit-identity with the build host,
    the kernel family the CPU's features select (inferred), emulated seconds."""
    table = Table(title=title)
    for column in ("file", "CPU", "result", "kernel family (inferred)", "vs build host", "cos min", "SQNR dB",
                   "emulated s"):
        table.add_column(column, justify="right" if column in ("cos min", "SQNR dB", "emulated s") else "left")
    for file, record in records:
        if not record.runs:
            table.add_row(file, "-", f"[yellow]{record.status}[/]", _escape((record.reason or "").split(";")[0][:80]),
                          *["-"] * 4)
            continue
        for run in record.runs:
            outputs = (run.parity or {}).get("outputs") or []
            worst = max((o.get("max_abs_diff") or 0.0 for o in (run.host_agreement or {}).get("outputs", [])), default=0)
            table.add_row(file, _escape(run.cpu), "[green]pass[/]" if run.status == "passed" else "[red]FAILED[/]",
                          _escape(str(run.kernel_family.get("family", "?"))),
                          "bit-identical" if run.bit_identical else f"max diff {worst:.3g}",
                          f"{min(o['cosine_min'] for o in outputs):.5f}" if outputs else "-",
                          f"{min(o['sqnr_db'] for o in outputs):.1f}" if outputs else "-",
                          f"{(run.seconds or {}).get('wall', 0):.1f}")
    return table


def instructions_table(counted: list) -> Table:
    """Executed aarch64 instructions per inference, quantized vs its float sibling, beside the host's
    latency ratio of the same pair (host timings move; instruction counts do not)."""
    table = Table(title="aarch64 instructions per inference (qemu plugin; deterministic)")
    for column in ("file", "CPU", "instructions", "float sibling", "x float (instructions)", "x float (host p50)",
                   "repeatable"):
        table.add_column(column, justify="left" if column in ("file", "CPU") else "right")
    for art, counts in counted:
        sibling = counts.get("float_sibling") or {}
        host = ((art.latency or {}).get("float_comparison") or {}).get("ratio_to_float")
        table.add_row(art.file, _escape(str(counts["cpu"])), f"{counts['per_inference']:,}",
                      f"{sibling['per_inference']:,}" if sibling else "-",
                      f"{counts['ratio_to_float']:.3f}" if counts.get("ratio_to_float") else "-",
                      f"{host:.3f}" if host else "-", "yes" if counts.get("repeatable") else "NO")
    return table


def validation_table(result) -> Table:
    """`edgepack validate`: each artifact re-run on this host, against the reference and the build host."""
    table = Table(title=f"{result.manifest.model.name} for {result.manifest.target.name}: re-validated on this host")
    for column in ("file", "runtime", "result", "cosine min", "SQNR dB", "max|err|", "top-1", "vs build host"):
        table.add_column(column, justify="left" if column in ("file", "runtime", "result") else "right")
    for check in result.artifacts:
        outputs = check.parity.outputs
        top1 = [o.top1_agreement for o in outputs if o.top1_agreement is not None]
        agreement = check.host_agreement
        same = "identical" if agreement["identical"] else "max diff " + ", ".join(
            "non-finite" if o.get("max_abs_diff") is None and "detail" not in o else
            o.get("detail") or f"{o['max_abs_diff']:.3g}" for o in agreement["outputs"])
        table.add_row(check.file, f"{check.runtime} {check.runtime_version}",
                      "[green]pass[/]" if check.passed else "[red]PARITY FAILED[/]",
                      f"{min(o.cosine_min for o in outputs):.5f}", f"{min(o.sqnr_db for o in outputs):.1f}",
                      f"{max(o.max_abs_error for o in outputs):.3g}", f"{min(top1):.1%}" if top1 else "-", same)
    return table


def diagnosis_table(report: dict, title: str, top: int) -> Table:
    """`edgepack diagnose`: the layers int8 hurts most, worst first."""
    out = report["output"]
    table = Table(title=f"{title}: worst int8 layers (output SQNR {out['sqnr_db']:.1f} dB, "
                        f"cosine {out['cosine_mean']:.4f})")
    for column in ("#", "layer", "op", "error share", "out SQNR alone", "cause", "SQNR (accum.)", "local SQNR",
                   "cosine", "max|err|"):
        table.add_column(column, justify="left" if column in ("layer", "op", "cause") else "right")

    def fmt(value: float | None, spec_: str) -> str:
        return "-" if value is None else format(value, spec_)

    def cause(row: dict) -> str:
        weights, activation = row["output_sqnr_db_weights_only"], row["output_sqnr_db_activation_only"]
        if weights is None and activation is None:
            return "-"
        if activation is None or (weights is not None and weights < activation):
            return f"weights ({weights:.0f} dB)"
        return f"activation ({activation:.0f} dB)"

    for row in sorted(report["layers"], key=lambda r: -r["error_share"])[:top]:
        table.add_row(str(row["index"]), row["layer"], row["op"], f"{100 * row['error_share']:.1f}%",
                      fmt(row["output_sqnr_db_alone"], ".1f"), cause(row), fmt(row["sqnr_db"], ".1f"),
                      fmt(row["local_sqnr_db"], ".1f"), fmt(row["cosine"], ".4f"), fmt(row["max_abs_error"], ".3g"))
    return table


FLEET_COLUMNS = ("model", "target", "exit", "status", "artifact", "bytes", "x float", "cosine min", "SQNR dB",
                 "accuracy", "build s", "attempts", "cached")


def fleet_rows(report: dict) -> list[dict[str, str]]:
    """A fleet report as rows of plain text, one per artifact (one per build without artifacts)."""
    rows = []
    for build in report["builds"]:
        head = {"model": build.get("model_name") or build["model"],
                "target": build.get("target_name") or build["target"],
                "exit": str(build["exit_code"]), "status": str(build["status"]),
                "build s": "-" if build.get("wall_s") is None else f"{build['wall_s']:.1f}",
                "attempts": str(build.get("attempts", "-")),
                "cached": {True: "yes", False: "no"}.get(build.get("cached"), "unknown")}
        note = (build.get("error") or {}).get("message") or "; ".join(build.get("failures") or [])
        for art in build.get("artifacts") or [{}]:
            if not art:
                rows.append({**head, "artifact": "-", "accuracy": note[:120]})
                continue
            accuracy = ", ".join(f"{k} {v:.4g}" for k, v in (art.get("accuracy") or {}).items())
            rows.append({**head, "artifact": f"{art.get('file') or '-'} ({art.get('precision')})",
                         "bytes": "-" if art.get("bytes") is None else f"{art['bytes']:,}",
                         "x float": "-" if art.get("ratio_to_float") is None else f"{art['ratio_to_float']:.3f}",
                         "cosine min": "-" if art.get("cosine_min") is None else f"{art['cosine_min']:.5f}",
                         "SQNR dB": "-" if art.get("sqnr_db") is None else f"{art['sqnr_db']:.1f}",
                         "accuracy": accuracy or "-"})
    return rows


def fleet_markdown(report: dict) -> str:
    """fleet-report.md: what ran, then one table row per artifact, then what failed and why."""
    ray = report.get("ray") or {}
    lines = [f"# edgepack fleet: {len(report['builds'])} builds, exit code {report['exit_code']}", "",
             f"Matrix `{report['matrix']}`, out root `{report['out']}`, {report['created']}; {report['wall_s']:.1f} s "
             f"wall on Ray {ray.get('version')} ({ray.get('address')}, {ray.get('nodes')} node(s), started in "
             f"{ray.get('start_s')} s, {ray.get('parallel') or 'cluster-sized'} build(s) at once, "
             f"{ray.get('retries')} retries after a worker death). "
             + ", ".join(f"{n} {status}" for status, n in sorted(report["counts"].items())) + ".", "",
             "| " + " | ".join(FLEET_COLUMNS) + " |", "|" + "|".join("---:" if c in ("exit", "bytes", "x float",
             "cosine min", "SQNR dB", "build s", "attempts") else "---" for c in FLEET_COLUMNS) + "|"]
    for row in fleet_rows(report):
        lines.append("| " + " | ".join(row.get(c, "-").replace("|", "\\|").replace("\n", " ") for c in FLEET_COLUMNS)
                     + " |")
    problems = [b for b in report["builds"] if b["exit_code"]]
    if problems or report.get("warnings"):
        lines += ["", "## Problems", ""]
    for build in problems:
        error = build.get("error") or {}
        what = error.get("message") or "; ".join(build.get("failures") or []) or build["status"]
        hint = f" (hint: {error['hint']})" if error.get("hint") else ""
        where = build.get("bundle_dir") or build.get("log") or build.get("logs")
        lines.append(f"- {build['model']} on {build['target']}: exit {build['exit_code']}, "
                     f"{what.splitlines()[0]}{hint}; see `{where}`".replace("|", "\\|"))
    lines += [f"- {note}" for note in report.get("warnings") or []]
    return "\n".join(lines) + "\n"


def fleet_table(report: dict) -> Table:
    table = Table(title=f"fleet: {len(report['builds'])} builds in {report['wall_s']:.1f} s")
    for column in FLEET_COLUMNS:
        table.add_column(column, justify="right" if column in ("exit", "bytes", "x float", "build s") else "left")
    for row in fleet_rows(report):
        style = "green" if row["exit"] == "0" else "red"
        table.add_row(*(f"[{style}]{_escape(row.get(c, '-'))}[/]" if c in ("exit", "status")
                        else _escape(row.get(c, "-")) for c in FLEET_COLUMNS))
    return table
