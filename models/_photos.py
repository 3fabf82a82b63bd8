"""Real photographs for image-model calibration: scikit-image's bundled sample images.

The photos ship inside the scikit-image wheel (no download). Views are random-resized crops
with horizontal flips, resized with antialiasing and ImageNet-normalised, as [1, 3, S, S]
float32 tensors. Calibration and holdout views come from *different photos*, so held-out
parity samples are images the quantizer never saw.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# Colour photos first; greyscale ones are replicated to three channels.
CALIBRATION_PHOTOS: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
    "camera", "moon", "brick", "grass", "coins",
)
HOLDOUT_PHOTOS: tuple[str, ...] = ("motorcycle_left", "retina", "gravel", "clock")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=None)
def load_photo(name: str) -> torch.Tensor:
    """One bundled photo as float32 [3, H, W] in [0, 1]."""
    import skimage.data

    if name == "motorcycle_left":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no photo {name!r}")
        image = loader()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]  # drop alpha
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def _view(photo: torch.Tensor, size: int, generator: torch.Generator, center: bool) -> torch.Tensor:
    _, height, width = photo.shape
    short = min(height, width)
    if center:
        side, top, left, flip = short, (height - short) // 2, (width - short) // 2, False
    else:
        side = int(short * (0.35 + 0.65 * float(torch.rand((), generator=generator))))
        top = int(torch.randint(0, height - side + 1, (), generator=generator))
        left = int(torch.randint(0, width - side + 1, (), generator=generator))
        flip = bool(torch.rand((), generator=generator) < 0.5)
    crop = photo[:, top:top + side, left:left + side].unsqueeze(0)
    if flip:
        crop = crop.flip(-1)
    resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((resized.clamp(0.0, 1.0) - mean) / std).contiguous()


def photo_views(names: tuple[str, ...], count: int, size: int, seed: int) -> list[torch.Tensor]:
    """``count`` views cycling over ``names``: the first pass is centre crops, later ones random crops."""
    generator = torch.Generator().manual_seed(seed)
    views = []
    for index in range(count):
        photo = load_photo(names[index % len(names)])
        views.append(_view(photo, size, generator, center=index < len(names)))
    return views


def calibration_views(count: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    return photo_views(CALIBRATION_PHOTOS, count, size, seed)


def holdout_views(count: int, size: int, seed: int = 1) -> list[torch.Tensor]:
    return photo_views(HOLDOUT_PHOTOS, count, size, seed)
