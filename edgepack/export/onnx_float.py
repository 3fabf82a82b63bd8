"""The float ONNX export every ONNX artifact and the build's reference start from:
torch.onnx.export(dynamo=True), checked with onnx.checker (full check).

Weights go to an external ``.onnx.data`` file when they exceed ``external_data_mb``
(protobuf caps a single file at 2 GB); the bundle then carries both files side by side,
which is how onnxruntime loads them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import torch

from ..errors import ExportError, RuntimeUnavailable
from .base import data_dependent_control_flow

DEFAULT_OPSET = 18


def _unsupported_op(text: str) -> str | None:
    match = re.search(r"(aten::[A-Za-z0-9_.]+|aten\.[A-Za-z0-9_.]+|torch\.ops\.[A-Za-z0-9_.]+)", text)
    return match.group(1) if match else None


# Per-node metadata the exporter writes that names files on the build machine (the Python stack
# of each op, with absolute paths): dropped, so the same model gives the same bytes anywhere.
SOURCE_PATH_KEYS = ("pkg.torch.onnx.stack_trace",)


def drop_source_paths(model) -> int:
    """Remove SOURCE_PATH_KEYS from every node of an onnx_ir model (functions included); return
    how many entries were dropped. Name scopes and class names stay: they help read the graph."""
    import onnx_ir as ir

    graphs = [model.graph, *(f.graph for f in model.functions.values())]
    dropped = 0
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for key in SOURCE_PATH_KEYS:
                dropped += node.metadata_props.pop(key, None) is not None
    return dropped


def export_float_onnx(model: torch.nn.Module, example_inputs: tuple, path: Path, input_names: list[str],
                      output_names: list[str], opset: int = DEFAULT_OPSET, external_data_mb: float = 1024.0) -> list[Path]:
    """Export ``model`` to ``path``; return the files written (model first, external data after)."""
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeUnavailable("onnx is not installed", "run `make setup`") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    captured = io.StringIO()
    try:
        # The exporter prints progress to stdout; keep it out of --json output.
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                model, example_inputs, dynamo=True, input_names=input_names, output_names=output_names,
                opset_version=opset, optimize=True, verbose=False,
            )
    except Exception as exc:
        untraceable = data_dependent_control_flow(exc)
        if untraceable is not None:
            raise untraceable from exc
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc))  # the exporter colours its messages
        op = _unsupported_op(text)
        raise ExportError(
            f"onnx: torch.onnx.export failed{' on op ' + op if op else ''}: {type(exc).__name__}: {text.splitlines()[0][:400] if text else ''}",
            "replace the op with one ONNX supports, or drop the onnx artifact from the profile"
            + (" (run with --debug for the full error)"),
        ) from exc
    weight_bytes = sum(
        int(init.const_value.nbytes) for init in program.model.graph.initializers.values()
        if init.const_value is not None
    )
    drop_source_paths(program.model)
    external = weight_bytes > external_data_mb * 1024 * 1024
    data_path = path.with_name(path.name + ".data")
    if data_path.exists():
        data_path.unlink()
    program.save(str(path), external_data=external)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx: {path.name} fails onnx.checker: {exc}", "report the model; the export is invalid") from exc
    files = [path]
    if data_path.exists():
        files.append(data_path)
    return files
