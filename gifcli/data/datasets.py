"""Data sets: readers, the validation split, normalisation.

``load_dataset(data, seed=...)`` is the one entry point. It reads ``data.dataset`` with pixels in
[0, 1], carves a validation split out of the training split (stratified by class, seeded by the
config seed), normalises every split with the per-channel ``(x - mean) / std``, and, with
``data.poison``, plants the backdoor in the training split only (validation and test stay clean).

digits is held in memory (``TensorSplit``); every other data set is streamed
(``StreamedSplit``): its pixels stay uint8 at rest (image files decoded per batch, arrays
memory-mapped where the file allows) and are normalised batch by batch, so memory is bounded
by the batch, not by the data set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gifcli.config import DataConfig
from gifcli.data.folders import read_imagefolder
from gifcli.data.splits import Split, StreamedSplit, TensorSplit, concat
from gifcli.data.stores import ArrayStore, ImageStore
from gifcli.data.tensor_files import read_tensor_file, read_val_file
from gifcli.data.triggers import Poisoning, poison_split
from gifcli.errors import GifError

# digits has no official test split: a stratified 20% is held out with a seed of its own, so
# the test split is the same whatever the config seed (1,438 train / 359 test images).
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

# Published per-channel statistics of the training images in [0, 1]. digits: rounded from its
# 1,797 images (mean 0.305, std 0.376), so nothing needs computing at load time.
DEFAULT_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3,), (0.4,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


@dataclass
class DataSplits:
    """Everything ``load_dataset`` returns.

    image_size: (H, W); mean, std: the per-channel normalisation applied to every split.
    poison: the backdoor planted by ``data.poison`` (positions in ``train``), else None.
    train_source, val_source: int64, for each sample of ``train`` / ``val`` its index in the
    data set's full training set (before the validation split), e.g. to map a user's file of
    poisoned training indices to positions in ``train`` (``to_split_positions``); a
    validation set of the user's own takes none of them (``val_source`` empty).
    validation: where the validation split comes from, in one line. notes: what the user
    should know about the data as read (float images outside [0, 1]), one line each.
    """

    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    poison: Poisoning | None = None
    class_names: tuple[str, ...] = ()
    train_source: Tensor | None = field(default=None, repr=False)
    val_source: Tensor | None = field(default=None, repr=False)
    validation: str = ""
    notes: tuple[str, ...] = ()

    @property
    def full_train_size(self) -> int:
        """Samples of the data set's full training set, which index files count."""
        if self.train_source is None or self.val_source is None:
            return len(self.train)
        return len(self.train_source) + len(self.val_source)

    @property
    def val_held_out(self) -> bool:
        """Whether the validation split was held out of the training set (not the user's own)."""
        return self.val_source is not None and len(self.val_source) > 0

    def with_in_train(self, indices: Tensor) -> tuple[DataSplits, int]:
        """These splits with the samples of ``indices`` (into the full training set) that the
        held-out validation split holds moved to the end of the training split, and how many
        moved: a sample a user asks to remove is one the model was trained on."""
        if not self.val_held_out:
            return self, 0
        moved = torch.isin(self.val_source, indices.to(self.val_source.device))
        count = int(moved.sum())
        if count == 0:
            return self, 0
        return (
            dataclasses.replace(
                self,
                train=concat(self.train, self.val.subset(moved)),
                val=self.val.subset(~moved),
                train_source=torch.cat([self.train_source, self.val_source[moved]]),
                val_source=self.val_source[~moved],
            ),
            count,
        )

    @classmethod
    def from_tensors(
        cls,
        *,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor] | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> DataSplits:
        """Splits from in-memory ``(x, y)`` pairs: x float [N, C, H, W] (or [N, D] for an MLP),
        already normalised as the model expects; y integer labels [N].

        ``val``: a validation set of your own, for the step search (every sample of ``train``
        is then a training sample); without it, a stratified ``val_fraction`` of ``train`` is
        held out (seeded), as ``load_dataset`` does. ``mean``/``std``: the normalisation ``x``
        carries (default 0 and 1), needed only to apply a backdoor trigger in pixel space.
        """
        x_train, y_train = _checked_pair(train, "train")
        x_test, y_test = _checked_pair(test, "test")
        if val is None:
            train_source, val_source = stratified_split(y_train, val_fraction, seed=seed)
            validation = held_out_text(len(y_train), len(val_source), val_fraction, seed)
            x_val, y_val = x_train[val_source], y_train[val_source]
            x_train, y_train = x_train[train_source], y_train[train_source]
        else:
            x_val, y_val = _checked_pair(val, "val")
            train_source = torch.arange(len(y_train))
            val_source = torch.empty(0, dtype=torch.long)
            validation = f"the validation set given ({len(y_val):,} samples)"
        labels = torch.cat([y_train, y_val, y_test])
        classes = num_classes or int(labels.max()) + 1
        if int(labels.min()) < 0 or int(labels.max()) >= classes:
            raise GifError(f"num_classes: labels must be in 0..{classes - 1}")
        channels = x_train.shape[1] if x_train.ndim == 4 else 1
        return cls(
            train=TensorSplit(x_train, y_train),
            val=TensorSplit(x_val, y_val),
            test=TensorSplit(x_test, y_test),
            num_classes=classes,
            in_channels=channels,
            image_size=tuple(x_train.shape[2:]) if x_train.ndim == 4 else (1, 1),
            mean=tuple(mean) if mean is not None else (0.0,) * channels,
            std=tuple(std) if std is not None else (1.0,) * channels,
            class_names=tuple(str(k) for k in range(classes)),
            train_source=train_source,
            val_source=val_source,
            validation=validation,
        )


def held_out_text(n_train: int, held: int, fraction: float, seed: int) -> str:
    """The held-out validation split in one line: which training samples, and what to do
    when the model was trained on them."""
    return (
        f"a stratified {100 * fraction:g}% of the training set held out ({held:,} of "
        f"{n_train:,} samples, drawn with seed {seed}): the model should not have trained on "
        "them (`gif train` does not); bring your own validation set (x_val/y_val in data.path, "
        "a val/ folder of an imagefolder, or data.val_path) if it did"
    )


def _checked_pair(pair: tuple[Tensor, Tensor], name: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` as float32 inputs and int64 labels of one length."""
    try:
        x, y = pair
    except (TypeError, ValueError):
        raise GifError(f"{name}: expected an (x, y) pair of tensors") from None
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape[0] != y.shape[0] or y.ndim != 1:
        raise GifError(f"{name}: {x.shape[0]} inputs but labels of shape {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise GifError(f"{name}: labels must be integers, got {y.dtype}")
    return x.float(), y.long()


@dataclass
class _Source:
    """A data set as read: images float32 [N, C, H, W] in [0, 1] in memory (digits), or a store
    of images at rest; int64 labels."""

    x_train: Tensor | ImageStore
    y_train: Tensor
    x_test: Tensor | ImageStore
    y_test: Tensor
    num_classes: int
    class_names: tuple[str, ...]
    x_val: Tensor | ImageStore | None = None
    y_val: Tensor | None = None
    val_origin: str = ""
    """Where ``x_val`` comes from, for the one line that says so."""
    notes: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, H, W) of every image."""
        return tuple(
            self.x_train.shape[1:] if isinstance(self.x_train, Tensor) else self.x_train.shape
        )


def load_dataset(data: DataConfig, *, seed: int) -> DataSplits:
    """Read, split, normalise and (with ``data.poison``) poison the configured data set."""
    if data.image_size is not None and data.dataset != "imagefolder":
        raise GifError(
            f"data.image_size: only the imagefolder data set is resized, not "
            f"{data.dataset}; remove data.image_size"
        )
    readers = {"digits": _read_digits, "imagefolder": _read_imagefolder, "tensors": _read_tensors}
    reader = readers.get(data.dataset, _read_torchvision)
    source = reader(data)
    if data.val_path is not None:
        source = _with_val_file(source, data.val_path)

    channels, *image_size = source.shape
    mean, std = _normalisation(data, channels)

    def split(images: Tensor | ImageStore, labels: Tensor) -> Split:
        if isinstance(images, Tensor):
            _normalise_(images, mean, std)
            return TensorSplit(images, labels)
        positions = torch.arange(len(labels))
        return StreamedSplit(images, positions, labels, mean, std, workers=data.workers)

    full_train = split(source.x_train, source.y_train)
    if source.x_val is not None:
        train, val = full_train, split(source.x_val, source.y_val)
        train_source, val_source = torch.arange(len(train)), torch.empty(0, dtype=torch.long)
        validation = f"{source.val_origin} ({len(val):,} samples)"
    else:
        train_source, val_source = stratified_split(source.y_train, data.val_fraction, seed=seed)
        train = full_train.subset(train_source)
        val = full_train.subset(val_source)
        validation = held_out_text(len(full_train), len(val), data.val_fraction, seed)
    test = split(source.x_test, source.y_test)

    poisoning = None
    if data.poison is not None:
        train, poisoning = poison_split(train, data.poison, mean=mean, std=std)

    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=source.num_classes,
        in_channels=channels,
        image_size=tuple(image_size),
        mean=mean,
        std=std,
        poison=poisoning,
        class_names=source.class_names,
        train_source=train_source,
        val_source=val_source,
        validation=validation,
        notes=source.notes,
    )


def stratified_split(y: Tensor, fraction: float, *, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted int64 indices ``(kept, held_out)``, ``held_out`` drawn with ``seed``.

    ``held_out`` has ``round(fraction * N)`` samples (at least one when ``fraction > 0``), shared
    among the classes in proportion to their counts (largest remainder), so every class is held
    out in its proportion.
    """
    labels, counts = torch.unique(y, return_counts=True)
    quotas = fraction * counts.double()
    total = int(fraction * len(y) + 0.5)
    if fraction > 0 and len(y) > 1:
        total = max(total, 1)
    per_class = quotas.floor().long()
    remainders = quotas - per_class
    # ties go to the lower label: a stable sort keeps label order
    extra = torch.sort(remainders, descending=True, stable=True).indices
    per_class[extra[: max(total - int(per_class.sum()), 0)]] += 1

    generator = torch.Generator().manual_seed(seed)
    held = [torch.zeros(0, dtype=torch.long)]
    for label, count in zip(labels.tolist(), per_class.tolist(), strict=True):
        members = torch.nonzero(y == label).flatten()
        order = torch.randperm(len(members), generator=generator)
        held.append(members[order[:count]])
    held_out = torch.cat(held).sort().values
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[held_out] = False
    return torch.nonzero(keep).flatten(), held_out


def _normalisation(data: DataConfig, channels: int) -> tuple[tuple[float, ...], ...]:
    default_mean, default_std = DEFAULT_NORMALISATION.get(
        data.dataset, ((0.0,) * channels, (1.0,) * channels)
    )
    out = []
    for key, given, default in (("mean", data.mean, default_mean), ("std", data.std, default_std)):
        values = tuple(float(v) for v in (given if given is not None else default))
        if len(values) != channels:
            raise GifError(
                f"data.{key}: lists {len(values)} value(s) but the {data.dataset} "
                f"images have {channels} channel(s); list one number per channel"
            )
        out.append(values)
    return tuple(out)


def _normalise_(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    x.sub_(torch.tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1))
    x.div_(torch.tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1))


# ------------------------------------------------------------------------------------ readers


def _read_digits(data: DataConfig) -> _Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32).div_(16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target).long()
    train, test = stratified_split(y, DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED)
    return _Source(
        x[train],
        y[train],
        x[test],
        y[test],
        num_classes=10,
        class_names=tuple(str(k) for k in range(10)),
    )


# data set -> (torchvision class, folder under data.root its files are read from)
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST/raw"),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py"),
    "svhn": ("SVHN", "."),
}


def _read_torchvision(data: DataConfig) -> _Source:
    import torchvision.datasets

    class_name, subfolder = _TORCHVISION[data.dataset]
    folder = Path(data.root) / subfolder
    dataset_cls = getattr(torchvision.datasets, class_name)

    def open_split(train: bool):
        split = (
            {"split": "train" if train else "test"} if data.dataset == "svhn" else {"train": train}
        )
        try:
            # torchvision prints download progress with print(): keep stdout for machine output
            with contextlib.redirect_stdout(sys.stderr):
                return dataset_cls(str(data.root), download=data.download, **split)
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if data.download:
                raise GifError(
                    f"data.root: downloading {data.dataset} into {folder} failed "
                    f"({reason}); check the network connection, or put the data "
                    f"set's files in {folder} by hand"
                ) from exc
            if isinstance(exc, RuntimeError):  # torchvision's "Dataset not found"
                raise GifError(
                    f"data.root: {data.dataset} not found in {folder}; put the "
                    f"data set's files there, or set data.download: true to "
                    f"download them"
                ) from exc
            raise GifError(
                f"data.root: cannot read {data.dataset} from {folder} ({reason}); "
                f"replace the files, or delete them and set data.download: "
                f"true"
            ) from exc

    train, test = open_split(True), open_split(False)
    labels = "labels" if data.dataset == "svhn" else "targets"
    # uint8 at rest: cifar10 is N x 32 x 32 x 3, svhn N x 3 x 32 x 32, (fashion-)mnist N x 28 x 28
    (x_train, y_train), (x_test, y_test) = [
        (
            ArrayStore(ds.data, channels_last=data.dataset == "cifar10"),
            torch.as_tensor(np.asarray(getattr(ds, labels)), dtype=torch.long),
        )
        for ds in (train, test)
    ]
    class_names = (
        tuple(str(k) for k in range(10)) if data.dataset == "svhn" else tuple(train.classes)
    )
    return _Source(x_train, y_train, x_test, y_test, num_classes=10, class_names=class_names)


def _read_imagefolder(data: DataConfig) -> _Source:
    folder = read_imagefolder(data)
    has_val = folder.val is not None
    return _Source(
        folder.train,
        torch.tensor(folder.train_labels, dtype=torch.long),
        folder.test,
        torch.tensor(folder.test_labels, dtype=torch.long),
        num_classes=len(folder.class_names),
        class_names=folder.class_names,
        x_val=folder.val,
        y_val=torch.tensor(folder.val_labels, dtype=torch.long) if has_val else None,
        val_origin=f"the images of {Path(data.root) / 'val'}" if has_val else "",
    )


def _read_tensors(data: DataConfig) -> _Source:
    file = read_tensor_file(data.path)
    return _Source(
        file.train,
        file.y_train,
        file.test,
        file.y_test,
        num_classes=file.num_classes,
        class_names=tuple(str(k) for k in range(file.num_classes)),
        x_val=file.val,
        y_val=file.y_val,
        val_origin=f"x_val/y_val of {data.path}" if file.val is not None else "",
        notes=file.notes,
    )


def _with_val_file(source: _Source, path: str) -> _Source:
    """``source`` with the validation set of ``data.val_path`` (``x_val``/``y_val``)."""
    x_val, y_val, notes = read_val_file(path, shape=source.shape)
    if isinstance(source.x_train, Tensor):  # digits: in memory, float in [0, 1]
        pixels = x_val.read(torch.arange(len(x_val)))
        x_val = pixels.float().div_(255.0) if pixels.dtype == torch.uint8 else pixels.float()
    if int(y_val.max()) >= source.num_classes:
        raise GifError(
            f"data.val_path: {path}: y_val holds the label {int(y_val.max())} but the data "
            f"set has {source.num_classes} classes"
        )
    return dataclasses.replace(
        source,
        x_val=x_val,
        y_val=y_val,
        val_origin=f"x_val/y_val of {path}",
        notes=source.notes + notes,
    )
