"""ONNX precision conversions: the float ONNX -> fp16 / int8 static / int8 dynamic / int4 weights.

Static int8 is quantized in torch by default (onnx_qdq.py: edgepack's PT2E recipe, exported as
QDQ); ``quantizer: onnxruntime`` takes the int8 path below. Every path here starts from the float export (the build's reference ONNX when its opset matches,
otherwise a fresh export_float_onnx) and uses onnxruntime's own tools, so what onnxruntime
runs is exactly what its quantizer produced:

  fp16          onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True):
                float16 weights and compute, float32 IO (a Cast at each edge).
  int8          (quantizer: onnxruntime) quant_pre_process (shape inference + ORT basic optimisation: BN folded into
                Conv, constants folded), then quantize_static, QDQ format, calibrated on
                ctx.calibration (first ``calibration_samples``). onnxruntime fuses the QDQ
                pairs into QLinearConv / QLinearMatMul / ... at load.
  int8-dynamic  quant_pre_process, then quantize_dynamic: int8 weights, MatMul/Conv/Gather
                activations quantized per call (MatMulInteger, ConvInteger).
  int4-weight   MatMulNBitsQuantizer (symmetric, block = group_size) on every MatMul with a
                constant weight; Gemm nodes (2-D Linear) are rewritten to MatMul + Add first so
                they qualify. weight_algorithm gptq (the default): the codes and scales of each
                nn.Linear come from quant/gptq.py and are written over the quantizer's
                round-to-nearest ones (onnx_int4.py); rtn keeps the quantizer's own.

quantizer: onnxruntime (OnnxArtifact): uint8 activations, int8 per-channel weights, minmax;
reduce_range from the profile's device.int8_isa (7-bit weights without VNNI), as for the torch path.
Measured on the CI host (AMD EPYC, 2 cores, AVX2 without VNNI; shared, so absolute times are
noisy), onnxruntime 1.32, 2 threads, interleaved runs; parity over 16 calibration + 16 held-out
inputs. MobileNetV2 1.0 at 224 (models/mobilenet_v2.py), QDQ per-channel minmax, 64 photos:

    act/weight   reduce_range  speed vs fp32 (p50 / p10)  logits cosine min  SQNR     top-1
    uint8/int8   no            1.40x / 1.75x              0.55                4.9 dB   78%
    uint8/int8   yes           1.40x / 1.73x              0.95               13.6 dB  100%
    uint8/uint8  no            1.04x / 1.07x              0.98               18.4 dB  100%
    int8/int8    no            0.98x / 0.98x              0.51                4.7 dB   78%
    uint8/int8 per-tensor, rr  1.30x / 1.87x              0.61                3.3 dB   41%
    (percentile calibration with reduce_range: same speed and parity as minmax)
    (p10 is the less contended figure: the host ran other jobs at load 4-7 throughout)

uint8 activations with int8 weights select the fast u8s8 kernels; int8/int8 runs no faster than
float, and uint8/uint8, the most accurate, barely faster. Without VNNI, though, the u8s8 kernels
add pairs of u8*s8 products in int16 with saturation (VPMADDUBSW), which wrecks the result; the
same QDQ graph run in float emulation (graph optimisations off) does not have the problem.
reduce_range (7-bit weights) keeps the pair sums in range at the same speed, so it is the
default. Same effect on the trained digits CNN: 17.1 dB without, 41.0 dB with (uint8 weights:
42.0 dB); and for int8-dynamic (MatMulInteger): digits 30.7 -> 43.9 dB, tiny encoder 25.4 ->
35.8 dB. The price is one bit of weight precision, which trained weights with outliers feel:
the real EfficientNet-Lite0 (models/efficientnet_lite0.py) gives 8.8 dB / top-1 agreement 62%
with reduce_range, 5.2 dB / 56% without (saturated), 14.3 dB / 84% in float emulation, and
uint8/uint8 12.2 dB / 59% at 0.2x float speed. A VNNI profile (device.int8_isa) sets reduce_range: false.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import logging
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import ExportError, NothingToQuantize, RuntimeUnavailable
from ..quant.int4 import calibrated_int4
from ..quant.mixed import mixed_note
from ..quant.weight_only import int4_eligible
from .base import ExportContext, ExportResult
from .onnx_int4 import carry_codes, gemm_to_matmul, matmul_weights_of
from .onnx_float import DEFAULT_OPSET, export_float_onnx

# Ops that compute on integers (QOperator form) or on block-quantized weights.
_INTEGER_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QGemm", "QAttention", "MatMulInteger",
    "ConvInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulNBits", "GatherBlockQuantized",
    "MatMulIntegerToFloat",
})
_INT8_TYPES = (2, 3)  # onnx.TensorProto.UINT8, INT8
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_QUANT_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
_CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# -- helpers --------------------------------------------------------------------------------

def _op_in(text: str) -> str | None:
    """The op an onnxruntime/onnx error message names, if any."""
    for pattern in (r"Op \((\w+)\)", r"op_type[=: ]+'?(\w+)", r"node \S+ of type (\w+)", r"\[(\w+)\] node"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


@contextlib.contextmanager
def _step(precision: str, step: str) -> Iterator[None]:
    """Turn any failure of a third-party step into an ExportError naming format, precision, step and op."""
    try:
        yield
    except (ExportError, RuntimeUnavailable):
        raise
    except Exception as exc:  # onnxruntime's tools raise anything; re-raised with context below
        text = str(exc)
        op = _op_in(text)
        raise ExportError(
            f"onnx {precision}: {step} failed{' on op ' + op if op else ''}: "
            f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:400]}",
            "use another precision for this artifact, or report the model with this message "
            "(run with --debug for the traceback)",
        ) from exc


def _quantization_module():
    try:
        import onnxruntime.quantization as quantization
    except ImportError as exc:
        raise RuntimeUnavailable(f"onnxruntime.quantization is not importable ({exc})",
                                 "run `make setup` (onnxruntime ships the quantization tools)") from exc
    return quantization


def float_onnx(config, ctx: ExportContext, scratch: Path) -> Path:
    """The float ONNX to convert: the build's reference when it has the same opset, else a fresh export."""
    if ctx.reference_onnx is not None and config.opset == DEFAULT_OPSET:
        return Path(ctx.reference_onnx)
    return export_float_onnx(ctx.model, ctx.example_inputs, scratch / "float.onnx", ctx.input_names,
                             ctx.output_names, opset=config.opset)[0]


def _load(path: Path, weights: bool = True):
    import onnx

    return onnx.load(str(path), load_external_data=weights)


def _has_external_data(path: Path) -> bool:
    """Whether the model keeps weights outside its protobuf (> 2 GB models must stay that way)."""
    from onnx import TensorProto

    return any(init.data_location == TensorProto.EXTERNAL for init in _load(path, weights=False).graph.initializer)


def save_onnx(model, path: Path, external_data_mb: float) -> list[Path]:
    """Write ``model`` to ``path`` (weights to ``path.data`` above the threshold); return the files."""
    import onnx

    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    weight_bytes = sum(len(init.raw_data) or _tensor_nbytes(init) for init in model.graph.initializer)
    if weight_bytes > external_data_mb * 1024 * 1024:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
        return [path, data_path]
    onnx.save_model(model, str(path))
    return [path]


def _tensor_nbytes(tensor) -> int:
    from onnx import numpy_helper

    return int(numpy_helper.to_array(tensor).nbytes)


def count_quantized(model, qdq: bool) -> Counter:
    """Per op type, the compute nodes that run quantized: integer ops (QOperator form), Gathers
    over int8 tables, and in QDQ form every node fed by a DequantizeLinear (Q/DQ excluded)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    int_initializers = {init.name for init in model.graph.initializer if init.data_type in _INT8_TYPES}
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        fed_by_dq = qdq and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                                for i in node.input)
        int_table = node.op_type == "Gather" and len(node.input) > 0 and node.input[0] in int_initializers
        if node.op_type in _INTEGER_OPS or fed_by_dq or int_table:
            counts[node.op_type] += 1
    return counts


def _input_names(model) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _calibration_reader(quantization, names: list[str], samples: list):
    class CalibrationReader(quantization.CalibrationDataReader):
        """Feeds the spec's calibration samples, in order, as {input name: numpy array}."""

        def __init__(self):
            self._feeds = [{name: t.detach().cpu().numpy() for name, t in zip(names, sample)} for sample in samples]
            self._next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._next >= len(self._feeds):
                return None
            self._next += 1
            return self._feeds[self._next - 1]

        def rewind(self) -> None:
            self._next = 0

    return CalibrationReader()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer logs through the root logger and prints calibration progress to
    stdout; keep both out of edgepack's output (stdout carries --json)."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def sort_topologically(graph) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (Kahn, stable).
    convert_float_to_float16 appends the float32->float16 input Casts at the end."""
    producer = {out: index for index, node in enumerate(graph.node) for out in node.output}
    waiting_on = [{producer[name] for name in node.input if name in producer} for node in graph.node]
    consumers: dict[int, list[int]] = {}
    for index, deps in enumerate(waiting_on):
        for dep in deps:
            consumers.setdefault(dep, []).append(index)
    ready = [index for index, deps in enumerate(waiting_on) if not deps]  # a heap: original order first
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for consumer in consumers.get(index, []):
            waiting_on[consumer].discard(index)
            if not waiting_on[consumer]:
                heapq.heappush(ready, consumer)
    if len(order) != len(graph.node):
        raise ValueError("the graph has a cycle")
    nodes = []
    for index in order:
        node = type(graph.node[index])()
        node.CopyFrom(graph.node[index])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _preprocess(source: Path, out: Path, precision: str, large: bool) -> tuple[Path, str]:
    """quant_pre_process; when its symbolic shape inference fails on an op it does not know
    (ReduceL2 from F.normalize, at opset 18), again with ONNX's own shape inference only."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    def run(skip_symbolic: bool) -> None:
        quant_pre_process(str(source), str(out), skip_optimization=False, skip_onnx_shape=False,
                          skip_symbolic_shape=skip_symbolic, save_as_external_data=large, all_tensors_to_one_file=True)

    try:
        with _quiet():
            run(False)
        return out, "quant_pre_process"
    except Exception as exc:  # onnxruntime's symbolic shape inference raises anything
        reason = f"{type(exc).__name__}: {str(exc)[:120]}"
    with _step(precision, "quant_pre_process (shape inference + optimisation)"), _quiet():
        run(True)
    return out, f"quant_pre_process without symbolic shape inference (it failed: {reason})"


# -- the four conversions -------------------------------------------------------------------

def to_fp16(source: Path, precision: str = "fp16"):
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise RuntimeUnavailable(f"onnxruntime.transformers.float16 is not importable ({exc})",
                                 "run `make setup` (onnxruntime ships the float16 converter)") from exc
    model = _load(source)
    with _step(precision, "convert_float_to_float16"), _quiet():
        converted = convert_float_to_float16(model, keep_io_types=True)
        sort_topologically(converted.graph)
    fp16_initializers = sum(1 for init in converted.graph.initializer if init.data_type == 10)
    recipe = {"method": "float16-cast", "converter": "onnxruntime.transformers.float16",
              "keep_io_types": True, "float16_initializers": fp16_initializers}
    return converted, recipe


def to_int8_static(config, source: Path, scratch: Path, calibration: list):
    quantization = _quantization_module()
    samples = calibration[: config.calibration_samples]
    if not samples:
        raise ExportError("onnx int8: no calibration samples", "give the spec real calibration inputs")
    large = _has_external_data(source)
    pre, preprocess = _preprocess(source, scratch / "preprocessed.onnx", "int8", large)
    reader = _calibration_reader(quantization, _input_names(_load(pre, weights=False)), samples)
    out = scratch / "int8.onnx"
    with _step("int8", f"quantize_static ({config.calibration_method} calibration)"), _quiet():
        quantization.quantize_static(
            str(pre), str(out), reader, quant_format=quantization.QuantFormat.QDQ, use_external_data_format=large,
            per_channel=config.per_channel, reduce_range=config.reduce_range,
            activation_type=getattr(quantization.QuantType, _QUANT_TYPES[config.activation_type]),
            weight_type=getattr(quantization.QuantType, _QUANT_TYPES[config.weight_type]),
            calibrate_method=getattr(quantization.CalibrationMethod, _CALIBRATION_METHODS[config.calibration_method]),
        )
    recipe = {"method": "onnxruntime.quantize_static", "format": "QDQ", "preprocess": preprocess,
              "calibration_method": config.calibration_method, "calibration_samples": len(samples),
              "activation_type": config.activation_type, "weight_type": config.weight_type,
              "per_channel": config.per_channel, "reduce_range": config.reduce_range}
    return _load(out), recipe


def to_int8_dynamic(config, source: Path, scratch: Path):
    quantization = _quantization_module()
    large = _has_external_data(source)
    pre, preprocess = _preprocess(source, scratch / "preprocessed.onnx", "int8-dynamic", large)
    out = scratch / "int8_dynamic.onnx"
    with _step("int8-dynamic", "quantize_dynamic"), _quiet():
        quantization.quantize_dynamic(
            str(pre), str(out), per_channel=config.per_channel, reduce_range=config.reduce_range,
            use_external_data_format=large,
            weight_type=getattr(quantization.QuantType, _QUANT_TYPES[config.weight_type]),
        )
    recipe = {"method": "onnxruntime.quantize_dynamic", "format": "QOperator", "preprocess": preprocess,
              "activation_type": "uint8 (dynamic, per call)", "weight_type": config.weight_type,
              "per_channel": config.per_channel, "reduce_range": config.reduce_range, "calibration_samples": 0}
    return _load(out), recipe


def to_int4_weight(config, source: Path, ctx: ExportContext):
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)
    except ImportError as exc:
        raise RuntimeUnavailable(f"onnxruntime.quantization.matmul_nbits_quantizer is not importable ({exc})",
                                 "run `make setup` (onnxruntime >= 1.17 ships MatMulNBitsQuantizer)") from exc
    model = _load(source)
    with _step("int4-weight", "rewrite Gemm as MatMul"):
        gemms = gemm_to_matmul(model)
    chosen: dict = {"weight_algorithm": "rtn", "calibration_samples": 0}
    int8_nodes: list[str] = []
    if config.weight_algorithm == "gptq":
        names = int4_eligible(ctx.model, config.group_size)
        weights, chosen = calibrated_int4(ctx.model, names, ctx.calibration, ctx.example_inputs,
                                          config.group_size, config.calibration_samples,
                                          config.mixed_int8 and config.mixed_int8.model_dump())
        linears = matmul_weights_of(model, ctx.model, names)
        int8_sources = {source for source, linear in linears.items() if weights[linear].bits == 8}
        int8_nodes = sorted(node.name for node in model.graph.node
                            if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in int8_sources)
    algo = DefaultWeightOnlyQuantConfig(block_size=config.group_size, is_symmetric=True)
    with _step("int4-weight", f"MatMulNBitsQuantizer (block {config.group_size})"), _quiet():
        quantizer = MatMulNBitsQuantizer(model, block_size=config.group_size, is_symmetric=True, algo_config=algo,
                                         nodes_to_exclude=int8_nodes)
        quantizer.process()
    quantized = quantizer.model.model
    if int8_nodes:  # mixed_int8: these MatMuls 8-bit (their codes, one scale per output channel, carried below)
        algo8 = DefaultWeightOnlyQuantConfig(block_size=config.group_size, is_symmetric=True, bits=8)
        with _step("int4-weight", f"MatMulNBitsQuantizer 8-bit for {len(int8_nodes)} MatMul(s)"), _quiet():
            quantizer = MatMulNBitsQuantizer(quantized, block_size=config.group_size, is_symmetric=True, bits=8,
                                             algo_config=algo8, nodes_to_include=int8_nodes)
            quantizer.process()
        quantized = quantizer.model.model
    recipe = {"method": "onnxruntime.MatMulNBitsQuantizer", "algorithm": "RTN", "bits": 4,
              "group_size": config.group_size, "symmetric": True, "weight_type": "int4",
              "activation_type": "float32", "gemm_rewritten_as_matmul": gemms}
    if int8_nodes:
        recipe["int8_matmuls"] = len(int8_nodes)
    if config.weight_algorithm == "gptq":
        carried = carry_codes(quantized, linears, weights)
        recipe["algorithm"] = "GPTQ (codes and scales written into MatMulNBits)"
        recipe["codes_carried"] = len(carried)
        left = sorted(set(names) - set(carried.values()))
        if left:
            recipe["rtn_layers"] = left
    recipe.update(chosen)
    return quantized, recipe


# -- entry point ----------------------------------------------------------------------------

def export_converted(config, ctx: ExportContext, path: Path, torch_int8: Callable | None = None) -> ExportResult:
    """Convert the float ONNX to ``config.precision`` and write it to ``path``; static int8 is
    ``torch_int8(config, ctx, scratch) -> (ModelProto, recipe)`` when given (quantized in torch)."""
    import onnx

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgepack-onnx-") as tmp:
        scratch = Path(tmp)
        source = None if torch_int8 else float_onnx(config, ctx, scratch)
        if config.precision == "fp16":
            model, recipe = to_fp16(source)
        elif torch_int8:
            model, recipe = torch_int8(config, ctx, scratch)
            if recipe["calibration_samples"] < config.calibration_samples:
                notes.append(f"calibrated on {recipe['calibration_samples']} samples "
                             f"(cap {config.calibration_samples}): the spec has no more")
        elif config.precision == "int8":
            model, recipe = to_int8_static(config, source, scratch, ctx.calibration)
            if recipe["calibration_samples"] < config.calibration_samples:
                notes.append(f"calibrated on {recipe['calibration_samples']} samples "
                             f"(cap {config.calibration_samples}): the spec has no more")
        elif config.precision == "int8-dynamic":
            model, recipe = to_int8_dynamic(config, source, scratch)
        elif config.precision == "int4-weight":
            model, recipe = to_int4_weight(config, source, ctx)
            if "mixed_int8" in recipe:
                notes.append(mixed_note(recipe["mixed_int8"]))
        else:  # the config's Literal makes this unreachable
            raise ExportError(f"onnx: precision {config.precision!r} has no conversion", "use fp32")
        counts = count_quantized(model, qdq=recipe.get("format") == "QDQ")
        if config.precision != "fp16":
            recipe["nodes_quantized"] = sum(counts.values())
            recipe["quantized_op_counts"] = dict(sorted(counts.items()))
            if not counts:
                what = "MatMul/Gemm with a constant weight" if config.precision == "int4-weight" else "quantizable op"
                raise NothingToQuantize(f"onnx {config.precision}: the quantizer changed nothing (no {what} in the model)",
                                        "use fp32 or another precision for this model, or set the profile's "
                                        "unquantizable: keep_float")
        files = save_onnx(model, path, config.external_data_mb)
    try:
        with _step(config.precision, "onnx.checker"):
            onnx.checker.check_model(str(path))
    except ExportError:
        for file in files:  # never leave an invalid artifact in the bundle (--keep-going)
            file.unlink(missing_ok=True)
        raise
    details = {"opset": config.opset, "external_data": len(files) > 1, "quantization": recipe}
    return ExportResult(files=files, runtime="onnxruntime", details=details, notes=notes)
