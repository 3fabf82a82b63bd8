"""quant/graph.py: op names of captured graph nodes and module attributes by dotted path."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.quant.graph import attr, is_op, op_name, replace_attr


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_op_names_and_overloads():
    graph = torch.export.export(Tiny().eval(), (torch.zeros(1, 3, 8, 8),)).module()
    calls = [n for n in graph.graph.nodes if n.op == "call_function"]
    assert [op_name(n) for n in calls] == ["conv2d", "hardtanh"]
    assert is_op(calls[0], ("conv2d.default",)) and not is_op(calls[0], ("conv2d.padding",))
    assert not is_op(next(n for n in graph.graph.nodes if n.op == "placeholder"), ("conv2d.default",))


def test_replace_attr_never_writes_into_the_shared_tensor():
    model = Tiny()
    shared = model.block[0].bias
    before = shared.detach().clone()
    replace_attr(model, "block.0.bias", torch.ones(4))
    assert isinstance(model.block[0].bias, nn.Parameter) and torch.equal(attr(model, "block.0.bias"), torch.ones(4))
    assert torch.equal(shared.detach(), before)  # whoever else held the old tensor still sees it
