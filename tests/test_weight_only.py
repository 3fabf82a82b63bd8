"""quant/weight_only.py: int8/int4 embedding tables and int4 grouped linears (torchao), on a copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgepack.errors import ExportError
from edgepack.quant.weight_only import embedding_tables, int4_linears


class Tagger(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(50, dim)
        self.proj = nn.Linear(dim, 32)
        self.odd = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.odd(self.proj(self.tokens(ids)))


def test_embedding_tables_int8_per_row_on_a_copy():
    model = Tagger().eval()
    same, record = embedding_tables(model, "fp32", 32)
    assert same is model and record is None
    quantized, record = embedding_tables(model, "int8", 32)
    assert quantized is not model and record["tables"] == ["tokens"] and "per-row" in record["weights"]
    assert type(model.tokens.weight) is nn.Parameter  # the original keeps its float table
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids), model(ids), rtol=0.05, atol=0.05)
    with pytest.raises(ExportError, match="not divisible by group_size"):
        embedding_tables(Tagger(dim=48), "int4", 32)


def test_int4_linears_take_the_ones_whose_inputs_divide_the_group():
    model = Tagger().eval()
    quantized, record = int4_linears(model, 32)
    assert record["quantized_layers"] == ["odd", "proj"] and record["skipped_layers"] == []
    _, record = int4_linears(model, 64)
    assert record["quantized_layers"] == ["proj"] and record["skipped_layers"] == ["odd"]
    with pytest.raises(ExportError, match="no nn.Linear layer"):
        int4_linears(nn.Sequential(nn.Linear(10, 3)), 32)
