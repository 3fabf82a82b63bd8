"""Charts: the per-layer int8 diagnosis (SQNR along the network, each layer's share of the output
error) and a fleet's builds (size and parity per model x target). matplotlib is imported here
only, when a chart is drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_diagnosis_chart(report: dict[str, Any], path: Path, title: str) -> Path:
    """Per-layer SQNR along the network (int8 model vs float, and each layer alone) and each
    layer's share of the output error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    x = [r["index"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.18 * len(rows)), 5.0), dpi=110)
    ax.plot(x, [r["sqnr_db"] if r["sqnr_db"] is not None else np.nan for r in rows], marker=".",
            label="layer output, whole model int8 (accumulated)")
    ax.plot(x, [r["local_sqnr_db"] if r["local_sqnr_db"] is not None else np.nan for r in rows], marker=".",
            alpha=0.7, label="layer output, only this layer int8")
    floor = (report.get("thresholds") or {}).get("min_sqnr_db")
    if floor is not None:  # the profile's int8 gate, on the same axis as the output SQNR
        ax.axhline(floor, color="black", linestyle=":", linewidth=1,
                   label=f"profile int8 gate: output SQNR {floor:g} dB (output now {report['output']['sqnr_db']:.1f})")
    ax.set_xlabel("layer (network order)")
    ax.set_ylabel("SQNR vs float (dB)")
    ax.grid(alpha=0.3)
    if report.get("onnx_qdq"):
        onnx_rows = report["onnx_qdq"]
        span = max(x) if x else 1
        ax.plot([span * r["index"] / max(1, len(onnx_rows) - 1) for r in onnx_rows], [r["sqnr_db"] for r in onnx_rows],
                linestyle="--", alpha=0.7, label="onnxruntime QDQ, accumulated (position rescaled)")
    share = ax.twinx()
    share.bar(x, [100 * r["error_share"] for r in rows], alpha=0.25, color="tab:red", label="share of output error")
    share.set_ylabel("share of output error (%)")
    worst = sorted(rows, key=lambda r: -r["error_share"])[:3]
    for r in worst:
        share.annotate(r["layer"], (r["index"], 100 * r["error_share"]), fontsize=7, rotation=30)
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = share.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2,
              fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_fleet_chart(report: dict[str, Any], path: Path) -> Path:
    """A fleet's builds as two heatmaps, model rows x (target, artifact) columns: size (bytes over
    the float ONNX's) and parity (cosine min vs the float reference), each cell labelled with its
    figures; one colour map, brighter = better, each panel one fixed scale over all its cells; a
    build without artifacts (it stopped early) is a grey cell with its exit code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    builds = report["builds"]
    models = list(dict.fromkeys(b.get("model_name") or b["model"] for b in builds))
    columns: list[tuple[str, str | None]] = []
    for b in builds:
        found = [(b["target_name"], a.get("file")) for a in b.get("artifacts") or []]
        for column in found or [(b["target_name"], None)]:
            if column not in columns:
                columns.append(column)
    size, cosine = np.full((len(models), len(columns)), np.nan), np.full((len(models), len(columns)), np.nan)
    labels: dict[str, dict[tuple[int, int], str]] = {"size": {}, "cosine": {}}
    for b in builds:
        row = models.index(b.get("model_name") or b["model"])
        if not b.get("artifacts"):
            col = columns.index((b["target_name"], None))
            labels["size"][row, col] = labels["cosine"][row, col] = f"exit {b['exit_code']}\n{b['status']}"
        for a in b.get("artifacts") or []:
            col = columns.index((b["target_name"], a.get("file")))
            fail = "" if a.get("parity_passed") is not False else "FAIL "
            if a.get("bytes") is not None:
                size[row, col] = a.get("ratio_to_float") if a.get("ratio_to_float") is not None else np.nan
                ratio = f"\n{a['ratio_to_float']:.2f}x" if a.get("ratio_to_float") is not None else ""
                labels["size"][row, col] = f"{a['bytes'] / 1000:,.1f} kB{ratio}"
            if a.get("cosine_min") is not None:
                cosine[row, col] = a["cosine_min"]
                text = f"{fail}{a['cosine_min']:.5f}"
                if a.get("sqnr_db") is not None:
                    text += f"\n{a['sqnr_db']:.1f} dB"
                for metric, value in list((a.get("accuracy") or {}).items())[:1]:
                    text += f"\n{metric} {value:.4g}"
                labels["cosine"][row, col] = text
            elif a.get("status") != "ok":
                labels["cosine"][row, col] = f"{a.get('status')}"
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.7 * len(columns) + 3), 2 * (0.75 * len(models) + 1.6)),
                             dpi=110)
    # One colour map, brighter = better in both panels (smaller; closer to float), on fixed ranges so
    # that 1.00x vs 1.04x or a cosine of 0.9997 vs 1.0 do not look like a wide gap.
    worst_cosine = float(np.nanmin(cosine)) if np.isfinite(cosine).any() else 1.0
    panels = (("size", size, "viridis_r", (0.0, max(1.0, float(np.nanmax(size)) if np.isfinite(size).any() else 1.0)),
               "bytes / float ONNX bytes", "size: each artifact's bytes (and its ratio to float)"),
              ("cosine", cosine, "viridis", (min(0.9, worst_cosine), 1.0), "cosine min vs float reference",
               "parity: cosine min over outputs (SQNR, accuracy); FAIL = parity failed"))
    for ax, (name, values, colours, (low, high), bar, title) in zip(axes, panels):
        cmap = matplotlib.colormaps[colours].copy()
        cmap.set_bad("#d9d9d9")
        norm = matplotlib.colors.Normalize(low, high)
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
        fig.colorbar(image, ax=ax, label=bar, fraction=0.04)
        for (row, col), text in labels[name].items():
            r, g, b, _ = cmap(norm(values[row, col])) if np.isfinite(values[row, col]) else (1, 1, 1, 1)
            ax.text(col, row, text, ha="center", va="center", fontsize=8,
                    color="white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black")
        ax.set_xticks(range(len(columns)), [f"{t}\n{f or '(no artifact)'}" for t, f in columns], fontsize=8,
                      rotation=0 if len(columns) <= 6 else 30)
        ax.set_yticks(range(len(models)), models, fontsize=9)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"edgepack fleet: {len(builds)} builds, exit code {report['exit_code']}", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
