"""Small helpers on captured (torch.export / PT2E) graphs, shared by the recipe's modules and
the diagnosis: what op a node calls, and module attributes by dotted path."""

from __future__ import annotations

import torch
from torch import nn


def op_name(node: torch.fx.Node) -> str:
    """The ATen op a call_function node calls, without namespace or overload (``conv2d``)."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def is_op(node: torch.fx.Node, names: tuple[str, ...]) -> bool:
    """Whether ``node`` calls one of ``names``, spelled ``op.overload`` (``conv2d.default``)."""
    target = getattr(node.target, "_schema", None)
    if node.op != "call_function" or target is None:
        return False
    overload = target.overload_name or "default"
    return f"{target.name.split('::')[-1]}.{overload}" in names


def attr(module: nn.Module, path: str) -> torch.Tensor:
    """The tensor at dotted ``path`` (``conv.bias``) under ``module``."""
    for part in path.split("."):
        module = getattr(module, part)
    return module  # type: ignore[return-value]


def replace_attr(module: nn.Module, path: str, value: torch.Tensor) -> None:
    """Point ``path`` at a new tensor. Never write into the old one: the captured graph shares
    its parameters with the caller's float model, which must stay as it was."""
    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, part)
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter)
            else value)
