"""Post-training PT2E int8: capture the model, annotate it with the recipe's quantizer,
calibrate (static) or not (dynamic), correct biases, convert. See quant/recipe.py."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..cache import weights_digest
from ..errors import NothingToQuantize, RuntimeUnavailable
from .bias_correction import FloatMeanRecorder, bias_correct
from .emulate import is_observer
from .quantizers import make_quantizer
from .recipe import BIAS_CORRECTION_MAX_SAMPLES, INSTALL_HINT, Recipe, check_float_layers, recipe_record

InputTuple = tuple[torch.Tensor, ...]

def calibration_batches(calibration: Sequence[InputTuple], example_inputs: InputTuple,
                        limit: int) -> Iterator[InputTuple]:
    """Yield at most ``limit`` input tuples shaped exactly like ``example_inputs``.

    The captured graph has static shapes, so each calibration tuple must match the example.
    A calibration batch of B samples is split into single samples when the example batch
    size is 1 and the other dimensions agree. Raises ValueError on any other mismatch.
    """
    produced = 0
    for index, sample in enumerate(calibration):
        if produced >= limit:
            return
        sample = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)
        if len(sample) != len(example_inputs):
            raise ValueError(f"calibration sample {index} has {len(sample)} inputs, "
                             f"the model takes {len(example_inputs)}")
        for part in _split_to_example(sample, example_inputs, index):
            if produced >= limit:
                return
            produced += 1
            yield part


def _split_to_example(sample: InputTuple, example: InputTuple, index: int) -> list[InputTuple]:
    if all(s.shape == e.shape for s, e in zip(sample, example)):
        return [sample]
    batch_sizes = {s.shape[0] for s in sample if s.dim() > 0}
    splittable = (
        len(batch_sizes) == 1
        and all(e.dim() > 0 and e.shape[0] == 1 for e in example)
        and all(s.shape[1:] == e.shape[1:] for s, e in zip(sample, example))
    )
    if not splittable:
        got = [tuple(s.shape) for s in sample]
        want = [tuple(e.shape) for e in example]
        raise ValueError(f"calibration sample {index} has input shapes {got}; "
                         f"the exported graph is static and needs {want}")
    (batch,) = batch_sizes
    return [tuple(s[i:i + 1] for s in sample) for i in range(batch)]


# --------------------------------------------------------------------------- quantize


_EVAL_DROPOUT = ("dropout.default", "feature_dropout.default", "alpha_dropout.default",
                 "feature_alpha_dropout.default")


def capture(model: nn.Module, example_inputs: InputTuple) -> torch.fx.GraphModule:
    """torch.export the model (eval mode) and return the ATen-level GraphModule PT2E works on,
    with eval-mode dropout (an identity) removed.

    Why remove it: no quantizer annotates dropout, so a quantized producer and its consumer
    separated by one get two observers and the graph requantizes (q -> dq -> q) in between.
    MobileNetV2's classifier is such a consumer. ExecuTorch computes that chain as written;
    litert-torch 0.10.0 folds it wrongly (see export/tflite.py repair_bias_scales).
    """
    graph_module = torch.export.export(model, tuple(example_inputs)).module()
    removed = 0
    for node in list(graph_module.graph.nodes):
        name = str(node.target).removeprefix("aten.")
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if node.op == "call_function" and name in _EVAL_DROPOUT and train is False:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            removed += 1
    if removed:
        graph_module.graph.lint()
        graph_module.recompile()
    return graph_module


def prepare_calibrated(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
                       recipe: Recipe) -> tuple[torch.fx.GraphModule, int]:
    """Capture, annotate and calibrate: (prepared GraphModule with observers, samples used).

    Static quantization raises ValueError if there is no calibration data (calibrating on
    nothing would give meaningless activation ranges). Dynamic quantization ignores it.
    """
    recipe = resolve_annotation(model, example_inputs, recipe)
    prepared, used, _ = _calibrated(model, example_inputs, calibration, recipe, record_means=0)
    return prepared, used


def resolve_annotation(model: nn.Module, example_inputs: InputTuple, recipe: Recipe) -> Recipe:
    """The recipe to calibrate: a static litert recipe annotated by XNNPACKQuantizer's rules
    where, on this model, they place exactly the observers litert-torch's PT2EQuantizer places
    (``same_observers``); otherwise ``recipe`` itself.

    Why: the observers then see the same values, so the .pte's calibration and bias correction
    serve the .tflite (one calibration per build, not one per format), and a residual add that
    reads another add's output reads it in int8; litert-torch's rules leave that input float,
    which puts a float ADD between DEQUANTIZE and QUANTIZE ops in the .tflite. Measured on
    EfficientNet-Lite0 (16 held-out views, LiteRT): own rules 7 float ADDs, 11 DEQUANTIZE,
    logit cosine min/mean 0.99492/0.99686, SQNR mean 20.5 dB; XNNPACK's rules no float op,
    1 DEQUANTIZE, 0.99463/0.99690, 20.7 dB, top-1 16/16 both; 0.2% fewer executed instructions
    per inference under emulated cortex-a76/a53. MobileNetV2 with ImageNet weights, whose static
    int8 fails the 0.98 floor either way: cosine min 0.9607 -> 0.9504 (its .pte: 0.9521), the
    residual sums now quantized as on the .pte. Transformers (MiniLM) and the digits CNN get
    other observers from the two quantizers and keep litert-torch's.
    """
    if recipe.quantizer != "litert" or recipe.dynamic or recipe.annotate_as is not None:
        return recipe
    candidate = dataclasses.replace(recipe, annotate_as="xnnpack")

    def compare() -> bool:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

        check_float_layers([name for name, _ in model.named_modules()], recipe.float_layers)
        captured = capture(model, example_inputs)
        theirs = prepare_pt2e(copy.deepcopy(captured), make_quantizer(candidate))
        return same_observers(prepare_pt2e(captured, make_quantizer(recipe)), theirs)

    key = ("annotation", recipe, weights_digest(model), tuple((tuple(t.shape), t.dtype) for t in example_inputs))
    compatible, _ = shared_result(key, compare)
    return candidate if compatible else recipe


def _observer_config(module: nn.Module) -> tuple:
    return (type(module).__name__, *(str(getattr(module, name, None)) for name in
                                     ("dtype", "qscheme", "quant_min", "quant_max", "ch_axis", "eps")))


def same_observers(ours: torch.fx.GraphModule, theirs: torch.fx.GraphModule) -> bool:
    """True when two prepared graphs of one captured model have the same nodes and observers
    (name, class, dtype, range, scheme, axis, eps; each observing the same value) and differ at
    most where an op of ``theirs`` reads a value through its observer and ``ours`` reads it
    directly (the value is quantized in both; only that input's use of it differs)."""
    ours_nodes, their_nodes = list(ours.graph.nodes), list(theirs.graph.nodes)
    if len(ours_nodes) != len(their_nodes):
        return False
    for mine, their in zip(ours_nodes, their_nodes):
        if (mine.op, str(mine.target), mine.name) != (their.op, str(their.target), their.name):
            return False
        if mine.op == "call_module" and (_observer_config(ours.get_submodule(mine.target))
                                         != _observer_config(theirs.get_submodule(their.target))):
            return False
        mine_args, _ = torch.utils._pytree.tree_flatten((mine.args, mine.kwargs))
        their_args, _ = torch.utils._pytree.tree_flatten((their.args, their.kwargs))
        if len(mine_args) != len(their_args):
            return False
        for a, b in zip(mine_args, their_args):
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
                through_observer = (b.op == "call_module" and is_observer(theirs.get_submodule(b.target))
                                    and b.args[0].name == a.name)
                if a.name != b.name and not through_observer:
                    return False
            elif isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node) or str(a) != str(b):
                return False
    return True


@torch.no_grad()
def _calibrated(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple], recipe: Recipe,
                record_means: int) -> tuple[torch.fx.GraphModule, int, dict[str, list[torch.Tensor]]]:
    """prepare_calibrated, also keeping the bias correction's float figures of the first
    ``record_means`` samples (FloatMeanRecorder: the calibration pass is that float pass)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    check_float_layers([name for name, _ in model.named_modules()], recipe.float_layers)
    quantizer = make_quantizer(recipe)
    prepared = prepare_pt2e(capture(model, example_inputs), quantizer)
    if not any(is_observer(module) for module in prepared.modules()):
        raise NothingToQuantize("int8: the recipe found no op to quantize in this model (no conv, linear or other "
                                "op its quantizer takes)", "use fp32 for this model, or set the profile's "
                                "unquantizable: keep_float to ship fp32 where int8 has nothing to do")
    used = 0
    recorder = FloatMeanRecorder(prepared) if record_means and not recipe.dynamic else None
    if recipe.dynamic:
        prepared(*example_inputs)  # placeholder observers; one pass keeps convert_pt2e happy
    else:
        for batch in calibration_batches(calibration, example_inputs, recipe.calibration_samples):
            if recorder is not None and used < record_means:
                recorder.run(*batch)
            else:
                prepared(*batch)
            used += 1
        if used == 0:
            raise ValueError("static int8 quantization needs calibration data and got none")
        for module in prepared.modules():  # ranges final: search once, drop what the search kept
            if hasattr(module, "settle"):
                module.settle()
    return prepared, used, recorder.means if recorder is not None else {}


# One calibration per recipe per build (``shared_calibration``): the second export of the
# reproducibility check reuses the first's calibrated graph. Calibration with MSE ranges and
# bias correction is most of an int8 export (EfficientNet-Lite0 .pte: 216 of 257 s, measured
# at load 9 on 2 cores), so the check costs the conversion, lowering and serialisation only.
_SHARED: dict[tuple, Any] | None = None


@contextlib.contextmanager
def shared_calibration() -> Iterator[None]:
    """Within the block, prepare_corrected returns a copy of an earlier result for the same model
    weights, inputs and recipe instead of calibrating again."""
    global _SHARED
    outer, _SHARED = _SHARED, {}
    try:
        yield
    finally:
        _SHARED = outer


def shared_result(key: tuple, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """Within ``shared_calibration``, a copy of the value computed earlier for ``key`` (and True);
    otherwise ``compute()`` (remembered for the block when one is open) and False."""
    if _SHARED is not None and key in _SHARED:
        return copy.deepcopy(_SHARED[key]), True
    value = compute()
    if _SHARED is not None:
        _SHARED[key] = copy.deepcopy(value)
    return value, False


def inputs_digest(samples: Sequence[InputTuple]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        for tensor in sample:
            array = tensor.detach().cpu().contiguous()
            digest.update(f"{tuple(array.shape)}{array.dtype}".encode())
            digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes() if array.numel() else b"")
        digest.update(b"|")
    return digest.hexdigest()


def prepare_corrected(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
                      recipe: Recipe) -> tuple[torch.fx.GraphModule, dict]:
    """prepare_calibrated, then bias correction if the recipe asks for it (static only):
    (prepared graph ready for convert_pt2e, recipe record for the manifest)."""
    recipe = resolve_annotation(model, example_inputs, recipe)
    key = None
    if _SHARED is not None:
        # keyed by what decides the calibrated graph: the annotation's rules and the samples used
        annotation = dataclasses.replace(recipe, quantizer=recipe.annotate_as or recipe.quantizer, annotate_as=None)
        used = list(calibration_batches(calibration, example_inputs, recipe.calibration_samples))
        key = (annotation, weights_digest(model), inputs_digest([tuple(example_inputs)] + used))
        if key in _SHARED:
            prepared, record = _SHARED[key]
            record = {**recipe_record(recipe, record["calibration_samples"]),
                      "bias_correction": copy.deepcopy(record["bias_correction"]), "calibration_shared": True}
            return copy.deepcopy(prepared), record
    prepared, record = _prepare_corrected(model, example_inputs, calibration, recipe)
    if key is not None:
        _SHARED[key] = (copy.deepcopy(prepared), copy.deepcopy(record))
    return prepared, record


def _prepare_corrected(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
                       recipe: Recipe) -> tuple[torch.fx.GraphModule, dict]:
    correct = recipe.bias_correction and not recipe.dynamic
    prepared, used, float_means = _calibrated(model, example_inputs, calibration, recipe,
                                              record_means=BIAS_CORRECTION_MAX_SAMPLES if correct else 0)
    record = recipe_record(recipe, used)
    if correct:
        samples = list(calibration_batches(calibration, example_inputs,
                                           min(used, BIAS_CORRECTION_MAX_SAMPLES)))
        record["bias_correction"] = bias_correct(prepared, samples, float_means=float_means)
    return prepared, record


@torch.no_grad()
def quantize(model: nn.Module, example_inputs: InputTuple, calibration: Sequence[InputTuple],
             recipe: Recipe = Recipe(), reason: str | None = None) -> tuple[torch.fx.GraphModule, dict]:
    """Post-training int8 quantization with ``recipe``: (converted GraphModule, recipe record).
    The converted graph is float-in/float-out with q/dq pairs around each quantized op."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    prepared, record = prepare_corrected(model, example_inputs, calibration, recipe)
    if reason:
        record["reason"] = reason
    return convert_pt2e(prepared), record
