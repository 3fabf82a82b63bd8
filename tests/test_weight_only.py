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


def test_padding_idx_is_dropped_from_quantized_tables_only():
    """A BERT token table has padding_idx (pad_token_id 0); its lookup then carries padding_idx,
    which ExecuTorch's quantized-embedding fusion does not match. padding_idx only masks a
    gradient: the quantized copy drops it and looks up the same rows."""
    from tests.models.padded_encoder import PaddedEncoder, token_samples

    model = PaddedEncoder().eval()
    quantized, record = embedding_tables(model, "int8", 32)
    assert record["padding_idx_dropped"] == ["word_embeddings"]
    assert quantized.word_embeddings.padding_idx is None and model.word_embeddings.padding_idx == 0
    ids, mask = token_samples(1, seed=0)[0]
    assert (ids == 0).any()  # the padding rows are looked up
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids, mask), model(ids, mask), rtol=0.0, atol=0.02)
    _, plain = embedding_tables(Tagger().eval(), "int8", 32)
    assert "padding_idx_dropped" not in plain  # nothing to say, nothing recorded


def test_int4_linears_carry_the_given_codes():
    """torchao's round-to-nearest codes and scales are replaced by the given ones (GPTQ's)."""
    from edgepack.quant.gptq import IntWeight

    model = Tagger().eval()
    gen = torch.Generator().manual_seed(0)
    given = {name: IntWeight(torch.randint(-8, 8, tuple(model.get_submodule(name).weight.shape), generator=gen,
                                            dtype=torch.int8),
                              torch.rand(model.get_submodule(name).weight.shape[0], shape_in // 32, generator=gen))
             for name, shape_in in (("proj", 64), ("odd", 32))}
    quantized, record = int4_linears(model, 32, given)
    for name in ("proj", "odd"):
        weight = quantized.get_submodule(name).weight
        assert torch.equal(weight.qdata, given[name].codes) and torch.equal(weight.scale, given[name].scales)
        torch.testing.assert_close(weight.dequantize(), given[name].dequantized())
    with pytest.raises(ExportError, match="no int4 codes were chosen for the Linear odd"):
        int4_linears(model, 32, {"proj": given["proj"]})
    with pytest.raises(ExportError, match="do not fit"):
        int4_linears(model, 32, {**given, "odd": given["proj"]})
