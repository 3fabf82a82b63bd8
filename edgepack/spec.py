"""ModelSpec: what a user hands edgepack, and how it is loaded.

A spec comes from a Python file exposing ``spec() -> ModelSpec`` or from
``package.module:function``. Spec files are code: loading one runs it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import itertools
import math
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import EdgepackError, SpecError

InputTuple = tuple[torch.Tensor, ...]
# Calibration samples a build reads at most (quantizers cap themselves lower; see each recipe).
MAX_CALIBRATION = 1024
# A bundle name becomes a directory and a shell word on the device (device/run_android.sh).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ModelSpec:
    """A model and the data edgepack needs to compress, export and validate it.

    name: short identifier used in bundle paths (``dist/<name>/<target>``).
    model: the float torch model.
    example_inputs: one input tuple (batch 1) fixing shapes and dtypes of the export.
    calibration: re-iterable of input tuples, real samples used for quantization
        calibration and parity.
    holdout: optional re-iterable of held-out input tuples, added to the parity set.
    evaluate: optional ``evaluate(fn) -> dict[str, float]`` where ``fn`` maps an input
        tuple to a tuple of output tensors; used to measure the float model and every
        artifact (run in its own runtime) on held-out data.
    train_data: optional re-iterable of ``(inputs_tuple, target)`` for stages that fine-tune.
    loss: optional ``loss(outputs_tuple, target) -> Tensor`` (default: cross-entropy on output 0).
    student: optional ``student() -> nn.Module`` for distillation into a smaller model.
    input_names / output_names: optional names; default ``input_0..`` / ``output_0..``.
    score_outputs: optional names of the outputs holding class scores (judged by top-1 too);
        default: any [1, C] float output.
    output_masks: optional {output name: input name}: judge that output only where the input
        is nonzero (e.g. a per-token output and its attention_mask, so padding does not count).
    """

    name: str
    model: nn.Module
    example_inputs: InputTuple
    calibration: Iterable[InputTuple]
    holdout: Iterable[InputTuple] | None = None
    evaluate: Callable[[Callable[[InputTuple], tuple[torch.Tensor, ...]]], dict[str, float]] | None = None
    train_data: Iterable[tuple[InputTuple, torch.Tensor]] | None = None
    loss: Callable[..., torch.Tensor] | None = None
    student: Callable[[], nn.Module] | None = None
    input_names: Sequence[str] | None = None
    output_names: Sequence[str] | None = None
    score_outputs: Sequence[str] | None = None
    output_masks: Mapping[str, str] | None = None
    source: str = ""
    source_sha256: str = ""
    notes: list[str] = field(default_factory=list)

    def resolved_input_names(self) -> list[str]:
        if self.input_names:
            return list(self.input_names)
        return [f"input_{i}" for i in range(len(self.example_inputs))]

    def resolved_output_names(self, n_outputs: int) -> list[str]:
        if self.output_names:
            return list(self.output_names)
        return [f"output_{i}" for i in range(n_outputs)]


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _raised_at(exc: BaseException) -> str:
    """' at file:line' of the innermost frame that raised ``exc`` (the user's code, usually)."""
    tb = traceback.extract_tb(exc.__traceback__)
    return f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""


def _call_spec_fn(fn: Callable[[], Any], where: str) -> Any:
    try:
        return fn()
    except SpecError:
        raise
    except Exception as exc:  # a user's spec() may raise anything; report it with its location
        raise SpecError(
            f"{where}: spec() raised {type(exc).__name__}: {exc}{_raised_at(exc)}",
            "fix the spec function so that it returns a ModelSpec (run with --debug for the traceback)",
        ) from exc


def import_spec_module(module_name: str, path: Path) -> Any:
    """Import the spec file ``path`` as module ``module_name`` (registered in sys.modules, so the
    classes it defines pickle and unpickle by that name), with its folder on the path while it
    runs so that it can import its siblings (models/_common.py). None: not a loadable file."""
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    folder = str(Path(path).resolve().parent)
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def load_spec(ref: str) -> ModelSpec:
    """Load a ModelSpec from ``path/to/spec.py`` (its ``spec()``), ``path/to/spec.py:function``
    or ``package.module:function``, and check it."""
    file_part, _, function_name = ref.rpartition(":")
    if file_part.endswith(".py"):
        ref, function_name = file_part, function_name
    else:
        function_name = "spec"
    path = Path(ref)
    if ref.endswith(".py") or path.exists() or "/" in ref:
        if not path.is_file():
            raise SpecError(f"{ref}: spec file not found", "pass a Python file that defines spec() -> ModelSpec")
        # Named by the file's name and content, not its path: exported graphs record the module's
        # name (ONNX name scopes), and a checkout elsewhere must give the same artifact bytes.
        stem = re.sub(r"\W", "_", path.stem)
        module_name = f"edgepack_spec_{stem}_{hashlib.sha1(path.read_bytes()).hexdigest()[:12]}"
        try:
            module = import_spec_module(module_name, path)
            if module is None:
                raise SpecError(f"{ref}: not a loadable Python file", "pass a .py file defining spec()")
        except SyntaxError as exc:
            raise SpecError(
                f"{ref}:{exc.lineno}:{exc.offset}: Python syntax error: {exc.msg}",
                "fix the syntax error in the spec file",
            ) from exc
        except SpecError:
            raise
        except Exception as exc:
            raise SpecError(
                f"{ref}: importing the spec file raised {type(exc).__name__}: {exc}",
                "fix the spec file so that it imports cleanly (run with --debug for the traceback)",
            ) from exc
        fn = getattr(module, function_name, None)
        if not callable(fn):
            raise SpecError(f"{ref}: no function {function_name}() found",
                            f"define {function_name}() -> edgepack.ModelSpec in the file")
        source, digest = str(path), _sha256_file(path)
    else:
        if ":" not in ref:
            raise SpecError(
                f"{ref}: not a spec file nor a 'package.module:function' reference",
                "pass models/x.py or package.module:function",
            )
        mod_name, fn_name = ref.split(":", 1)
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:
            raise SpecError(f"{ref}: cannot import module {mod_name!r}: {type(exc).__name__}: {exc}",
                            f"the module must be importable from here (on sys.path, e.g. installed or run from "
                            f"its project root), or pass its file: path/to/{mod_name.rsplit('.', 1)[-1]}.py:{fn_name}"
                            ) from exc
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise SpecError(f"{ref}: module {mod_name!r} has no callable {fn_name!r}", "name a function returning a ModelSpec")
        source = ref
        mod_file = getattr(module, "__file__", None)
        digest = _sha256_file(Path(mod_file)) if mod_file else ""
    result = _call_spec_fn(fn, ref)
    if not isinstance(result, ModelSpec):
        raise SpecError(
            f"{ref}: spec() returned {type(result).__name__}, not edgepack.ModelSpec",
            "return edgepack.ModelSpec(name=..., model=..., example_inputs=..., calibration=...)",
        )
    result.source = source
    result.source_sha256 = digest
    check_spec(result, ref)
    return result


def check_spec(spec: ModelSpec, where: str) -> None:
    """Validate a spec's fields and run the model once on its example inputs."""
    if not isinstance(spec.name, str) or not SAFE_NAME.fullmatch(spec.name):
        raise SpecError(f"{where}: name {spec.name!r} is not a safe bundle name",
                        "use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit), "
                        "like 'digits-cnn': the name becomes a path and a shell word on the device")
    if not isinstance(spec.model, nn.Module):
        raise SpecError(f"{where}: model is {type(spec.model).__name__}, not torch.nn.Module", "set model= to an nn.Module")
    if not isinstance(spec.example_inputs, tuple) or not spec.example_inputs or not all(
        isinstance(t, torch.Tensor) for t in spec.example_inputs
    ):
        raise SpecError(
            f"{where}: example_inputs must be a non-empty tuple of tensors",
            "pass example_inputs=(torch.randn(1, ...),)",
        )
    if spec.model.training:
        spec.model.eval()
        spec.notes.append("the model was in training mode; edgepack put it in eval mode")
    try:
        with torch.no_grad():
            out = spec.model(*spec.example_inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for t in spec.example_inputs)
        raise SpecError(
            f"{where}: the model does not run on example_inputs ({shapes}): {type(exc).__name__}: {exc}",
            "make example_inputs match the model's forward() signature and shapes",
        ) from exc
    outputs = out if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise SpecError(f"{where}: the model must return a tensor or a tuple of tensors", "return tensors from forward()")
    n_inputs = len(spec.example_inputs)
    if spec.input_names is not None and len(spec.input_names) != n_inputs:
        raise SpecError(f"{where}: {len(spec.input_names)} input_names for {n_inputs} inputs", "give one name per input")
    if spec.output_names is not None and len(spec.output_names) != len(outputs):
        raise SpecError(f"{where}: {len(spec.output_names)} output_names for {len(outputs)} outputs", "give one name per output")
    if spec.output_masks is not None:
        inputs = spec.resolved_input_names()
        outputs_named = spec.resolved_output_names(len(outputs))
        for output, mask in dict(spec.output_masks).items():
            if output not in outputs_named or mask not in inputs:
                raise SpecError(f"{where}: output_masks maps {output!r} -> {mask!r}; outputs are {outputs_named}, "
                                f"inputs {inputs}", "map an output name to the input that marks its valid positions")
            shape_in = tuple(spec.example_inputs[inputs.index(mask)].shape)
            shape_out = tuple(outputs[outputs_named.index(output)].shape)
            if shape_out[:len(shape_in)] != shape_in:
                raise SpecError(f"{where}: output_masks: {mask!r} {shape_in} does not lead {output!r} {shape_out}",
                                "the mask's shape must be the output's leading dims, e.g. [1, S] for [1, S, H]")
    for label, data in (("calibration", spec.calibration), ("holdout", spec.holdout), ("train_data", spec.train_data)):
        if data is not None and not _reiterable(data):
            raise SpecError(f"{where}: {label} is a one-shot iterator ({type(data).__name__}); edgepack reads it more "
                            f"than once", "pass a list, or an object whose __iter__ starts over each time")
    if not check_samples(spec.calibration, f"{where}: calibration", spec.example_inputs, MAX_CALIBRATION):
        raise SpecError(f"{where}: calibration is empty", "give at least one real input sample in calibration")
    if spec.holdout is not None:
        check_samples(spec.holdout, f"{where}: holdout", spec.example_inputs, MAX_CALIBRATION)
    if spec.evaluate is not None:
        if not callable(spec.evaluate):
            raise SpecError(f"{where}: evaluate is {type(spec.evaluate).__name__}, not callable",
                            "set evaluate= to a function evaluate(fn) -> {'top1': ...}, or leave it out")
        spec.evaluate = guarded_evaluate(spec.evaluate, where)


def guarded_evaluate(evaluate: Callable[..., Any], where: str) -> Callable[..., dict[str, float]]:
    """Wrap a spec's evaluate() so that its failures are SpecErrors naming evaluate (exit 2).

    evaluate() is the user's code, called with the float model and with every artifact; whatever
    it raises or returns must not surface as a raw traceback. Edgepack's own errors raised through
    it (a runtime crashing inside ``fn``) pass unchanged.
    """
    if getattr(evaluate, "_edgepack_guarded", False):
        return evaluate

    @functools.wraps(evaluate)
    def guarded(fn: Callable[..., Any]) -> dict[str, float]:
        try:
            values = evaluate(fn)
        except EdgepackError:
            raise
        except Exception as exc:  # the user's evaluate() may raise anything; report it with its location
            raise SpecError(
                f"{where}: evaluate() raised {type(exc).__name__}: {exc}{_raised_at(exc)}",
                "fix the spec's evaluate(fn); it must return a dict of metric name -> number "
                "(run with --debug for the traceback)",
            ) from exc
        return _checked_metrics(values, where)

    guarded._edgepack_guarded = True  # type: ignore[attr-defined]
    return guarded


def _checked_metrics(values: Any, where: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise SpecError(f"{where}: evaluate() returned {type(values).__name__}, not a dict of metrics",
                        "return a dict such as {'top1': 0.97}")
    metrics: dict[str, float] = {}
    for key, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{where}: evaluate() returned {type(value).__name__} for metric {key!r}, not a number",
                            "return one number per metric, e.g. {'top1': 0.97}") from None
        if not math.isfinite(number):
            raise SpecError(f"{where}: evaluate() returned {number} for metric {key!r}",
                            "return finite numbers; check the evaluation data and the model's outputs")
        metrics[str(key)] = number
    return metrics


def _reiterable(data: Any) -> bool:
    """Whether iterating ``data`` again starts over (a list, a tuple, a Dataset-like object), as
    opposed to a generator or iterator that a first pass would consume."""
    try:
        return iter(data) is not data
    except TypeError:
        return False


def check_samples(samples: Iterable[InputTuple], where: str, example: InputTuple, limit: int) -> int:
    """Check up to ``limit`` samples one at a time, keeping none (memory stays that of one
    sample); returns how many were checked."""
    count = 0
    for _ in _checked(samples, where, example, limit):
        count += 1
    return count


def calibration_list(samples: Iterable[InputTuple], where: str, example: InputTuple, limit: int | None = None) -> list[InputTuple]:
    """Materialise up to ``limit`` samples, checking each one's arity, shape, dtype and finiteness."""
    return list(_checked(samples, where, example, limit))


def _checked(samples: Iterable[InputTuple], where: str, example: InputTuple, limit: int | None):
    for index, sample in enumerate(itertools.islice(samples, limit)):  # never asks for one more
        if isinstance(sample, torch.Tensor):
            sample = (sample,)
        if not isinstance(sample, tuple) or len(sample) != len(example):
            raise SpecError(
                f"{where}: sample {index} is not a tuple of {len(example)} tensor(s)",
                "yield one tuple of input tensors per sample, like example_inputs",
            )
        for pos, (tensor, ref) in enumerate(zip(sample, example)):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != ref.shape or tensor.dtype != ref.dtype:
                got = f"{tuple(tensor.shape)}:{tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise SpecError(
                    f"{where}: sample {index} input {pos} is {got}, expected {tuple(ref.shape)}:{ref.dtype}",
                    "make every sample match example_inputs in shape and dtype",
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise SpecError(
                    f"{where}: sample {index} input {pos} has {bad} NaN/Inf value(s)",
                    "remove or fix that sample; calibration must be real, finite data",
                )
        yield tuple(sample)


def as_numpy(sample: InputTuple) -> list[np.ndarray]:
    """One input tuple as numpy arrays (what runtimes are fed)."""
    return [t.detach().cpu().numpy() for t in sample]


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))
