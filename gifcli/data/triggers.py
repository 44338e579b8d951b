"""Backdoor triggers and the poisoned-training scenario.

Triggers act in pixel space, [0, 1]: inputs are denormalised with the split's mean and std, the
trigger is applied and clamped to [0, 1], and the result is normalised again. Pixels outside a
``checkerboard`` or ``patch`` trigger are returned bit-identical.

- ``checkerboard`` (the paper's): ``+intensity / 255`` on every pixel with ``(row + column)`` even,
  all channels.
- ``patch`` (BadNets): a ``size x size`` square set to ``value`` in one ``corner``.
- ``blend``: ``(1 - alpha) * x + alpha * image``, the image read with PIL, resized to the input
  size (bilinear) and converted to the input's channels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from gifcli.config import PoisonConfig, TriggerConfig
from gifcli.data.images import open_image
from gifcli.errors import GifError
from gifcli.inputs import check_input

if TYPE_CHECKING:
    from gifcli.data.splits import Split


@dataclass
class Poisoning:
    """The backdoor planted in the training split by ``data.poison``.

    indices: int64 [m], sorted positions of the poisoned samples in the (final) training split;
    true_labels: int64 [m], their labels before they were flipped to ``target``.
    """

    indices: Tensor
    true_labels: Tensor
    target: int
    trigger: PoisonConfig


def apply_trigger(
    x_normalised: Tensor,
    trigger: TriggerConfig,
    *,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    key: str = "data.poison",
) -> Tensor:
    """Triggered copy of a batch of normalised images.

    x_normalised: float [N, C, H, W]; mean, std: per channel (or one value for all channels).
    Returns a new tensor of the same shape, dtype and device; the input is never modified.
    ``key`` names the config section in error messages (``removal.trigger`` for a known trigger).
    """
    if x_normalised.ndim != 4:
        raise ValueError(
            f"apply_trigger expects images shaped [N, C, H, W], got {tuple(x_normalised.shape)}"
        )
    _, channels, height, width = x_normalised.shape
    mean_t = _per_channel(mean, x_normalised)
    std_t = _per_channel(std, x_normalised)
    pixels = x_normalised * std_t + mean_t

    mask: Tensor | None
    if trigger.trigger == "checkerboard":
        mask = _checkerboard_mask(height, width, x_normalised.device)
        triggered = (pixels + trigger.intensity / 255.0).clamp(0.0, 1.0)
    elif trigger.trigger == "patch":
        mask = _patch_mask(height, width, trigger, key, x_normalised.device)
        triggered = torch.full_like(pixels, min(max(trigger.value, 0.0), 1.0))
    elif trigger.trigger == "blend":
        mask = None
        image = blend_image(trigger, channels=channels, height=height, width=width, key=key)
        image = image.to(device=x_normalised.device, dtype=x_normalised.dtype)
        triggered = ((1.0 - trigger.alpha) * pixels + trigger.alpha * image).clamp(0.0, 1.0)
    else:
        raise GifError(
            f"{key}.trigger: {trigger.trigger!r} is not one of checkerboard, patch, blend"
        )
    out = (triggered - mean_t) / std_t
    if mask is None:
        return out
    return torch.where(mask, out, x_normalised)


def poison_split(
    train: Split,
    poison: PoisonConfig,
    *,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
) -> tuple[Split, Poisoning]:
    """Plant a backdoor: ``floor(rate * n)`` samples whose label is not ``target``, drawn with
    ``poison.seed``, get the trigger and the label ``target``.

    Returns a new split (``train`` is untouched; a streamed split applies the trigger as its
    batches are read) and the record of what was poisoned.
    """
    n = len(train)
    count = math.floor(poison.rate * n + 1e-9)  # 0.29 * 100 is 28.999...: still 29 samples
    candidates = torch.nonzero(train.y != poison.target).flatten()
    if count == 0:
        raise GifError(
            f"data.poison.rate: {poison.rate} of {n} training samples poisons none; raise the rate"
        )
    if count > len(candidates):
        raise GifError(
            f"data.poison.rate: {poison.rate} asks for {count} poisoned samples but "
            f"only {len(candidates)} training samples are not of the target class "
            f"{poison.target}; lower the rate"
        )
    generator = torch.Generator().manual_seed(poison.seed)
    order = torch.randperm(len(candidates), generator=generator)[:count]
    indices = candidates[order.to(candidates.device)].sort().values

    y = train.y.clone()
    true_labels = train.y[indices].clone()
    y[indices] = poison.target
    poisoning = Poisoning(
        indices=indices.cpu(), true_labels=true_labels.cpu(), target=poison.target, trigger=poison
    )
    trigger = functools.partial(apply_trigger, trigger=poison, mean=mean, std=std)
    return train.with_trigger(trigger, indices).with_labels(y), poisoning


def blend_image(
    trigger: TriggerConfig, *, channels: int, height: int, width: int, key: str = "data.poison"
) -> Tensor:
    """The blend trigger's image as float32 [1, C, H, W] in [0, 1] (cached; do not modify)."""
    if not trigger.image:
        raise GifError(f"{key}.image: the blend trigger needs an image path")
    path = Path(trigger.image)
    check_input(path, what=f"{key}.image", missing="point it at an image file (.png, .jpg)")
    return _read_blend_image(str(path.resolve()), path.stat().st_mtime_ns, channels, height, width)


@functools.lru_cache(maxsize=8)
def _read_blend_image(path: str, mtime_ns: int, channels: int, height: int, width: int) -> Tensor:
    from PIL import Image

    with open_image(path, what="the blend image", hint="use a .png or .jpg file") as opened:
        image = opened.convert("RGB" if channels == 3 else "L")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    array = array.permute(2, 0, 1) if array.ndim == 3 else array.unsqueeze(0)
    if array.shape[0] != channels:  # 2- or 4-channel inputs: the grey image on every channel
        array = array.expand(channels, height, width)
    return array.unsqueeze(0).contiguous()


def _per_channel(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def _checkerboard_mask(height: int, width: int, device: torch.device) -> Tensor:
    rows = torch.arange(height, device=device).reshape(-1, 1)
    cols = torch.arange(width, device=device).reshape(1, -1)
    return ((rows + cols) % 2 == 0).reshape(1, 1, height, width)


def _patch_mask(
    height: int, width: int, trigger: TriggerConfig, key: str, device: torch.device
) -> Tensor:
    size = trigger.size
    if size > min(height, width):
        raise GifError(
            f"{key}.size: a {size}x{size} patch does not fit {height}x{width} "
            f"images; choose a size up to {min(height, width)}"
        )
    vertical, _, horizontal = trigger.corner.partition("-")
    if vertical not in ("top", "bottom") or horizontal not in ("left", "right"):
        raise GifError(
            f"{key}.corner: {trigger.corner!r} is not one of top-left, top-right, "
            f"bottom-left, bottom-right"
        )
    top = 0 if vertical == "top" else height - size
    left = 0 if horizontal == "left" else width - size
    mask = torch.zeros(1, 1, height, width, dtype=torch.bool, device=device)
    mask[..., top : top + size, left : left + size] = True
    return mask
