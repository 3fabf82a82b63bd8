"""Charts of an analysis: the per-layer int8 diagnosis (SQNR along the network, each layer's
share of the output error). matplotlib is imported here only, when a chart is drawn."""

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
