"""A larger and harder task built offline from scikit-learn's digits: ``digits16``.

Each sample is one of the 1,797 8×8 digits, upsampled to 16×16 and then randomly rotated
(±15°), scaled (0.85-1.15), shifted (±2 px) and blurred or sharpened by Gaussian noise
(σ = 0.15), clipped to [0, 1]. Training samples are drawn from the digits' own training images
and test samples from its test images (the stratified 80/20 split the tool uses for digits), so
no test image is a distortion of a training image. The result is a ``tensors`` file
(``x_train``, ``y_train``, ``x_test``, ``y_test``) that ``data.dataset: tensors`` reads.

    .venv/bin/python benchmarks/digits16.py --train 16000 --output digits16-16k.npz
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

TEST_FRACTION = 0.2  # the digits split of gifcli.data: 1,438 train / 359 test images
SPLIT_SEED = 0
SIDE = 16


def base_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as float images in [0, 1], upsampled to 16×16, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    return images[train], labels[train], images[test], labels[test]


def distorted(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int):
    """``n`` random distortions of random images of ``images``."""
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(images), (n,), generator=generator)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-15, 15) * math.pi / 180
    scale = uniform(0.85, 1.15)
    shift = uniform(-2, 2), uniform(-2, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[0] * 2 / SIDE], dim=1),
            torch.stack([sin, cos, shift[1] * 2 / SIDE], dim=1),
        ],
        dim=1,
    )
    x = images[pick]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    x = x + 0.15 * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1), labels[pick]


def make(n_train: int, *, n_test: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a ``tensors`` file: ``n_train`` training and ``n_test`` (default
    ``n_train / 4``, at most 4,000) test samples."""
    n_test = n_test or min(4000, max(1, n_train // 4))
    x_train, y_train, x_test, y_test = base_images()
    xt, yt = distorted(x_train, y_train, n_train, seed)
    xs, ys = distorted(x_test, y_test, n_test, seed + 1)
    return {
        "x_train": xt.numpy(),
        "y_train": yt.numpy(),
        "x_test": xs.numpy(),
        "y_test": ys.numpy(),
    }


def write(path: Path, n_train: int, *, seed: int = 0) -> Path:
    """Write the ``tensors`` file of ``make(n_train)`` to ``path`` (kept if it exists)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **make(n_train, seed=seed))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=16000, help="training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True, help="the .npz file to write")
    args = parser.parse_args(argv)
    np.savez(args.output, **make(args.train, seed=args.seed))
    print(args.output)


if __name__ == "__main__":
    main()
