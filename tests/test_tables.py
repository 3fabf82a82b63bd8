"""tables.py: what the commands print, rendered as a terminal would show it."""

from __future__ import annotations

from rich.console import Console

from edgepack.tables import diagnosis_table


def _render(renderable, width: int = 200) -> str:
    console = Console(record=True, width=width, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_diagnosis_table_lists_the_worst_layers_first_with_their_cause():
    rows = [{"index": i, "layer": name, "op": "conv2d", "error_share": share, "output_sqnr_db_alone": 20.0 + i,
             "output_sqnr_db_weights_only": weights, "output_sqnr_db_activation_only": act, "sqnr_db": 30.0 - i,
             "local_sqnr_db": 35.0, "cosine": 0.999, "max_abs_error": 0.01}
            for i, (name, share, weights, act) in enumerate([("stem", 0.1, 40.0, 30.0), ("hostile", 0.8, 50.0, 12.0),
                                                              ("head", 0.1, None, None)])]
    text = _render(diagnosis_table({"output": {"sqnr_db": 15.2, "cosine_mean": 0.97}, "layers": rows}, "m on t", 2))
    lines = [line for line in text.splitlines() if "conv2d" in line]
    assert len(lines) == 2 and "hostile" in lines[0] and "activation (12 dB)" in lines[0]
    assert "output SQNR 15.2 dB" in text
