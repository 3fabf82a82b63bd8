"""analysis/charts.py: the diagnosis chart is a PNG drawn from the report's rows."""

from __future__ import annotations

from edgepack.analysis.charts import write_diagnosis_chart


def test_diagnosis_chart_is_written(tmp_path):
    rows = [{"index": i, "layer": f"l{i}", "sqnr_db": 30.0 - i, "local_sqnr_db": 35.0 - i if i else None,
             "error_share": share} for i, share in enumerate([0.1, 0.6, 0.3])]
    report = {"layers": rows, "onnx_qdq": [{"index": 0, "sqnr_db": 28.0}, {"index": 1, "sqnr_db": 20.0}]}
    path = write_diagnosis_chart(report, tmp_path / "sub" / "d.png", "title")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
