"""A synthetic colour 3×32×32 ten-class data set, generated offline, as a ``tensors`` .npz.

CIFAR's shape without a download: each class is a shape (disc, square, triangle, cross, ring,
horizontal bars, vertical bars, diagonal bars, checker, dot grid) drawn at a random position
and size on a random two-colour gradient background, plus Gaussian pixel noise. The shape's
colour is its class's palette colour jittered by ``--jitter`` per channel (``--jitter 1``:
any colour, so only the shape tells the class), a cue a small network learns in a few epochs
on a CPU.

    .venv/bin/python benchmarks/make_colour_shapes.py -o data/shapes32.npz
    .venv/bin/python benchmarks/make_colour_shapes.py --train 4000 --test 1000 --seed 0 -o FILE

Writes ``x_train``/``x_test`` (uint8, N×3×32×32) and ``y_train``/``y_test`` (int64), which
the ``tensors`` data set reads (``data.dataset: tensors``, ``data.path: FILE``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIDE = 32
CLASSES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "h-bars",
    "v-bars",
    "d-bars",
    "checker",
    "dots",
)


def shape_mask(label: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean SIDE×SIDE mask of class ``label``'s shape at a random place and size."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    r = rng.uniform(6.0, 11.0)
    cy, cx = rng.uniform(r, SIDE - r, size=2)
    dy, dx = yy - cy, xx - cx
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    period = rng.uniform(3.5, 5.5)
    phase = rng.uniform(0, period)
    if label == 0:
        return dy**2 + dx**2 <= r**2
    if label == 1:
        return (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
    if label == 2:
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
    if label == 3:
        w = r * 0.3
        return ((np.abs(dy) <= w) | (np.abs(dx) <= w)) & inside
    if label == 4:
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= 0.55 * r)
    if label == 5:
        return inside & (((yy + phase) % period) < period / 2)
    if label == 6:
        return inside & (((xx + phase) % period) < period / 2)
    if label == 7:
        return inside & (((xx + yy + phase) % (1.4 * period)) < 0.7 * period)
    if label == 8:
        cell = int(round(period))
        return inside & ((((yy // cell) + (xx // cell)) % 2) == 0)
    cell = period * 1.2
    return inside & (((yy + phase) % cell) < 1.6) & (((xx + phase) % cell) < 1.6)


PALETTE = np.array(
    [
        [0.9, 0.1, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.2, 0.9],
        [0.9, 0.9, 0.1],
        [0.9, 0.1, 0.9],
        [0.1, 0.9, 0.9],
        [1.0, 0.5, 0.0],
        [0.5, 0.0, 1.0],
        [1.0, 1.0, 1.0],
        [0.05, 0.05, 0.05],
    ],
    dtype=np.float32,
)


def image(label: int, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """One uint8 3×SIDE×SIDE image of class ``label``."""
    top, bottom = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    t = np.linspace(0, 1, SIDE, dtype=np.float32)[:, None, None]
    if rng.random() < 0.5:
        background = top * (1 - t) + bottom * t  # vertical gradient, H×1×3
        canvas = np.broadcast_to(background, (SIDE, SIDE, 3)).copy()
    else:
        background = (top * (1 - t) + bottom * t).transpose(1, 0, 2)  # horizontal
        canvas = np.broadcast_to(background, (SIDE, SIDE, 3)).copy()
    shift = rng.uniform(-jitter, jitter, size=3).astype(np.float32)
    colour = np.clip(PALETTE[label] + shift, 0, 1)
    mask = shape_mask(label, rng)
    canvas[mask] = colour
    canvas += rng.normal(0, 0.08, size=canvas.shape).astype(np.float32)
    return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1)


def generate(count: int, rng: np.random.Generator, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(count) % len(CLASSES)
    rng.shuffle(labels)
    images = np.stack([image(int(k), rng, jitter) for k in labels])
    return images, labels.astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--jitter", type=float, default=0.15, help="colour jitter per channel (default 0.15)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x_train, y_train = generate(args.train, rng, args.jitter)
    x_test, y_test = generate(args.test, rng, args.jitter)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    print(f"wrote {args.output}: {len(x_train)} train, {len(x_test)} test, 3x{SIDE}x{SIDE}")


if __name__ == "__main__":
    main()
