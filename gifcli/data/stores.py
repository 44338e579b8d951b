"""Images at rest, read by position: arrays (in memory or memory-mapped) and image files.

A store holds a data set's pixels as they are stored, uint8 for images (float only for a
``tensors`` file of float arrays), and reads the rows asked for as a tensor ``[B, C, H, W]``;
``StreamedSplit`` (``gifcli.data.splits``) normalises each batch where it is used. Nothing
here holds more than one batch of decoded pixels.

``read_batches`` reads a sequence of position batches, in the main process or, with
``workers > 0``, in ``torch.utils.data.DataLoader`` worker processes that decode whole
batches in parallel (in order). An error met in a worker (a corrupt image) comes back as the
same one-line ``GifError`` naming the file, not as a worker traceback.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from gifcli.data.images import open_image
from gifcli.errors import GifError


class ImageStore(Protocol):
    """``len(store)`` images of ``shape`` (C, H, W), read by position."""

    shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def read(self, positions: Tensor) -> Tensor:
        """The images at ``positions`` (int64 [B]) as stored: uint8 (or float32) [B, C, H, W]."""
        ...


@dataclass(frozen=True, eq=False)
class ArrayStore:
    """Images in an array ``[N, C, H, W]`` (``[N, H, W]``: one channel; ``channels_last``:
    ``[N, H, W, C]``), a numpy array, a memory map or a tensor: a read copies only its rows."""

    array: np.ndarray | Tensor
    channels_last: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        dims = tuple(int(d) for d in self.array.shape[1:])
        if len(dims) == 2:
            return (1, *dims)
        return (dims[2], dims[0], dims[1]) if self.channels_last else dims

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, positions: Tensor) -> Tensor:
        if isinstance(self.array, Tensor):
            rows = self.array[positions]
        else:
            rows = torch.from_numpy(np.ascontiguousarray(self.array[positions.numpy()]))
        if rows.dtype not in (torch.uint8, torch.float32):
            rows = rows.to(torch.float32)
        if self.channels_last:
            rows = rows.permute(0, 3, 1, 2)
        return (rows.unsqueeze(1) if rows.ndim == 3 else rows).contiguous()


@dataclass(frozen=True, eq=False)
class FileStore:
    """Image files decoded with PIL at each read, converted to ``mode`` (``L`` or ``RGB``);
    ``resize``: every image is resized to ``size`` (W, H), else each must have that size."""

    files: Sequence[Path]
    mode: str
    size: tuple[int, int]
    resize: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1 if self.mode == "L" else 3, self.size[1], self.size[0])

    def __len__(self) -> int:
        return len(self.files)

    def read(self, positions: Tensor) -> Tensor:
        batch = np.empty((len(positions), *self.shape), dtype=np.uint8)
        for row, position in enumerate(positions.tolist()):
            batch[row] = decode(self.files[position], self.mode, self.size, resize=self.resize)
        return torch.from_numpy(batch)


def decode(path: Path, mode: str, size: tuple[int, int], *, resize: bool) -> np.ndarray:
    """The pixels of one image file, uint8 [C, H, W]; a file PIL cannot decode is a GifError
    naming it."""
    from PIL import Image

    with open_image(path, hint="remove or replace it") as image:
        image = image.convert(mode)  # a decoding error is the context's GifError
    if image.size != size:
        if not resize:  # the header said otherwise when the folder was listed
            raise GifError(
                f"{path}: image is {image.size[0]}x{image.size[1]}, not {size[0]}x{size[1]}"
            )
        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def read_batches(
    store: ImageStore, batches: Sequence[Tensor], *, workers: int = 0
) -> Iterator[Tensor]:
    """``store.read(p)`` for each position batch ``p`` of ``batches``, in order; ``workers``
    processes read ahead (0: read in this process, one batch at a time)."""
    if workers == 0 or len(batches) <= 1:
        for positions in batches:
            yield store.read(positions)
        return
    loader = torch.utils.data.DataLoader(
        _BatchReads(store, batches), batch_size=None, num_workers=workers, shuffle=False
    )
    for pixels, error in loader:
        if error is not None:
            raise GifError(error)
        yield pixels


class _BatchReads(torch.utils.data.Dataset):
    """One whole batch per item, its error returned as a message: a worker's exception would
    reach the main process wrapped in the worker's traceback."""

    def __init__(self, store: ImageStore, batches: Sequence[Tensor]) -> None:
        self.store, self.batches = store, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[Tensor | None, str | None]:
        try:
            return self.store.read(self.batches[index]), None
        except GifError as error:
            return None, str(error)
