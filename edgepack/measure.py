"""Latency summaries and size accounting."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np


def latency_summary(times_ms: list[float]) -> dict[str, float]:
    values = np.asarray(times_ms, dtype=np.float64)
    return {
        "runs": int(values.size),
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p90_ms": round(float(np.percentile(values, 90)), 4),
        "min_ms": round(float(values.min()), 4),
        "mean_ms": round(float(values.mean()), 4),
    }


def zip_bytes(paths: list[Path]) -> int:
    """Size of the files deflated as an app store would ship them (zip, deflate level 9)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(paths):
            info = zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    return len(buffer.getvalue())
