"""A small BERT-shaped encoder with what a Hugging Face BertModel brings to its embeddings: a token
table with ``padding_idx=0`` (BERT's pad_token_id), position and token-type tables looked up with
constant index buffers, LayerNorm, one self-attention block and a GELU MLP, then the masked mean,
L2-normalised (all-MiniLM-L6-v2's head).

Before the fix in quant/weight_only.py its int8 embedding tables crashed the .pte export: the
token table's lookup is ``aten.embedding(dq(table), ids, padding_idx=0)``, which ExecuTorch's
quantized-embedding fusion does not match, so ``torchao::dequantize_affine`` was left outside
XNNPACK (the position/token-type lookups, with no padding_idx, were fused).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgepack import ModelSpec

VOCAB, HIDDEN, HEADS, MLP, SEQUENCE = 64, 32, 2, 64, 16


class PaddedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.word_embeddings = nn.Embedding(VOCAB, HIDDEN, padding_idx=0)
            self.position_embeddings = nn.Embedding(SEQUENCE, HIDDEN)
            self.token_type_embeddings = nn.Embedding(2, HIDDEN)
            self.embedding_norm = nn.LayerNorm(HIDDEN)
            self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
            self.out = nn.Linear(HIDDEN, HIDDEN)
            self.attention_norm = nn.LayerNorm(HIDDEN)
            self.up = nn.Linear(HIDDEN, MLP)
            self.down = nn.Linear(MLP, HIDDEN)
            self.mlp_norm = nn.LayerNorm(HIDDEN)
        # as transformers' BertEmbeddings: constant index buffers, not inputs
        self.register_buffer("position_ids", torch.arange(SEQUENCE).unsqueeze(0), persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, SEQUENCE, dtype=torch.int64), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids)
             + self.token_type_embeddings(self.token_type_ids))
        x = self.embedding_norm(x)
        batch, seq, _ = x.shape
        q, k, v = (t.reshape(batch, seq, HEADS, HIDDEN // HEADS).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + bias
        context = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, seq, HIDDEN)
        x = self.attention_norm(x + self.out(context))
        x = self.mlp_norm(x + self.down(F.gelu(self.up(x))))
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        return F.normalize((x * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=1)


def token_samples(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[CLS]-like first token, random words, then padding (id 0) to SEQUENCE."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        length = int(torch.randint(4, SEQUENCE + 1, (1,), generator=generator))
        mask = (torch.arange(SEQUENCE) < length).to(torch.int64).unsqueeze(0)
        ids = torch.randint(2, VOCAB, (1, SEQUENCE), generator=generator)
        ids[0, 0] = 1
        samples.append((ids * mask, mask))
    return samples


def spec() -> ModelSpec:
    samples = token_samples(24, seed=1)
    return ModelSpec(name="padded-encoder", model=PaddedEncoder().eval(), example_inputs=samples[0],
                     calibration=samples[:16], holdout=samples[16:], input_names=["input_ids", "attention_mask"],
                     output_names=["sentence_embedding"], score_outputs=[])
