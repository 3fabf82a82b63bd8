"""edgepack from Python: build a bundle for a model you have in hand, check it, read its figures.

    python examples/python_api.py [OUT_DIR]

The model is a small CNN trained here for a few seconds on scikit-learn's bundled digits (real
8x8 handwritten digits, shipped inside the package: nothing is downloaded).
"""

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import edgepack


def trained_model():
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[:1200]), labels[:1200]).backward()
        optimizer.step()
    samples = [(images[i:i + 1],) for i in range(1200, 1264)]  # held out from training
    return model.eval(), samples


def main(out: str = "dist") -> int:
    model, samples = trained_model()
    result = edgepack.build(model, "x86-64", out, example_inputs=samples[0], calibration=samples[:48],
                            holdout=samples[48:], name="digits-example", check_reproducible=False,
                            tolerances={"int8": {"min_cosine": 0.98, "min_sqnr_db": 14.0}})
    print(f"build: exit {result.exit_code}, bundle {result.bundle_dir}")
    for artifact in result.manifest.artifacts:
        worst = min(o["cosine_min"] for o in artifact.parity["outputs"])
        print(f"  {artifact.file}: {artifact.precision}, {artifact.bytes:,} bytes, cosine min {worst:.5f}")
    for warning in result.warnings:
        print(f"  warning: {warning}")
    check = edgepack.validate(result.bundle_dir)
    print(f"validate: exit {check.exit_code} ({len(check.artifacts)} artifact(s) re-run from the bundle)")
    return result.exit_code or check.exit_code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
