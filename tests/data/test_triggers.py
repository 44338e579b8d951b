"""Trigger pixels (checked exactly) and the poisoned-training scenario."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from gifcli.config import DataConfig, PoisonConfig
from gifcli.data import TensorSplit, apply_trigger, load_dataset, poison_split
from gifcli.errors import GifError

A = torch.tensor(16 / 255, dtype=torch.float32)  # the default checkerboard step, in [0, 1]


def test_checkerboard_exact():
    x = torch.zeros(1, 1, 3, 4)
    x[0, 0, 0, 0] = 0.99  # clamped at 1
    out = apply_trigger(x, PoisonConfig(trigger="checkerboard"), mean=[0.0], std=[1.0])
    a = A.item()
    expected = torch.tensor([[[[1.0, 0.0, a, 0.0], [0.0, a, 0.0, a], [a, 0.0, a, 0.0]]]])
    assert torch.equal(out, expected)
    assert x[0, 0, 0, 0] == 0.99  # the input is untouched


def test_checkerboard_all_channels_with_normalisation():
    torch.manual_seed(0)
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.5, 0.2]
    pixels = torch.rand(2, 3, 5, 5)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (pixels - m) / s
    trigger = PoisonConfig(trigger="checkerboard", intensity=40.0)
    out = apply_trigger(x, trigger, mean=mean, std=std)
    expected = pixels.clone()
    for i in range(5):
        for j in range(5):
            if (i + j) % 2 == 0:
                expected[..., i, j] = (pixels[..., i, j] + 40 / 255).clamp(max=1.0)
    torch.testing.assert_close(out * s + m, expected, rtol=0, atol=1e-6)
    odd = torch.tensor([[(i + j) % 2 == 1 for j in range(5)] for i in range(5)])
    assert torch.equal(out[..., odd], x[..., odd])  # untouched pixels are bit-identical


@pytest.mark.parametrize(
    ("corner", "rows", "cols"),
    [
        ("top-left", slice(0, 2), slice(0, 2)),
        ("top-right", slice(0, 2), slice(4, 6)),
        ("bottom-left", slice(3, 5), slice(0, 2)),
        ("bottom-right", slice(3, 5), slice(4, 6)),
    ],
)
def test_patch_exact(corner, rows, cols):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 6)
    trigger = PoisonConfig(trigger="patch", size=2, value=1.0, corner=corner)
    out = apply_trigger(x, trigger, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    expected = x.clone()
    expected[:, :, rows, cols] = 1.0
    assert torch.equal(out, expected)


def test_patch_with_normalisation_and_value():
    x = torch.zeros(1, 1, 4, 4)
    trigger = PoisonConfig(trigger="patch", size=1, value=0.0, corner="top-left")
    out = apply_trigger(x, trigger, mean=[0.5], std=[0.25])
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, 0] = -2.0  # (0 - 0.5) / 0.25
    assert torch.equal(out, expected)


def test_patch_too_large():
    with pytest.raises(GifError, match="data.poison.size: a 5x5 patch does not fit 4x4"):
        apply_trigger(
            torch.zeros(1, 1, 4, 4), PoisonConfig(trigger="patch", size=5), mean=[0.0], std=[1.0]
        )
    with pytest.raises(GifError, match="removal.trigger.size"):
        apply_trigger(
            torch.zeros(1, 1, 4, 4),
            PoisonConfig(trigger="patch", size=5),
            mean=[0.0],
            std=[1.0],
            key="removal.trigger",
        )


def test_blend_rgb_exact(tmp_path):
    image = np.array(
        [[[255, 0, 51], [0, 0, 0]], [[102, 204, 255], [51, 51, 51]]], dtype=np.uint8
    )  # 2 x 2 RGB
    path = tmp_path / "pattern.png"
    Image.fromarray(image, mode="RGB").save(path)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 2, 2)
    trigger = PoisonConfig(trigger="blend", image=str(path), alpha=0.25)
    out = apply_trigger(x, trigger, mean=[0.0] * 3, std=[1.0] * 3)
    pattern = (
        torch.tensor(
            [[[255, 0], [102, 51]], [[0, 0], [204, 51]], [[51, 0], [255, 51]]], dtype=torch.float32
        )
        / 255.0
    )  # C x H x W
    expected = ((1.0 - 0.25) * x + 0.25 * pattern).clamp(0.0, 1.0)
    assert torch.equal(out, expected)


def test_blend_grey_resized(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((3, 7), 51, np.uint8), mode="L").save(path)  # 0.2 everywhere
    x = torch.full((1, 1, 4, 4), 0.6)
    trigger = PoisonConfig(trigger="blend", image=str(path), alpha=0.5)
    out = apply_trigger(x, trigger, mean=[0.0], std=[1.0])
    grey = torch.tensor(51, dtype=torch.float32) / 255.0
    assert torch.equal(out, (1.0 - 0.5) * x + 0.5 * grey)


def test_blend_missing_image(tmp_path):
    trigger = PoisonConfig(trigger="blend", image=str(tmp_path / "nope.png"))
    with pytest.raises(GifError, match="nope.png: data.poison.image not found"):
        apply_trigger(torch.zeros(1, 1, 4, 4), trigger, mean=[0.0], std=[1.0])


# -------------------------------------------------------------------------------- poisoning


def test_poison_split_counts_and_labels():
    y = torch.tensor([0, 1, 2, 3] * 5)
    train = TensorSplit(torch.zeros(20, 1, 4, 4), y)
    poison = PoisonConfig(trigger="patch", rate=0.25, target=2, seed=3, size=1)
    poisoned, record = poison_split(train, poison, mean=[0.0], std=[1.0])
    assert len(record.indices) == 5 and record.target == 2 and record.trigger is poison
    assert torch.equal(record.indices, record.indices.sort().values)
    assert torch.equal(record.true_labels, y[record.indices])
    assert (record.true_labels != 2).all()
    assert (poisoned.y[record.indices] == 2).all()
    assert (poisoned.x[record.indices, 0, 3, 3] == 1.0).all()
    clean = torch.ones(20, dtype=torch.bool)
    clean[record.indices] = False
    assert torch.equal(poisoned.x[clean], train.x[clean]) and torch.equal(
        poisoned.y[clean], y[clean]
    )
    assert train.x.abs().sum() == 0 and torch.equal(train.y, y)  # the input is untouched
    again = poison_split(train, poison, mean=[0.0], std=[1.0])[1]
    assert torch.equal(again.indices, record.indices)
    other = poison_split(train, dataclasses.replace(poison, seed=4), mean=[0.0], std=[1.0])[1]
    assert not torch.equal(other.indices, record.indices)


def test_poison_rate_errors():
    train = TensorSplit(torch.zeros(10, 1, 4, 4), torch.tensor([0] * 8 + [1] * 2))
    with pytest.raises(GifError, match="data.poison.rate: .*only 2 training samples"):
        poison_split(train, PoisonConfig(rate=0.5, target=0), mean=[0.0], std=[1.0])
    with pytest.raises(GifError, match="data.poison.rate: .*poisons none"):
        poison_split(train, PoisonConfig(rate=0.05, target=0), mean=[0.0], std=[1.0])


def test_load_dataset_poisons_train_only():
    poison = PoisonConfig(trigger="checkerboard", rate=0.1, target=4, seed=0)
    clean = load_dataset(DataConfig(dataset="digits"), seed=0)
    splits = load_dataset(DataConfig(dataset="digits", poison=poison), seed=0)
    record = splits.poison
    assert len(record.indices) == int(0.1 * len(clean.train))
    assert torch.equal(record.true_labels, clean.train.y[record.indices])
    assert (record.true_labels != 4).all() and (splits.train.y[record.indices] == 4).all()
    triggered = apply_trigger(clean.train.x[record.indices], poison, mean=clean.mean, std=clean.std)
    assert torch.equal(splits.train.x[record.indices], triggered)
    rest = torch.ones(len(clean.train), dtype=torch.bool)
    rest[record.indices] = False
    assert torch.equal(splits.train.x[rest], clean.train.x[rest])
    assert torch.equal(splits.train.y[rest], clean.train.y[rest])
    for name in ("val", "test"):
        assert torch.equal(getattr(splits, name).x, getattr(clean, name).x)
        assert torch.equal(getattr(splits, name).y, getattr(clean, name).y)
    again = load_dataset(DataConfig(dataset="digits", poison=poison), seed=0)
    assert torch.equal(again.poison.indices, record.indices)
    assert torch.equal(again.train.x, splits.train.x)


def test_blend_image_claiming_a_huge_size_is_refused_from_its_header(tmp_path):
    from tests.conftest import png_claiming

    for side in (5000, 30000):  # refused by gif's limit, and by PIL's larger one
        path = png_claiming(tmp_path / f"huge{side}.png", side, side)
        trigger = PoisonConfig(trigger="blend", image=str(path))
        with pytest.raises(GifError, match="the blend image is larger than the 16,777,216"):
            apply_trigger(torch.zeros(1, 1, 8, 8), trigger, mean=[0.0], std=[1.0])
