"""Training-time augmentation: the standard random crop and horizontal flip of 32x32 colour sets.

Applied to a normalised batch on its device; the random draws come from a CPU generator of their
own, so the shuffling of the epochs is the same with and without augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CROP_PADDING = 4


def random_crop_flip(
    x: Tensor, generator: torch.Generator, *, fill: Sequence[float], padding: int = CROP_PADDING
) -> Tensor:
    """Each image of ``x`` ([B, C, H, W]) padded by ``padding`` pixels of ``fill`` (per channel:
    black, normalised), cropped back to H x W at a random offset, and flipped left-right with
    probability 1/2. Returns a new tensor."""
    batch, channels, height, width = x.shape
    padded = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, channels, 1, 1)
    padded = padded.expand(batch, channels, height + 2 * padding, width + 2 * padding).clone()
    padded[..., padding : padding + height, padding : padding + width] = x
    top, left = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(height)).to(x.device)  # [B, H]
    cols = left[:, None] + torch.arange(width)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
    samples = torch.arange(batch, device=x.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[
        samples, rows[:, :, None], cols[:, None, :]
    ]  # [B, H, W, C]
    return cropped.permute(0, 3, 1, 2).contiguous()
