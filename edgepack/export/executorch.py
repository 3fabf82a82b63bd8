"""ExecuTorch (.pte) exporter: XNNPACK (CPU) backend, or Vulkan (mobile GPU) ahead of time.

torch.export -> [quantize] -> to_edge_transform_and_lower(XnnpackPartitioner | VulkanPartitioner)
-> to_executorch.

Precisions:
  fp32          float graph, delegated to XNNPACK as is.
  int8          PT2E static int8 (XNNPACKQuantizer, calibrated), per-channel or per-tensor weights,
                with the recipe of quant/recipe.py: ReLU6 fused before its output is observed,
                activation_observer (MSE), bias_correction, float_layers kept fp32 in the
                delegate. details["quantization"] records the recipe and why it was chosen.
  int8-dynamic  PT2E int8 weights + int8 activations quantized at run time, no calibration.
                In practice only nn.Linear is quantized (2-D convs stay fp32 with this
                quantizer version); XNNPACK only delegates it with per-channel weights.
  int4-weight   torchao Int8DynamicActivationIntxWeightConfig (int4 groupwise weights, int8
                dynamic activations) on nn.Linear layers whose in_features divide group_size;
                other layers stay fp32. weight_algorithm gptq (the default) replaces torchao's
                round-to-nearest codes and scales with GPTQ's (quant/gptq.py), chosen on the first
                calibration_samples calibration inputs from the float model (before the embedding
                tables are quantized).
embeddings (int8, int8-dynamic, int4-weight): nn.Embedding tables int8 (one scale per row) or
int4 (one scale per group_size values of a row), by torchao IntxWeightOnlyConfig
(quant/weight_only.py); lowering fuses
dequantize + embedding into quantized_decomposed::embedding_byte / embedding_4bit, which XNNPACK
does not take: they run outside the delegate on ExecuTorch's quantized kernels, which an app
links as quantized_ops_lib (the pip runtime registers them when executorch.kernels.quantized is
imported). On models/tiny_encoder.py (android-arm64, int8) the 1000x128 token table int8 took the
.pte from 1,453,056 to 1,072,768 bytes (0.37x -> 0.27x the float model) at the same parity
(cosine min 0.9996, SQNR 32.1 dB).
Every precision keeps float32 inputs and outputs: the quantize/dequantize at the edges runs
inside the delegate, so the .pte is fed exactly what the torch model is fed.

backend: vulkan (precisions fp32, fp16) lowers the float graph with executorch's
VulkanPartitioner; fp16 is its ``force_fp16`` option (fp16 weights and GPU tensors, fp32 inputs
and outputs). The digits CNN lowers whole (one Vulkan delegate, no portable ops): fp32
1,266,344 bytes, fp16 636,308 (0.50x). The pip ExecuTorch runtime registers no Vulkan backend
(it has XnnpackBackend, QnnBackend, OpenvinoBackend), so such a .pte cannot be loaded, let alone
run, on a build host: ``device_only`` says so, and the artifact's parity is unchecked until it
runs on a phone with an ExecuTorch runtime built with the Vulkan backend.

The pip ExecuTorch runtime registers no portable kernels for quantize/dequantize ops, so an
export that leaves any of them outside the delegate is rejected here rather than at run time.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import EdgepackError, ExportError, RuntimeUnavailable
from ..quant.calibrate import quantize
from ..quant.int4 import calibrated_int4
from ..quant.mixed import mixed_note
from ..quant.qat_graph import pt2e_qat_for
from ..quant.recipe import INSTALL_HINT, RECIPE_OPTIONS, Int8Options, recipe_for, recipe_reason
from ..quant.weight_only import embedding_tables, int4_eligible, int4_linears
from ..runtimes.executorch import register_quantized_kernels
from .base import ArtifactConfig, ExportContext, ExportResult, MixedInt8, complex_tensors_in, data_dependent_control_flow
# Namespaces whose ops have no portable (non-delegated) kernel in the pip runtime.
_QUANT_NAMESPACES = ("quantized_decomposed", "torchao")


class ExecuTorchArtifact(ArtifactConfig, Int8Options):
    """One .pte artifact lowered to XNNPACK (or, ahead of time only, to Vulkan)."""

    format: Literal["pte"] = "pte"
    precision: Literal["fp32", "fp16", "int8", "int8-dynamic", "int4-weight"]
    group_size: int = Field(default=32, ge=32, description="int4-weight: input channels per scale")
    backend: Literal["xnnpack", "vulkan"] = Field(
        default="xnnpack", description="xnnpack: CPU, run and checked on the build host; vulkan: mobile GPU "
                                       "(fp32/fp16), lowered ahead of time but not runnable on the build host")
    weight_algorithm: Literal["gptq", "rtn"] = Field(
        default="gptq", description="int4-weight: how the 4-bit weights are chosen: gptq (on the first "
                                    "calibration_samples calibration inputs, quant/gptq.py) or rtn "
                                    "(round-to-nearest, no calibration)")
    mixed_int8: MixedInt8 | None = Field(
        default=None, description="int4-weight with weight_algorithm gptq: {min_cosine, min_sqnr_db}; the Linears "
                                  "whose 4-bit error hurts the model most stay int8 (a scale per output channel) until "
                                  "it reaches this on calibration inputs GPTQ did not use (quant/mixed.py)")
    embeddings: Literal["fp32", "int8", "int4"] = Field(
        default="fp32", description="nn.Embedding tables: fp32, int8 (a scale per row) or int4 (a scale per "
                                    "group_size values); run outside XNNPACK by ExecuTorch's quantized kernels, "
                                    "so the app must link quantized_ops_lib")

    @model_validator(mode="after")
    def _check_combinations(self) -> "ExecuTorchArtifact":
        if self.mixed_int8 is not None and (self.precision != "int4-weight" or self.weight_algorithm != "gptq"):
            raise ValueError("pte mixed_int8 only applies to precision int4-weight with weight_algorithm gptq")
        self.check_recipe_options(self.precision == "int8", f"precision int8 (static), not {self.precision}")
        if self.backend == "vulkan" and self.precision not in ("fp32", "fp16"):
            raise ValueError(f"pte backend vulkan takes precision fp32 or fp16, not {self.precision}")
        if self.precision == "fp16" and self.backend != "vulkan":
            raise ValueError("pte fp16 is the Vulkan backend's force_fp16: set backend: vulkan "
                             "(XNNPACK .pte artifacts are fp32, int8, int8-dynamic or int4-weight)")
        if self.precision == "int8-dynamic" and self.granularity == "per-tensor":
            raise ValueError("pte int8-dynamic needs granularity per-channel: XNNPACK does not "
                             "delegate dynamically quantized linear/conv with per-tensor weights")
        if self.precision == "int4-weight" and self.granularity == "per-tensor":
            raise ValueError("pte int4-weight is groupwise (group_size); granularity per-tensor "
                             "does not apply, leave it at per-channel")
        if self.embeddings != "fp32" and (self.backend != "xnnpack" or self.precision in ("fp32", "fp16")):
            raise ValueError(f"pte embeddings {self.embeddings} applies to the XNNPACK backend's quantized "
                             f"precisions (int8, int8-dynamic, int4-weight), not {self.backend} {self.precision}")
        if self.precision != "int4-weight" and self.weight_algorithm != "gptq":
            raise ValueError(f"pte weight_algorithm only applies to precision int4-weight, not {self.precision}")
        if self.group_size % 32:
            raise ValueError(f"pte group_size must be a multiple of 32 (XNNPACK), got {self.group_size}")
        # Compare with the default, not model_fields_set, so a dumped config loads back.
        if self.group_size != 32 and self.precision != "int4-weight" and self.embeddings != "int4":
            raise ValueError("pte group_size only applies to precision int4-weight or embeddings int4")
        return self

    STATIC_INT8_ONLY = RECIPE_OPTIONS

    @property
    def extension(self) -> str:
        return "pte"

    @property
    def device_only(self) -> str | None:
        """Why this artifact cannot be run on the build host (None: it runs there)."""
        if self.backend == "vulkan":
            return ("not validated on this host: no ExecuTorch runtime a package registry ships has the Vulkan "
                    "backend (the pip wheel registers XNNPACK, QNN and OpenVINO only, and PyPI has no executorch "
                    "sdist to build one); lavapipe, the CPU Vulkan driver the .tflite's GPU check uses, could run "
                    "it only under an ExecuTorch built from source with the Vulkan backend. Run device/validate.py "
                    "on a phone with an ExecuTorch runtime built with the Vulkan backend to check its parity")
        return None


CONFIG = ExecuTorchArtifact


def export(config: ExecuTorchArtifact, ctx: ExportContext) -> ExportResult:
    try:
        from executorch.backends.xnnpack.utils.configs import get_xnnpack_executorch_backend_config
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
        from executorch.version import __version__ as et_version
    except ImportError as exc:
        raise RuntimeUnavailable(f"executorch is not installed ({exc})", INSTALL_HINT) from exc

    example = tuple(ctx.example_inputs)
    with _eval_mode(ctx.model):
        program, quantization, notes = _exported_program(config, ctx, example)
        _root_provenance(program.graph_module)
        with _stage("lower"):
            # As executorch's XNNPACK example: check the IR (an op outside core ATen is then
            # named) for float graphs; quantized graphs carry q/dq ops outside core ATen.
            edge = to_edge_transform_and_lower(
                program, partitioner=[_partitioner(config)],
                compile_config=EdgeCompileConfig(_check_ir_validity=config.precision in ("fp32", "fp16")))
            if config.embeddings != "fp32":  # dequantize + embedding -> quantized_decomposed::embedding_*
                from executorch.exir.passes.quant_fusion_pass import quant_fusion_and_const_prop_pass

                quant_fusion_and_const_prop_pass(edge.exported_program())  # in place
        delegated = _delegated_ops(edge.exported_program().graph_module)
        _reject_undelegated_quant_ops(edge.exported_program().graph_module)
        with _stage("lower"):
            et_program = edge.to_executorch(get_xnnpack_executorch_backend_config()
                                            if config.backend == "xnnpack" else None)

    plan = et_program.executorch_program.execution_plan[0]
    portable_ops = _portable_ops(plan)
    _reject_missing_kernels(portable_ops)
    path = ctx.workdir / config.file_name
    path.write_bytes(et_program.buffer)
    details = {
        "backend": config.backend,
        "precision": config.precision,
        "executorch_version": et_version,
        "delegates": len(plan.delegates),
        "delegate_backends": sorted({delegate.id for delegate in plan.delegates}),
        "delegated_ops": sum(delegated.values()),
        "delegated_op_counts": dict(sorted(delegated.items())),
        "portable_ops": portable_ops,
        # Index 0 of non_const_buffer_sizes is reserved for constants; the rest are arenas.
        "planned_memory_bytes": int(sum(plan.non_const_buffer_sizes[1:])),
        "quantization": quantization,
        "bytes": path.stat().st_size,
    }
    backend_name = {"xnnpack": "XNNPACK", "vulkan": "Vulkan"}[config.backend]
    if details["delegates"] == 0:
        notes.append(f"no op was delegated to {backend_name}; the model runs on portable kernels only (slow)")
    if config.backend == "vulkan":
        details["vulkan_compile_options"] = _vulkan_options(config)
        details["validated_on_host"] = False
        notes.append(config.device_only)
    return ExportResult(files=[path], runtime="executorch", details=details, notes=notes)


def _root_provenance(graph_module: torch.fx.GraphModule) -> None:
    """Cut each node's provenance chain (meta["from_node"]: every pass that made it, nested) to
    its oldest ancestor, the one ExecuTorch's debug handles are named after. Every lowering pass
    deep-copies the whole chain of every node it visits (torch.fx.traceback.NodeSource), so the
    long chains torch.export and the quantizer leave cost EfficientNet-Lite0's int8 .pte 1.6 s and
    its fp32 one 0.7 s; the bytes are the same (sha256 e7b1a0b5... and 684cac3b..., both ways)."""
    for module in graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                sources = node.meta.get("from_node")
                if sources:
                    root = sources[-1]
                    while root.from_node:
                        root = root.from_node[-1]
                    node.meta["from_node"] = [root]


def _vulkan_options(config: ExecuTorchArtifact) -> dict[str, Any]:
    return {"force_fp16": config.precision == "fp16"}


def _partitioner(config: ExecuTorchArtifact) -> Any:
    if config.backend == "vulkan":
        try:
            from executorch.backends.vulkan.partitioner.vulkan_partitioner import VulkanPartitioner
        except ImportError as exc:
            raise RuntimeUnavailable(f"executorch's Vulkan partitioner is not importable ({exc})",
                                     INSTALL_HINT) from exc
        return VulkanPartitioner(_vulkan_options(config))
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner()


def _qat_graph(config: ExecuTorchArtifact, ctx: ExportContext):
    """The qat stage's converted graph when one ran with this artifact's weight granularity."""
    try:
        qat = pt2e_qat_for(ctx.model, ctx.extras)
    except ValueError as exc:
        raise ExportError(f"pte int8: {exc}", "make qat the last stage in the profile") from exc
    if qat is None or qat.recipe.get("granularity") != config.granularity:
        return None
    return qat


def _exported_program(config: ExecuTorchArtifact, ctx: ExportContext,
                      example: tuple) -> tuple[Any, dict | None, list[str]]:
    """The ExportedProgram to lower, the quantization recipe (None for fp32) and notes."""
    notes: list[str] = []
    if config.precision in ("fp32", "fp16"):  # fp16: the Vulkan delegate converts the weights
        with _stage("torch.export"):
            return torch.export.export(ctx.model, example), None, notes
    with _stage("quantize"):
        source, embeddings = embedding_tables(ctx.model, config.embeddings, config.group_size)
    if embeddings is not None:
        notes.append(f"{len(embeddings['tables'])} embedding table(s) {config.embeddings}: they run outside XNNPACK "
                     f"on ExecuTorch's quantized kernels (link quantized_ops_lib in the app)")
    if config.precision == "int4-weight":
        with _stage("quantize"):
            weights, chosen = None, {"weight_algorithm": "rtn", "calibration_samples": 0}
            if config.weight_algorithm == "gptq":
                weights, chosen = calibrated_int4(ctx.model, int4_eligible(ctx.model, config.group_size),
                                                  ctx.calibration, example, config.group_size,
                                                  config.calibration_samples,
                                                  config.mixed_int8 and config.mixed_int8.model_dump())
            model, quantization = int4_linears(source, config.group_size, weights)
        quantization.update(chosen)
        quantization["embeddings"] = embeddings
        if "mixed_int8" in quantization:
            notes.append(mixed_note(quantization["mixed_int8"]))
        if quantization["skipped_layers"]:
            notes.append(f"{len(quantization['skipped_layers'])} Linear layer(s) kept fp32: "
                         f"in_features not divisible by group_size {config.group_size}")
        with _stage("torch.export"):
            return torch.export.export(model, example), quantization, notes

    if config.precision == "int8":
        qat = _qat_graph(config, ctx)
        if qat is not None:
            if embeddings is not None:
                raise ExportError("pte int8: embeddings int8/int4 cannot be applied to the qat stage's graph",
                                  "set embeddings: fp32 for this artifact, or drop the qat stage")
            notes.append("lowered from the qat stage's quantization-aware int8 graph (no post-training calibration)")
            with _stage("torch.export"):
                return torch.export.export(qat.model, qat.example_inputs), dict(qat.recipe), notes

    with _stage("quantize"):
        converted, quantization = quantize(source, example, ctx.calibration, recipe_for(config),
                                           reason=recipe_reason(config))
    quantization["embeddings"] = embeddings
    if quantization["calibration_samples"] < config.calibration_samples and not quantization["dynamic"]:
        notes.append(f"calibrated on {quantization['calibration_samples']} samples "
                     f"(cap {config.calibration_samples})")
    with _stage("torch.export"):
        return torch.export.export(converted, example), quantization, notes


def _op_name(target: Any) -> str:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        overload = schema.overload_name or "default"
        return f"{schema.name}.{overload}"
    return getattr(target, "__name__", str(target))


def _lowered_modules(graph_module: torch.fx.GraphModule) -> Iterator[Any]:
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            attr = getattr(graph_module, node.target)
            if isinstance(attr, LoweredBackendModule):
                yield attr


def _delegated_ops(graph_module: torch.fx.GraphModule) -> Counter:
    """Op name -> count of ops inside the delegates (tuple unpacking excluded)."""
    counts: Counter = Counter()
    for lowered in _lowered_modules(graph_module):
        for node in lowered.original_module.graph.nodes:
            if node.op == "call_function" and node.target is not operator.getitem:
                counts[_op_name(node.target)] += 1
    return counts


def _reject_undelegated_quant_ops(graph_module: torch.fx.GraphModule) -> None:
    kernels = register_quantized_kernels()  # quantized embeddings have kernels outside the delegate
    left = sorted({
        _op_name(node.target) for node in graph_module.graph.nodes
        if node.op == "call_function" and _op_name(node.target).split("::")[0] in _QUANT_NAMESPACES
        and not (kernels and _op_name(node.target).startswith("quantized_decomposed::embedding_"))
    })
    if left:
        raise ExportError(
            f"pte export failed during lower: quantize/dequantize ops left outside the XNNPACK "
            f"delegate ({', '.join(left)}); the ExecuTorch runtime has no portable kernels for them",
            "the quantized op next to them is not supported by XNNPACK with this recipe; "
            "try granularity per-channel, another precision, or fp32")


def _reject_missing_kernels(portable_ops: list[dict]) -> None:
    """Fail now, naming the ops, if the ExecuTorch runtime has no kernel for some of them.

    Otherwise the .pte is written and only fails to load (OperatorMissing, op not named).
    """
    try:
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise RuntimeUnavailable(f"executorch runtime is not installed ({exc})", INSTALL_HINT) from exc
    register_quantized_kernels()
    available = Runtime.get().operator_registry.operator_names
    # The registry spells a default overload either "ns::op" or "ns::op.default".
    missing = [entry["op"] for entry in portable_ops
               if entry["op"] not in available and entry["op"].removesuffix(".default") not in available]
    if missing:
        raise ExportError(
            f"pte export failed during lower (op: {', '.join(missing)}): not delegated to the backend "
            f"and the ExecuTorch runtime has no portable kernel for it",
            "replace the op in the model (or keep it out of the exported forward), or use another format")


def _portable_ops(plan: Any) -> list[dict]:
    """Kernel calls the method makes outside any delegate, from the serialized plan."""
    counts: Counter = Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            op_index = getattr(instruction.instr_args, "op_index", None)
            if op_index is not None:
                op = plan.operators[op_index]
                counts[f"{op.name}.{op.overload or 'default'}"] += 1
    return [{"op": name, "count": count} for name, count in sorted(counts.items())]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Export in eval mode (batch norm uses running stats), then restore the caller's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


_OP_PATTERN = re.compile(
    r"\b(?:torch\.ops\.)?((?:aten|prims|quantized_decomposed|torchao|quantized|higher_order)"
    r"(?:::|\.)[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)")


def _offending_ops(exc: BaseException) -> list[str]:
    """Ops named in the message; else the fx node a failing pass was visiting, if any."""
    named = sorted(set(_OP_PATTERN.findall(str(exc))))[:5]
    if named:
        return named
    visited = None
    traceback = exc.__traceback__
    while traceback is not None:  # innermost frame last: keep the deepest node seen
        node = traceback.tb_frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node) and node.op == "call_function":
            visited = node
        traceback = traceback.tb_next
    return [_op_name(visited.target)] if visited is not None else []


@contextmanager
def _stage(stage: str) -> Iterator[None]:
    """Re-raise a toolchain failure as ExportError naming the format, stage and op."""
    try:
        yield
    except EdgepackError:
        raise
    except Exception as exc:  # the toolchains raise many unrelated types; we re-raise, never swallow
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        ops = _offending_ops(exc)
        op_part = f" (op: {', '.join(ops)})" if ops else ""
        untraceable = data_dependent_control_flow(exc)
        if untraceable is not None:
            raise untraceable from exc
        if complex_tensors_in(text):
            raise ExportError(f"pte export failed during {stage}{op_part}: complex tensors (torch.fft, "
                              f"torch.complex) are not supported by ExecuTorch's .pte",
                              "compute the complex part outside the exported model (e.g. pass magnitudes in), "
                              "or leave .pte out of the profile") from exc
        hints = {
            "torch.export": "make the model traceable by torch.export (no data-dependent Python "
                            "control flow, no unsupported ops); see the error above",
            "quantize": "check the calibration inputs match the example inputs, or use fp32",
            "lower": "the op may be unsupported by ExecuTorch/XNNPACK; try another precision or fp32",
        }
        raise ExportError(f"pte export failed during {stage}{op_part}: {type(exc).__name__}: "
                          f"{first_line}", hints[stage]) from exc
