"""Digits CNN: the classic small CNN trained on scikit-learn's bundled handwritten digits.

conv 1->32, conv 32->64 (3x3, padding 1, ReLU, 2x2 max-pool each), fc 64*6*6 -> 128 -> 10,
input 1x1x24x24 (the 8x8 digits upsampled). Trained on first use (fixed split and seed,
well under a minute on 2 cores) and cached as safetensors in $EDGEPACK_CACHE
(default ~/.cache/edgepack); loading the cache never unpickles anything.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgepack import ModelSpec

SEED = 0
HOLDOUT_FRACTION = 0.2
EPOCHS = 12
BATCH = 64
RECIPE = f"v1-seed{SEED}-ep{EPOCHS}-b{BATCH}"


class DigitsCNN(nn.Module):
    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 6 * 6, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPACK_CACHE", Path.home() / ".cache" / "edgepack"))


SPLIT = ("x_train", "y_train", "x_test", "y_test")


@lru_cache(maxsize=1)
def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); x is float32 [N, 1, 24, 24] in [0, 1]. Made from
    scikit-learn's digits on first use and cached as safetensors beside the weights: importing
    scikit-learn (and scipy) took 1-2 s of every build's spec loading on the build host."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"digits_split-seed{SEED}-holdout{HOLDOUT_FRACTION}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return tuple(stored[name] for name in SPLIT)
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    n_test = int(len(labels) * HOLDOUT_FRACTION)
    test, train = order[:n_test], order[n_test:]
    split = (images[train].contiguous(), labels[train], images[test].contiguous(), labels[test])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(dict(zip(SPLIT, split)), str(tmp))
    os.replace(tmp, path)
    return split


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = EPOCHS, seed: int = SEED,
          teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.5) -> nn.Module:
    """Plain supervised training (or distillation when a teacher is given); deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), BATCH):
            idx = order[start:start + BATCH]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher(x[idx]) / temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
                loss = alpha * kd * temperature**2 + (1 - alpha) * loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def trained_model() -> DigitsCNN:
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"digits_cnn-{RECIPE}.safetensors"
    model = DigitsCNN()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    torch.manual_seed(SEED)
    model = DigitsCNN()
    x_train, y_train, _, _ = load_digits_split()
    train(model, x_train, y_train)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(model.state_dict(), str(tmp))
    os.replace(tmp, path)
    return model.eval()


def top1(fn, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for i in range(len(y)):
        (logits, *_) = fn((x[i:i + 1],))
        correct += int(torch.as_tensor(logits).argmax(dim=1).item() == int(y[i]))
    return correct / len(y)


class _Samples:
    """Re-iterable view of single-sample input tuples."""

    def __init__(self, x: torch.Tensor, count: int | None = None):
        self.x = x if count is None else x[:count]

    def __iter__(self):
        for i in range(len(self.x)):
            yield (self.x[i:i + 1],)

    def __len__(self) -> int:
        return len(self.x)


class _Batches:
    """Re-iterable mini-batches ((x,), y) for fine-tuning stages; fixed order per epoch index."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int = BATCH, seed: int = SEED):
        self.x, self.y, self.batch, self.seed = x, y, batch, seed
        self._epoch = 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        order = torch.randperm(len(self.y), generator=generator)
        for start in range(0, len(self.y), self.batch):
            idx = order[start:start + self.batch]
            yield (self.x[idx],), self.y[idx]


def spec() -> ModelSpec:
    x_train, y_train, x_test, y_test = load_digits_split()
    model = trained_model()

    def evaluate(fn) -> dict[str, float]:
        return {"top1": top1(fn, x_test, y_test)}

    return ModelSpec(
        name="digits-cnn",
        model=model,
        example_inputs=(x_train[:1].clone(),),
        calibration=_Samples(x_train, 128),
        holdout=_Samples(x_test),
        evaluate=evaluate,
        train_data=_Batches(x_train, y_train),
        student=lambda: DigitsCNN(c1=16, c2=32, hidden=64),
        input_names=["image"],
        output_names=["logits"],
    )
