"""Splits: the samples of a training, validation or test split, read batch by batch.

Two kinds with one interface (``Split``):

- ``TensorSplit``: inputs in memory, float32 and already normalised (digits, and the library's
  ``DataSplits.from_tensors``).
- ``StreamedSplit``: inputs at rest in a store (``gifcli.data.stores``: image files decoded per
  batch, or uint8 arrays, memory-mapped where the file allows), read and normalised one batch
  at a time on the device that uses them. A subset is a view (positions into the store), so
  the removal set, the retained set or a Hessian sample of a large data set copies no pixels.

Both offer ``len``, the labels ``y`` (int64, in memory), ``subset``, ``batches`` (optionally in
a given order and on a device), ``take`` (some samples' inputs as a tensor), ``inputs`` (what
the influence engine slices: a slice of it is a tensor batch), ``x`` (every input as one
tensor: for small splits), ``in_memory``, ``with_trigger`` and ``with_labels``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gifcli.data.stores import ArrayStore, ImageStore, read_batches

Trigger = Callable[[Tensor], Tensor]
"""A pixel-space change applied to normalised inputs ``[B, C, H, W]`` (a backdoor trigger)."""

Device = torch.device | str | None


def _index(indices: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """int64 positions, or a boolean mask, as a tensor on ``device``."""
    if not isinstance(indices, Tensor):
        indices = torch.as_tensor(list(indices), dtype=torch.long)
    elif indices.dtype != torch.bool:
        indices = indices.long()
    return indices.to(device)


def _chunks(order: Tensor, batch_size: int) -> list[Tensor]:
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _on(device: Device, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return (x, y) if device is None else (x.to(device), y.to(device))


@dataclass
class TensorSplit:
    """One split in memory. x: float32 [N, C, H, W], normalised; y: int64 [N], class labels."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"TensorSplit: {self.x.shape[0]} images but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def inputs(self) -> Tensor:
        return self.x

    def subset(self, indices: Tensor | Sequence[int]) -> TensorSplit:
        """The samples at ``indices`` (int positions, or a boolean mask of length N)."""
        indices = _index(indices, self.y.device)
        return TensorSplit(self.x[indices], self.y[indices])

    def take(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The inputs of the samples at ``indices``."""
        return self.x[_index(indices, self.y.device)]

    def batches(
        self, batch_size: int, *, order: Tensor | None = None, device: Device = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches of ``batch_size`` (the last may be short): consecutive samples,
        or the samples at ``order`` in that order; on ``device`` when given."""
        if order is None:
            for start in range(0, len(self), batch_size):
                yield _on(
                    device, self.x[start : start + batch_size], self.y[start : start + batch_size]
                )
        else:
            for batch in _chunks(order, batch_size):
                yield _on(device, self.x[batch], self.y[batch])

    def in_memory(self) -> TensorSplit:
        return self

    def with_trigger(self, trigger: Trigger, rows: Tensor | None = None) -> TensorSplit:
        """A copy whose inputs at ``rows`` (positions; None: all) carry ``trigger``."""
        if rows is None:
            return dataclasses.replace(self, x=trigger(self.x))
        x = self.x.clone()
        x[rows] = trigger(self.x[rows])
        return dataclasses.replace(self, x=x)

    def with_labels(self, y: Tensor) -> TensorSplit:
        return dataclasses.replace(self, y=y)

    def to(self, device: torch.device | str) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device))


@dataclass(frozen=True, eq=False)
class StreamedSplit:
    """One split read from ``store`` batch by batch.

    positions: int64 [N], each sample's row in the store; y: int64 [N] labels; mean, std: the
    per-channel normalisation ``(x − mean) / std`` of inputs in [0, 1] (uint8 pixels are
    divided by 255 first, float ones taken as stored); triggers: ``(rows, trigger)`` pairs,
    ``rows`` a bool [N] mask of the samples ``trigger`` is applied to after normalisation;
    workers: DataLoader worker processes that read ahead (0: none).
    """

    store: ImageStore
    positions: Tensor
    y: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    triggers: tuple[tuple[Tensor, Trigger], ...] = ()
    workers: int = 0

    def __post_init__(self) -> None:
        if len(self.positions) != len(self.y):
            raise ValueError(
                f"StreamedSplit: {len(self.positions)} samples but {len(self.y)} labels"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def inputs(self) -> LazyInputs:
        return LazyInputs(self)

    @property
    def x(self) -> Tensor:
        """Every input, normalised, as one float32 tensor: it reads the whole split."""
        return self.take(torch.arange(len(self)))

    def subset(self, indices: Tensor | Sequence[int]) -> StreamedSplit:
        """The samples at ``indices`` (int positions, or a boolean mask of length N): a view,
        no pixel is read."""
        indices = _index(indices, self.y.device)
        return dataclasses.replace(
            self,
            positions=self.positions[indices],
            y=self.y[indices],
            triggers=tuple((rows[indices], trigger) for rows, trigger in self.triggers),
        )

    def take(self, indices: Tensor | Sequence[int]) -> Tensor:
        """The normalised inputs of the samples at ``indices``, read in one batch."""
        order = torch.arange(len(self))[_index(indices, self.y.device)]
        if len(order) == 0:
            return torch.empty((0, *self.store.shape))
        x, _ = next(self.batches(len(order), order=order))
        return x

    def batches(
        self, batch_size: int, *, order: Tensor | None = None, device: Device = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x, y)`` batches of ``batch_size`` (the last may be short): consecutive samples,
        or the samples at ``order`` in that order; read on the CPU and normalised on
        ``device`` (default: the CPU)."""
        order = torch.arange(len(self)) if order is None else order.long().cpu()
        chunks = _chunks(order, batch_size)
        reads = read_batches(self.store, [self.positions[c] for c in chunks], workers=self.workers)
        for chunk, pixels in zip(chunks, reads, strict=True):
            x = self._normalised(pixels.to(device) if device is not None else pixels)
            for rows, trigger in self.triggers:
                hit = rows[chunk].to(x.device)
                if bool(hit.any()):
                    x[hit] = trigger(x[hit])
            yield x, (self.y[chunk] if device is None else self.y[chunk].to(device))

    def _normalised(self, pixels: Tensor) -> Tensor:
        x = pixels.to(torch.float32)
        if pixels.dtype == torch.uint8:
            x = x.div_(255.0)
        x.sub_(torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1))
        return x.div_(torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1))

    def in_memory(self) -> StreamedSplit:
        """The same samples with their pixels read once into memory, as stored (uint8 for
        images): for a small subset read many times, such as the Hessian sample."""
        rows = [self.store.read(p) for p in _chunks(self.positions, 1024)]
        pixels = torch.cat(rows) if rows else torch.empty((0, *self.store.shape), dtype=torch.uint8)
        return dataclasses.replace(
            self, store=ArrayStore(pixels), positions=torch.arange(len(self)), workers=0
        )

    def with_trigger(self, trigger: Trigger, rows: Tensor | None = None) -> StreamedSplit:
        """The same samples, those at ``rows`` (positions; None: all) read with ``trigger``."""
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[slice(None) if rows is None else rows.cpu()] = True
        return dataclasses.replace(self, triggers=(*self.triggers, (mask, trigger)))

    def with_labels(self, y: Tensor) -> StreamedSplit:
        return dataclasses.replace(self, y=y)

    def to(self, device: torch.device | str) -> StreamedSplit:
        """The split itself: inputs stay at rest; ``batches(device=...)`` moves each batch."""
        return self


Split = TensorSplit | StreamedSplit


def concat(first: Split, second: Split) -> Split:
    """The samples of ``first`` followed by those of ``second``: two in-memory splits, or two
    views of one store (the training and validation splits of ``load_dataset``)."""
    if isinstance(first, TensorSplit) and isinstance(second, TensorSplit):
        return TensorSplit(torch.cat([first.x, second.x]), torch.cat([first.y, second.y]))
    if (
        not isinstance(first, StreamedSplit)
        or not isinstance(second, StreamedSplit)
        or first.store is not second.store
    ):
        raise ValueError("concat: the splits must both be in memory or views of one store")

    def none(split: StreamedSplit) -> Tensor:
        return torch.zeros(len(split), dtype=torch.bool)

    triggers = tuple((torch.cat([rows, none(second)]), t) for rows, t in first.triggers)
    triggers += tuple((torch.cat([none(first), rows]), t) for rows, t in second.triggers)
    return dataclasses.replace(
        first,
        positions=torch.cat([first.positions, second.positions]),
        y=torch.cat([first.y, second.y]),
        triggers=triggers,
    )


class LazyInputs:
    """A streamed split's inputs as the influence engine uses an input tensor: ``len``; a
    slice ``[a:b]`` reads those samples as a normalised float32 tensor ``[B, C, H, W]``; an
    index tensor or list gives the inputs of those samples, still unread."""

    def __init__(self, split: StreamedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.split), *self.split.store.shape)

    def __getitem__(self, key: slice | Tensor | Sequence[int]) -> Tensor | LazyInputs:
        if isinstance(key, slice):
            return self.split.take(torch.arange(len(self.split))[key])
        return LazyInputs(self.split.subset(key))
