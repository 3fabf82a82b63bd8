"""The PT2E quantizers with edgepack's recipe changes: XNNPACKQuantizer (ExecuTorch),
litert-torch's PT2EQuantizer (LiteRT) and the x86 one (XNNPACK's rules, onnxruntime's types),
each with the chosen activation observer, conv/linear + ReLU6 clamp fusion and module names
kept fp32 (quant/recipe.py says why)."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any, Sequence

import torch

from ..errors import RuntimeUnavailable
from .graph import is_op
from .observers import observer_classes
from .recipe import DEFAULT_ACTIVATION_OBSERVER, INSTALL_HINT, Recipe

def quantization_config(*, per_channel: bool, dynamic: bool, qat: bool = False,
                        activation_observer: str = DEFAULT_ACTIVATION_OBSERVER) -> Any:
    """XNNPACK's symmetric int8 config with the chosen activation observer (static PTQ only;
    QAT and dynamic keep the stock fake-quant / placeholder observers)."""
    try:
        from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    stock = _xnnpack_module().get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic, is_qat=qat)
    if qat or dynamic or activation_observer == "histogram":
        return stock
    observer_class, arguments = observer_classes()[activation_observer]
    observer = observer_class.with_args(eps=2 ** -12, **arguments)
    act = stock.input_activation
    spec = QuantizationSpec(dtype=act.dtype, observer_or_fake_quant_ctr=observer, quant_min=act.quant_min,
                            quant_max=act.quant_max, qscheme=act.qscheme, ch_axis=act.ch_axis,
                            is_dynamic=False)
    return QuantizationConfig(spec, spec, stock.weight, stock.bias, False)


def xnnpack_quantizer(*, per_channel: bool, dynamic: bool, qat: bool = False,
                      activation_observer: str = DEFAULT_ACTIVATION_OBSERVER,
                      fuse_clamp: bool = True, float_layers: Sequence[str] = ()) -> Any:
    """The XNNPACKQuantizer with one symmetric int8 config applied to the whole model.

    Weights: int8 symmetric in [-127, 127], per output channel or per tensor.
    Activations: int8 affine per tensor; static (``activation_observer`` on calibration data)
    or dynamic (scale chosen at run time from each input, no calibration).
    ``fuse_clamp`` (static PTQ only): observe conv/linear + ReLU6 after the clamp.
    ``float_layers``: module names (as in model.named_modules()) left in fp32.
    QAT keeps the stock quantizer (the qat stage's recipe is unchanged).
    """
    try:
        from torchao.quantization.pt2e.quantizer import get_module_name_filter
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    config = quantization_config(per_channel=per_channel, dynamic=dynamic, qat=qat,
                                 activation_observer=activation_observer)
    quantizer = _quantizer_class()(fuse_clamp=fuse_clamp and not qat and not dynamic)
    quantizer.set_global(config)
    if float_layers:
        if not hasattr(quantizer, "set_filter_function"):
            raise RuntimeUnavailable("keeping layers in fp32 (float_layers) needs ExecuTorch's XNNPACKQuantizer",
                                     INSTALL_HINT)
        filters = [get_module_name_filter(name) for name in float_layers]
        quantizer.set_filter_function(lambda node: not any(f(node) for f in filters))
    return quantizer


def _xnnpack_module() -> Any:
    """ExecuTorch's XNNPACK quantizer module; without executorch (a core install running
    `edgepack diagnose` or the QAT stage) torchao's copy of it, the same annotations."""
    try:
        from executorch.backends.xnnpack.quantizer import xnnpack_quantizer
    except ImportError:
        try:
            from torchao.testing.pt2e import _xnnpack_quantizer as xnnpack_quantizer
        except ImportError as exc:
            raise RuntimeUnavailable(f"neither executorch nor torchao's XNNPACK quantizer is importable ({exc})",
                                     INSTALL_HINT) from exc
    return xnnpack_quantizer


def quantizer_source() -> str:
    """Which XNNPACK quantizer a recipe runs with here (a report records it)."""
    return _xnnpack_module().__name__


@lru_cache(maxsize=1)
def _quantizer_class() -> type:
    XNNPACKQuantizer = _xnnpack_module().XNNPACKQuantizer

    class ClampFusingXNNPACKQuantizer(XNNPACKQuantizer):
        """XNNPACKQuantizer that also fuses conv/linear + hardtanh (ReLU6) like + ReLU."""

        def __init__(self, fuse_clamp: bool = True) -> None:
            super().__init__()
            self.fuse_clamp = fuse_clamp
            # torchao's copy (a core install without executorch) has no node filter.
            self.filter_fn = getattr(self, "filter_fn", None)

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return scalars_to_float_attrs(model)

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            if self.fuse_clamp and self.global_config is not None:
                annotate_clamp_fusion(model, self.global_config, self.filter_fn)
            # The conv+batch-norm patterns match training-mode batch norm only (QAT graphs);
            # prepare_pt2e has already folded every eval-mode one into its conv. Each of those
            # patterns is traced with torch.export on every call (~6 s a model), so they are
            # skipped when no batch norm is left in the graph: the annotation is the same.
            if not hasattr(type(self), "SUPPORTED_PATTERNS"):  # torchao's copy: a fixed list of annotators
                pass
            elif not any("batch_norm" in str(node.target) for node in model.graph.nodes):
                self.SUPPORTED_PATTERNS = [p for p in type(self).SUPPORTED_PATTERNS if "_bn" not in p.name]
            else:
                self.SUPPORTED_PATTERNS = type(self).SUPPORTED_PATTERNS
            super().annotate(model)
            drop_integer_annotations(model)
            return model

    return ClampFusingXNNPACKQuantizer


def _is_float_value(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


def scalars_to_float_attrs(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """XNNPACKQuantizer's own pass turns every scalar operand of add/mul into a float32 tensor
    attribute so the op can be annotated; applied to integer arithmetic (index math such as
    ``arange(n) + 1`` in a transformer's attention-mask code) it turns the indices into floats and
    the graph fails with "tensors used as indices must be long". Here only float add/mul get
    their scalars as tensors; integer arithmetic is left as written."""
    from torchao.quantization.pt2e.utils import get_new_attr_name_with_prefix

    for node in list(model.graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor):
            continue
        if not _is_float_value(node):
            continue
        args = list(node.args)
        for index, arg in enumerate(args):
            if isinstance(arg, torch.fx.Node) or not isinstance(arg, (int, float)) or isinstance(arg, bool):
                continue
            name = get_new_attr_name_with_prefix("_tensor_constant_")(model)
            constant = torch.tensor(float(arg))
            model.register_buffer(name, constant)
            with model.graph.inserting_before(node):
                attr_node = model.graph.create_node("get_attr", name, (), {})
            attr_node.meta["val"] = node.meta["val"].fake_mode.from_tensor(constant, static_shapes=True)
            args[index] = attr_node
        node.args = tuple(args)
    model.recompile()
    return model


def drop_integer_annotations(model: torch.fx.GraphModule) -> None:
    """Integer tensors (indices, masks, shapes) are never observed or quantized: remove any
    annotation an integer value got from a pattern or from propagation."""
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    for node in model.graph.nodes:
        annotation = node.meta.get(Q_ANNOTATION_KEY)
        if annotation is None:
            continue
        for source in [a for a in annotation.input_qspec_map if not _is_float_value(a)]:
            del annotation.input_qspec_map[source]
        if annotation.output_qspec is not None and not _is_float_value(node):
            annotation.output_qspec = None


def litert_quantizer(*, per_channel: bool, dynamic: bool,
                     activation_observer: str = DEFAULT_ACTIVATION_OBSERVER,
                     fuse_clamp: bool = True, float_layers: Sequence[str] = ()) -> Any:
    """litert-torch's PT2EQuantizer (TFLite int8 kernels' constraints) with the same recipe
    changes as xnnpack_quantizer: observer choice, clamp fusion, fp32 layers."""
    try:
        from litert_torch.quantize import pt2e_quantizer
    except ImportError as exc:
        raise RuntimeUnavailable(f"litert-torch is not installed ({exc})",
                                 "pip install litert-torch==0.10.0") from exc
    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic)
    if not dynamic and activation_observer != "histogram":
        from torchao.quantization.pt2e.quantizer import QuantizationSpec

        observer_class, arguments = observer_classes()[activation_observer]
        act = config.input_activation
        spec = QuantizationSpec(dtype=act.dtype, observer_or_fake_quant_ctr=observer_class.with_args(
            eps=2 ** -12, **arguments), quant_min=act.quant_min, quant_max=act.quant_max, qscheme=act.qscheme,
            ch_axis=act.ch_axis, is_dynamic=False)
        config = dataclasses.replace(config, input_activation=spec, output_activation=spec)
    quantizer = _litert_quantizer_class()(fuse_clamp=fuse_clamp and not dynamic, float_layers=tuple(float_layers))
    return quantizer.set_global(config)


@lru_cache(maxsize=1)
def _litert_quantizer_class() -> type:
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    class ClampFusingPT2EQuantizer(PT2EQuantizer):
        """litert-torch's PT2EQuantizer, plus conv/linear + hardtanh fusion and fp32 layers."""

        def __init__(self, fuse_clamp: bool = True, float_layers: tuple[str, ...] = ()) -> None:
            super().__init__()
            self.fuse_clamp, self.float_layers = fuse_clamp, float_layers

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            mark_float_layers(model, self.float_layers)
            if self.fuse_clamp and self.global_config is not None:
                annotate_clamp_fusion(model, self.global_config)
            return super().annotate(model)

    return ClampFusingPT2EQuantizer


def mark_float_layers(model: torch.fx.GraphModule, float_layers: Sequence[str]) -> int:
    """Mark every op of the ``float_layers`` modules (and its weight/bias) as annotated with
    nothing, so no annotator quantizes it: it runs in fp32 between dequantize and quantize."""
    if not float_layers:
        return 0
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, get_module_name_filter
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    filters = [get_module_name_filter(name) for name in float_layers]
    marked = 0
    for node in model.graph.nodes:
        if node.op != "call_function" or not any(f(node) for f in filters):
            continue
        for target in [node, *(a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")]:
            target.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(_annotated=True)
        marked += 1
    return marked


def x86_quantization_config(*, per_channel: bool, activation_observer: str = DEFAULT_ACTIVATION_OBSERVER,
                            weight_bits: int = 8) -> Any:
    """The types onnxruntime's fast x86 int8 kernels (u8s8) take: uint8 affine per-tensor
    activations, int8 symmetric weights per output channel (or per tensor), float bias.
    ``weight_bits`` 7 narrows the weights to [-63, 63] (reduce_range, CPUs without VNNI).

    Measured on EfficientNet-Lite0 (16 held-out views, Xeon with AVX-512 VNNI, onnxruntime,
    2 threads): logits cosine min 0.995, SQNR 20.6 dB, top-1 16/16, 1.94x fp32 speed; int8
    activations are as accurate but no faster than fp32 (0.98x), and 7-bit weights cost 4 dB."""
    try:
        from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    stock = _xnnpack_module().get_symmetric_quantization_config(is_per_channel=per_channel)
    observer_class, arguments = observer_classes()[activation_observer]
    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                           is_dynamic=False, observer_or_fake_quant_ctr=observer_class.with_args(eps=2 ** -12,
                                                                                                 **arguments))
    weight = stock.weight
    if weight_bits != 8:
        limit = (1 << (weight_bits - 1)) - 1
        weight = dataclasses.replace(weight, quant_min=-limit, quant_max=limit)
    return QuantizationConfig(act, act, weight, stock.bias, False)


def x86_quantizer(recipe: Recipe) -> Any:
    """The clamp-fusing XNNPACKQuantizer (same annotation rules and float_layers filter) with
    x86_quantization_config: the QDQ ONNX that onnxruntime runs on x86 (export/onnx_qdq.py)."""
    if recipe.dynamic:
        raise ValueError("the x86 quantizer is static int8 only (onnx int8-dynamic is onnxruntime's quantize_dynamic)")
    quantizer = _quantizer_class()(fuse_clamp=recipe.fuse_clamp)
    quantizer.set_global(x86_quantization_config(per_channel=recipe.per_channel,
                                                 activation_observer=recipe.activation_observer,
                                                 weight_bits=recipe.weight_bits))
    if recipe.float_layers:
        if not hasattr(quantizer, "set_filter_function"):
            raise RuntimeUnavailable("keeping layers in fp32 (float_layers) needs ExecuTorch's XNNPACKQuantizer",
                                     INSTALL_HINT)
        from torchao.quantization.pt2e.quantizer import get_module_name_filter

        filters = [get_module_name_filter(name) for name in recipe.float_layers]
        quantizer.set_filter_function(lambda node: not any(f(node) for f in filters))
    return quantizer


def make_quantizer(recipe: Recipe) -> Any:
    """The quantizer that annotates the recipe's graph, configured: the one place a Recipe
    becomes a PT2E quantizer (recipe.annotate_as, when set, names whose rules annotate)."""
    if recipe.quantizer == "x86":
        return x86_quantizer(recipe)
    if recipe.quantizer == "litert" and recipe.annotate_as is None:
        return litert_quantizer(per_channel=recipe.per_channel, dynamic=recipe.dynamic,
                                activation_observer=recipe.activation_observer, fuse_clamp=recipe.fuse_clamp,
                                float_layers=recipe.float_layers)
    return xnnpack_quantizer(per_channel=recipe.per_channel, dynamic=recipe.dynamic,
                             activation_observer=recipe.activation_observer, fuse_clamp=recipe.fuse_clamp,
                             float_layers=recipe.float_layers)


_HARDTANH = ("hardtanh.default", "hardtanh_.default")


def annotate_clamp_fusion(model: torch.fx.GraphModule, config: Any, filter_fn: Any = None) -> list[list]:
    """Annotate every conv/linear whose only user is a hardtanh as one partition with the
    output observer after the hardtanh (what the stock quantizer does for relu)."""
    from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, get_bias_qspec,
                                                     get_input_act_qspec, get_output_act_qspec,
                                                     get_weight_qspec)
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    def annotated(nodes: list) -> bool:
        return any(Q_ANNOTATION_KEY in n.meta and n.meta[Q_ANNOTATION_KEY]._annotated for n in nodes)

    partitions = []
    for clamp in model.graph.nodes:
        if not is_op(clamp, _HARDTANH):
            continue
        producer = clamp.args[0]
        if not isinstance(producer, torch.fx.Node) or len(producer.users) != 1:
            continue
        if not is_op(producer, ("conv1d.default", "conv2d.default", "linear.default")) and not (
                is_op(producer, ("convolution.default",)) and not producer.args[6]):  # not transposed
            continue
        act, weight = producer.args[0], producer.args[1]
        bias = producer.args[2] if len(producer.args) > 2 else None
        if not isinstance(act, torch.fx.Node) or not isinstance(weight, torch.fx.Node):
            continue
        partition = [clamp, producer, weight] + ([bias] if isinstance(bias, torch.fx.Node) else [])
        if annotated(partition) or (filter_fn is not None and not all(filter_fn(n) for n in partition)):
            continue
        qspecs = {act: get_input_act_qspec(config), weight: get_weight_qspec(config)}
        if isinstance(bias, torch.fx.Node):
            qspecs[bias] = get_bias_qspec(config)
        producer.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config),
                                                              _annotated=True)
        for node in partition:
            if Q_ANNOTATION_KEY not in node.meta:
                node.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation()
            node.meta[Q_ANNOTATION_KEY]._annotated = True
        partitions.append(partition)
    return partitions

