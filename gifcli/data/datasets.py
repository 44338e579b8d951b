"""Data sets held in memory as tensors: readers, the validation split, normalisation.

``load_dataset(data, seed=...)`` is the one entry point. It reads ``data.dataset`` with pixels in
[0, 1], carves a validation split out of the training split (stratified by class, seeded by the
config seed), normalises every split with the per-channel ``(x - mean) / std``, and, with
``data.poison``, plants the backdoor in the training split only (validation and test stay clean).
"""

from __future__ import annotations

import contextlib
import os
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gifcli.config import MAX_CLASSES, DataConfig
from gifcli.data.images import open_image
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

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TENSOR_KEYS = ("x_train", "y_train", "x_test", "y_test")


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

    def subset(self, indices: Tensor | Sequence[int]) -> TensorSplit:
        """The samples at ``indices`` (int positions, or a boolean mask of length N)."""
        if not isinstance(indices, Tensor):
            indices = torch.as_tensor(list(indices), dtype=torch.long)
        elif indices.dtype != torch.bool:
            indices = indices.long()
        indices = indices.to(self.y.device)
        return TensorSplit(self.x[indices], self.y[indices])

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Consecutive ``(x, y)`` batches in order, without shuffling; the last may be short."""
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def to(self, device: torch.device | str) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device))


@dataclass
class DataSplits:
    """Everything ``load_dataset`` returns.

    image_size: (H, W); mean, std: the per-channel normalisation applied to every split.
    poison: the backdoor planted by ``data.poison`` (positions in ``train``), else None.
    train_source, val_source: int64, for each sample of ``train`` / ``val`` its index in the
    data set's full training set (before the validation split), e.g. to map a user's file of
    poisoned training indices to positions in ``train`` (``to_split_positions``).
    """

    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    poison: Poisoning | None = None
    class_names: tuple[str, ...] = ()
    train_source: Tensor | None = field(default=None, repr=False)
    val_source: Tensor | None = field(default=None, repr=False)

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

        Without ``val``, a stratified ``val_fraction`` of ``train`` is held out (seeded), as
        ``load_dataset`` does. ``mean``/``std``: the normalisation ``x`` carries (default 0 and
        1), needed only to apply a backdoor trigger in pixel space.
        """
        x_train, y_train = _checked_pair(train, "train")
        x_test, y_test = _checked_pair(test, "test")
        if val is None:
            train_source, val_source = stratified_split(y_train, val_fraction, seed=seed)
            x_val, y_val = x_train[val_source], y_train[val_source]
            x_train, y_train = x_train[train_source], y_train[train_source]
        else:
            x_val, y_val = _checked_pair(val, "val")
            train_source = torch.arange(len(y_train))
            val_source = torch.arange(len(y_train), len(y_train) + len(y_val))
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
    """A data set as read: float32 [N, C, H, W] images in [0, 1] (tensors: as stored)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    class_names: tuple[str, ...]


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

    channels = source.x_train.shape[1]
    mean, std = _normalisation(data, channels)
    for x in (source.x_train, source.x_test):
        _normalise_(x, mean, std)

    train_source, val_source = stratified_split(source.y_train, data.val_fraction, seed=seed)
    train = TensorSplit(source.x_train[train_source], source.y_train[train_source])
    val = TensorSplit(source.x_train[val_source], source.y_train[val_source])
    test = TensorSplit(source.x_test, source.y_test)

    poisoning = None
    if data.poison is not None:
        train, poisoning = poison_split(train, data.poison, mean=mean, std=std)

    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=source.num_classes,
        in_channels=channels,
        image_size=tuple(source.x_train.shape[2:]),
        mean=mean,
        std=std,
        poison=poisoning,
        class_names=source.class_names,
        train_source=train_source,
        val_source=val_source,
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


def _unit_images(array: np.ndarray | Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1], contiguous."""
    x = torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array)
    return x.contiguous().to(torch.float32).div_(255.0)


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
    if data.dataset == "svhn":
        arrays = [(ds.data, ds.labels) for ds in (train, test)]  # already N x 3 x 32 x 32
        class_names = tuple(str(k) for k in range(10))
    else:
        arrays = [(ds.data, ds.targets) for ds in (train, test)]
        class_names = tuple(train.classes)
    (x_train, y_train), (x_test, y_test) = [
        (_channels_first(x, data.dataset), torch.as_tensor(np.asarray(y), dtype=torch.long))
        for x, y in arrays
    ]
    return _Source(x_train, y_train, x_test, y_test, num_classes=10, class_names=class_names)


def _channels_first(x: np.ndarray | Tensor, dataset: str) -> Tensor:
    if dataset == "cifar10":  # N x 32 x 32 x 3
        x = np.asarray(x).transpose(0, 3, 1, 2)
    x = _unit_images(x)
    return x.unsqueeze(1) if x.ndim == 3 else x


def _read_imagefolder(data: DataConfig) -> _Source:
    from PIL import Image

    root = Path(data.root)
    layout = f"{root}/train/<class>/*.png and {root}/test/<class>/*.png"
    for split_dir in (root / "train", root / "test"):
        if not split_dir.is_dir():
            raise GifError(f"data.root: {split_dir} is not a folder; imagefolder reads {layout}")
    classes = _class_folders(root / "train")
    if len(classes) < 2:
        raise GifError(
            f"data.root: {root / 'train'} holds {len(classes)} class folder(s); "
            f"imagefolder needs one folder per class, at least two ({layout})"
        )
    train_files = _image_files(root / "train", classes, require_every_class=True)
    test_classes = _class_folders(root / "test")
    for name in test_classes:
        if name not in classes:
            raise GifError(
                f"data.root: {root / 'test' / name} is a class with no folder in "
                f"{root / 'train'}; every test class needs training images"
            )
    test_files = _image_files(root / "test", classes, require_every_class=False)
    if not test_files:
        raise GifError(f"data.root: {root / 'test'} holds no images; imagefolder reads {layout}")

    def opened(path: Path):
        return open_image(path, hint="remove or replace it")

    # the header tells the mode: grey only if every image has one channel
    grey = True
    for path, _ in train_files + test_files:
        with opened(path) as image:
            grey = grey and len(image.getbands()) == 1 and image.mode != "P"
    mode = "L" if grey else "RGB"

    size = (data.image_size, data.image_size) if data.image_size is not None else None
    first: Path | None = None

    def read(files: list[tuple[Path, int]]) -> tuple[Tensor, Tensor]:
        nonlocal size, first
        arrays = []
        for path, _ in files:
            with opened(path) as image:
                image = image.convert(mode)  # a decoding error is the context's GifError
            if data.image_size is not None:
                if image.size != size:
                    image = image.resize(size, Image.Resampling.BILINEAR)
            elif size is None:
                size, first = image.size, path
            elif image.size != size:
                raise GifError(
                    f"{path}: image is {image.size[0]}x{image.size[1]} but {first} "
                    f"is {size[0]}x{size[1]}; set data.image_size to resize every "
                    f"image to one square size"
                )
            array = np.asarray(image, dtype=np.uint8)
            arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        labels = torch.tensor([label for _, label in files], dtype=torch.long)
        return _unit_images(np.stack(arrays)), labels

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    return _Source(
        x_train, y_train, x_test, y_test, num_classes=len(classes), class_names=tuple(classes)
    )


def _class_folders(split_dir: Path) -> list[str]:
    # hidden folders (.ipynb_checkpoints, ...) are not classes
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(
    split_dir: Path, classes: list[str], *, require_every_class: bool
) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        found = (
            sorted(
                p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if folder.is_dir()
            else []
        )
        if require_every_class and not found:
            raise GifError(
                f"data.root: {folder} holds no {', '.join(IMAGE_SUFFIXES)} images; "
                f"add images or remove the class folder"
            )
        files += [(path, label) for path in found]
    return files


def _read_tensors(data: DataConfig) -> _Source:
    path = Path(data.path or "")
    if not path.is_file():
        raise GifError(
            f"data.path: {path} not found; point it at a .pt or .npz file with "
            f"{', '.join(TENSOR_KEYS)}"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                _check_unpacked_size(path, archive.zip)
                arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise GifError(
                f"{path}: cannot read the .npz file ({exc}); save it with numpy.savez"
            ) from exc
    elif suffix in (".pt", ".pth"):
        try:
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise GifError(
                f"{path}: cannot load with weights_only=True ({reason}); save a "
                f"dict of tensors with torch.save"
            ) from exc
        if not isinstance(arrays, dict):
            raise GifError(
                f"{path}: holds a {type(arrays).__name__}; save a dict with keys "
                f"{', '.join(TENSOR_KEYS)}"
            )
    else:
        raise GifError(
            f"data.path: {path} is not a .pt or .npz file; save x_train, y_train, "
            f"x_test, y_test with torch.save or numpy.savez"
        )

    for key in TENSOR_KEYS:
        if key not in arrays:
            found = ", ".join(sorted(map(str, arrays))) or "nothing"
            raise GifError(
                f"{path}: missing key {key!r}; the file needs "
                f"{', '.join(TENSOR_KEYS)} (found: {found})"
            )
    x_train = _tensor_images(arrays["x_train"], path, "x_train")
    x_test = _tensor_images(arrays["x_test"], path, "x_test")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise GifError(
            f"{path}: x_test images are {_shape(x_test.shape[1:])} but x_train "
            f"images are {_shape(x_train.shape[1:])}; both need one C x H x W shape"
        )
    y_train = _tensor_labels(arrays["y_train"], path, "y_train", len(x_train))
    y_test = _tensor_labels(arrays["y_test"], path, "y_test", len(x_test))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return _Source(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=num_classes,
        class_names=tuple(str(k) for k in range(num_classes)),
    )


def _check_unpacked_size(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse an archive whose arrays unpack to more than this machine's memory: a small
    compressed file can hold gigabytes of zeros."""
    unpacked = sum(info.file_size for info in archive.infolist())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if unpacked > memory:
        raise GifError(
            f"{path}: the arrays unpack to {unpacked / 2**30:.1f} GiB, more than this "
            f"machine's {memory / 2**30:.1f} GiB of memory; use a smaller data set"
        )


def _as_tensor(value: object, path: Path, key: str) -> Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.dtype == np.uint64:  # torch holds no others
            raise GifError(f"{path}: {key} has dtype {value.dtype}; store numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Tensor):
        return value
    raise GifError(f"{path}: {key} is a {type(value).__name__}; store an array or tensor")


def _tensor_images(value: object, path: Path, key: str) -> Tensor:
    x = _as_tensor(value, path, key)
    if x.ndim not in (3, 4) or x.shape[0] == 0:
        raise GifError(
            f"{path}: {key} has shape {_shape(x.shape)}; store images shaped "
            f"N x H x W or N x C x H x W (N > 0)"
        )
    channels_last = (
        x.ndim == 4
        and x.shape[3] in (1, 3)
        and x.shape[1] not in (1, 3)
        and x.shape[1] == x.shape[2]
    )  # e.g. N x 32 x 32 x 3
    if channels_last:
        raise GifError(
            f"{path}: {key} has shape {_shape(x.shape)}, channels last; store "
            f"N x C x H x W (e.g. x.transpose(0, 3, 1, 2))"
        )
    if x.dtype == torch.uint8:
        x = _unit_images(x)
    elif x.is_floating_point():
        x = x.to(torch.float32).contiguous()
        if not torch.isfinite(x).all():
            raise GifError(f"{path}: {key} holds NaN or infinite values")
    else:
        raise GifError(
            f"{path}: {key} has dtype {str(x.dtype).removeprefix('torch.')}; store "
            f"images as uint8 (0-255, scaled to [0, 1]) or float (taken as is)"
        )
    return x.unsqueeze(1) if x.ndim == 3 else x


def _tensor_labels(value: object, path: Path, key: str, count: int) -> Tensor:
    """Labels as int64 [count], each in 0..MAX_CLASSES-1, checked before anything is sized by
    a label (the number of classes is the largest label plus one)."""
    if isinstance(value, Tensor):
        value = value.numpy(force=True)
    if not isinstance(value, np.ndarray):
        raise GifError(f"{path}: {key} is a {type(value).__name__}; store an array or tensor")
    if value.dtype.kind not in "iu":
        raise GifError(f"{path}: {key} has dtype {value.dtype}; store integer class labels")
    if value.ndim != 1 or value.shape[0] != count:
        raise GifError(
            f"{path}: {key} has shape {_shape(value.shape)}; store one integer label "
            f"per image ({count})"
        )
    if value.size and value.min() < 0:
        raise GifError(f"{path}: {key} holds negative labels; labels are 0..num_classes-1")
    if value.size and value.max() >= MAX_CLASSES:
        raise GifError(
            f"{path}: {key} holds the label {value.max()}; labels are 0..num_classes-1, "
            f"with at most {MAX_CLASSES} classes"
        )
    return torch.from_numpy(value.astype(np.int64))


def _shape(shape: Sequence[int]) -> str:
    return " x ".join(str(s) for s in shape) or "()"
