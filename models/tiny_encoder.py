"""A tiny BERT-style text encoder, written out here.

Token + learned position embeddings, 4 post-LayerNorm transformer layers (4-head self-attention,
GELU MLP 128 -> 512 -> 128), and BERT's pooler (tanh(Linear) of the first token's state):
vocabulary 1000, hidden 128, sequence 32. Seeded BERT init (N(0, 0.02) weights); not trained.

Inputs: ``input_ids`` int64 [1, 32] and ``attention_mask`` int64 [1, 32] (1 = token, 0 = padding).
Output: ``pooled`` float32 [1, 128], an embedding (not class scores: top-1 is not judged).

Export-friendly by construction, so torch.onnx (dynamo), torch.export/ExecuTorch and litert-torch
all take it: static shapes, no data-dependent control flow, attention written with plain
matmul/softmax (no fused SDPA kernel), and the padding mask applied as an additive bias of
-1e4 (finite, so float16 stays finite and softmax never sees a row of -inf).

Calibration: a deterministic token generator (seeded) of sentences with varying length,
[CLS] ... [SEP] then padding, token ids drawn log-uniformly (frequent ids are common, as in text).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgepack import ModelSpec

SEED = 0
VOCAB = 1000
HIDDEN = 128
LAYERS = 4
HEADS = 4
MLP = 512
SEQUENCE = 32
PAD, CLS, SEP, FIRST_WORD = 0, 1, 2, 5
MIN_LENGTH = 6
MASK_BIAS = -1.0e4
CALIBRATION_SAMPLES = 64
HOLDOUT_SAMPLES = 16


class SelfAttention(nn.Module):
    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, H] -> [B, heads, S, head_dim]
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        batch, _, seq, _ = context.shape
        return self.out(context.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, mlp: int = MLP):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.up = nn.Linear(hidden, mlp)
        self.down = nn.Linear(mlp, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention(x, mask_bias))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


class TinyEncoder(nn.Module):
    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = LAYERS, heads: int = HEADS,
                 mlp: int = MLP, sequence: int = SEQUENCE):
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(sequence, hidden)
        self.register_buffer("position_ids", torch.arange(sequence).unsqueeze(0), persistent=False)
        self.embedding_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, mlp) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.tokens(input_ids) + self.positions(self.position_ids[:, :seq])
        x = self.embedding_norm(x)
        # [B, S] of 1/0 -> [B, 1, 1, S] additive bias: 0 for tokens, -1e4 for padding.
        mask_bias = (1.0 - attention_mask.to(x.dtype)).unsqueeze(1).unsqueeze(2) * MASK_BIAS
        for layer in self.layers:
            x = layer(x, mask_bias)
        return torch.tanh(self.pooler(x[:, 0]))


def token_samples(count: int, seed: int, sequence: int = SEQUENCE) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (input_ids, attention_mask) pairs, each [1, sequence] int64; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    words = VOCAB - FIRST_WORD
    samples = []
    for _ in range(count):
        length = int(torch.randint(MIN_LENGTH, sequence + 1, (), generator=generator))
        # Log-uniform ranks: id FIRST_WORD + r with r = floor(words ** u) - 1, u ~ U(0, 1).
        ranks = torch.floor(words ** torch.rand(length - 2, generator=generator)).long() - 1
        ids = torch.full((1, sequence), PAD, dtype=torch.int64)
        ids[0, 0], ids[0, length - 1] = CLS, SEP
        ids[0, 1:length - 1] = FIRST_WORD + ranks.clamp(0, words - 1)
        mask = (torch.arange(sequence) < length).long().unsqueeze(0)
        samples.append((ids, mask))
    return samples


def build_model(seed: int = SEED) -> TinyEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyEncoder().eval()


def spec() -> ModelSpec:
    calibration = token_samples(CALIBRATION_SAMPLES, seed=SEED + 1)
    holdout = token_samples(HOLDOUT_SAMPLES, seed=SEED + 2)
    return ModelSpec(
        name="tiny-encoder",
        model=build_model(),
        example_inputs=calibration[0],
        calibration=calibration,
        holdout=holdout,
        input_names=["input_ids", "attention_mask"],
        output_names=["pooled"],
        score_outputs=[],  # an embedding: judged by cosine/SQNR, not top-1
        notes=["tiny BERT-style encoder, random init (seed 0); not trained"],
    )
