"""The ``tensors`` data set: ``x_train``, ``y_train``, ``x_test``, ``y_test`` in one file, and
optionally a validation set of the user's own, ``x_val`` and ``y_val`` (there, or in the file
``data.val_path`` names).

Images are ``N x H x W`` or ``N x C x H x W``: uint8 pixels (0-255, divided by 255) or floats
taken as they are, expected in [0, 1] (a one-line note says when they are not); both are then
normalised with ``data.mean`` / ``data.std`` (0 and 1 by default for this data set).

``data.path`` is a ``.npz`` archive (``numpy.savez``), a folder of ``.npy`` files
(``x_train.npy``, ...), or a ``.pt`` dict saved with ``torch.save``. The images are memory-mapped
wherever the format allows, so they are read from disk batch by batch and never held whole:
``.npy`` files, the members of an uncompressed ``.npz`` (``numpy.savez``), and ``.pt`` files
(``torch.load(mmap=True)``). A compressed ``.npz`` (``numpy.savez_compressed``) is unpacked
into memory, and refused when it would unpack to more than ``MAX_UNPACKED_BYTES``. The header of
every ``.npz`` member is read first and checked against the size the archive gives it and
against the other members (one label per image) before any array is read. Labels are read into
memory and checked before anything is sized by them. Every file is opened through
``gifcli.inputs`` (regular files only).
"""

from __future__ import annotations

import math
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gifcli.config import MAX_CLASSES
from gifcli.data.npy import read_npy_header
from gifcli.data.stores import ArrayStore
from gifcli.errors import GifError
from gifcli.inputs import check_input

TENSOR_KEYS = ("x_train", "y_train", "x_test", "y_test")
VAL_KEYS = ("x_val", "y_val")
_FINITE_CHECK_ROWS = 4096  # float images are checked for NaN/Inf this many rows at a time
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip member's local header: its name and extra
MAX_UNPACKED_BYTES = 4 << 30  # compressed .npz members are unpacked into memory
_MISSING = (
    f"point data.path at a .pt or .npz file, or a folder of .npy files, with "
    f"{', '.join(TENSOR_KEYS)}"
)


@dataclass
class TensorFile:
    train: ArrayStore
    y_train: Tensor
    test: ArrayStore
    y_test: Tensor
    num_classes: int
    val: ArrayStore | None = None
    y_val: Tensor | None = None
    notes: tuple[str, ...] = ()


def read_tensor_file(path_text: str | None) -> TensorFile:
    path = Path(path_text or "")
    arrays = _open_arrays(path, "data.path")
    for key in TENSOR_KEYS:
        if key not in arrays:
            found = ", ".join(sorted(map(str, arrays))) or "nothing"
            raise GifError(
                f"{path}: missing key {key!r}; the file needs "
                f"{', '.join(TENSOR_KEYS)} (found: {found})"
            )
    notes: list[str] = []
    x_train = _images(arrays["x_train"], path, "x_train", notes)
    x_test = _images(arrays["x_test"], path, "x_test", notes)
    _same_shape(x_test, x_train, path, "x_test")
    y_train = _labels(arrays["y_train"], path, "y_train", len(x_train))
    y_test = _labels(arrays["y_test"], path, "y_test", len(x_test))
    x_val, y_val = None, None
    if any(key in arrays for key in VAL_KEYS):
        x_val, y_val = _val_arrays(arrays, path, notes)
        _same_shape(x_val, x_train, path, "x_val")
    return TensorFile(
        train=x_train,
        y_train=y_train,
        test=x_test,
        y_test=y_test,
        num_classes=int(max(y_train.max(), y_test.max())) + 1,
        val=x_val,
        y_val=y_val,
        notes=tuple(notes),
    )


def read_val_file(
    path_text: str, *, shape: tuple[int, ...]
) -> tuple[ArrayStore, Tensor, tuple[str, ...]]:
    """``data.val_path``: the user's validation set, ``x_val`` and ``y_val`` in a file of the
    ``tensors`` formats, its images of ``shape`` (C, H, W, the training images')."""
    path = Path(path_text)
    notes: list[str] = []
    x_val, y_val = _val_arrays(_open_arrays(path, "data.val_path", keys=VAL_KEYS), path, notes)
    if x_val.shape != tuple(shape):
        raise GifError(
            f"data.val_path: {path}: x_val images are {_shape(x_val.shape)} but the "
            f"training images are {_shape(shape)}; store validation images of that shape"
        )
    return x_val, y_val, tuple(notes)


def _val_arrays(arrays: dict, path: Path, notes: list[str]) -> tuple[ArrayStore, Tensor]:
    for key in VAL_KEYS:
        if key not in arrays:
            raise GifError(f"{path}: missing key {key!r}; a validation set needs x_val and y_val")
    x_val = _images(arrays["x_val"], path, "x_val", notes)
    return x_val, _labels(arrays["y_val"], path, "y_val", len(x_val))


def _same_shape(images: ArrayStore, x_train: ArrayStore, path: Path, key: str) -> None:
    if images.shape != x_train.shape:
        raise GifError(
            f"{path}: {key} images are {_shape(images.shape)} but x_train "
            f"images are {_shape(x_train.shape)}; both need one C x H x W shape"
        )


def _open_arrays(path: Path, key: str, keys: Sequence[str] = TENSOR_KEYS) -> dict:
    """The arrays or tensors stored at ``path``, memory-mapped where the format allows."""
    if path.is_dir():
        files = {p.stem: p for p in path.glob("*.npy") if p.stem in (*TENSOR_KEYS, *VAL_KEYS)}
        return {name: _npy(file) for name, file in files.items()}
    check_input(
        path,
        what=key,
        missing=(
            f"point it at a .pt or .npz file, or a folder of .npy files, with {', '.join(keys)}"
        ),
    )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path)
    if suffix in (".pt", ".pth"):
        return _pt(path)
    raise GifError(
        f"{key}: {path} is not a .pt or .npz file; save {', '.join(keys)} with torch.save or "
        "numpy.savez"
    )


def _npy(path: Path) -> np.ndarray:
    check_input(path, what="a data.path file", missing=_MISSING)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise GifError(
            f"{path}: cannot read the .npy file ({exc}); save it with numpy.save"
        ) from exc


def _npz(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            _check_headers(
                path, {key: _member_header(archive, info) for key, info in members.items()}
            )
            packed = [info for info in members.values() if info.compress_type != zipfile.ZIP_STORED]
            _check_unpacked_size(path, packed)
            mapped = {key: _mapped_member(path, info) for key, info in members.items()}
        with np.load(path, allow_pickle=False) as archive:
            return {
                key: mapped[key] if mapped.get(key) is not None else archive[key]
                for key in archive.files
            }
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise GifError(
            f"{path}: cannot read the .npz file ({exc}); save it with numpy.savez"
        ) from exc


def _mapped_member(path: Path, info: zipfile.ZipInfo) -> np.memmap | None:
    """An uncompressed member of an .npz as a read-only memory map (None: it cannot be)."""
    if info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
        return None
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            return None
        file.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        version = np.lib.format.read_magic(file)
        readers = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        if version not in readers:
            return None
        shape, fortran_order, dtype = readers[version](file)
        offset = file.tell()
    if dtype.hasobject:
        return None  # np.load refuses it with allow_pickle=False
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order=order, offset=offset)


def _pt(path: Path) -> dict:
    try:
        arrays = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
    return arrays


def _member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype]:
    """The shape and dtype a member's .npy header declares, read without its data; refused
    when they do not fill the member's size exactly (a few bytes cannot declare gigabytes)."""
    with archive.open(info) as member:
        try:
            shape, _, dtype = read_npy_header(member)
        except ValueError as exc:
            raise ValueError(f"{info.filename}: {exc}") from None
        header = member.tell()
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and header + declared != info.file_size:
        raise ValueError(
            f"{info.filename}: the header declares {_shape(shape)} {dtype} values "
            f"({declared:,} bytes) but the member holds {info.file_size - header:,}"
        )
    return shape, dtype


def _check_headers(path: Path, headers: dict[str, tuple[tuple, np.dtype]]) -> None:
    """One label per image, from the headers alone (before any array is read)."""
    for split in ("train", "test"):
        images, labels = headers.get(f"x_{split}"), headers.get(f"y_{split}")
        if not (images and labels and images[0]):
            continue  # missing, or a scalar: named when the arrays are checked
        if labels[0] != images[0][:1]:
            raise GifError(
                f"{path}: y_{split} has shape {_shape(labels[0])}; store one integer label per "
                f"image ({images[0][0]})"
            )


def _check_unpacked_size(path: Path, packed: Sequence[zipfile.ZipInfo]) -> None:
    """Refuse compressed members that unpack to more than ``MAX_UNPACKED_BYTES``: a small
    compressed file can hold gigabytes of zeros."""
    unpacked = sum(info.file_size for info in packed)
    if unpacked > MAX_UNPACKED_BYTES:
        raise GifError(
            f"{path}: the compressed arrays unpack to {unpacked / 2**30:.1f} GiB; gif unpacks "
            f"at most {MAX_UNPACKED_BYTES / 2**30:.0f} GiB into memory: save the arrays "
            f"uncompressed with numpy.savez (they are then read from disk as needed)"
        )


def _images(value: object, path: Path, key: str, notes: list[str]) -> ArrayStore:
    """A stored image array as a store, its shape and dtype checked (floats: finite; a note
    in ``notes`` when they lie outside [0, 1])."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.dtype == np.uint64:  # torch holds no others
            raise GifError(f"{path}: {key} has dtype {value.dtype}; store numbers")
        is_uint8, is_float = value.dtype == np.uint8, value.dtype.kind == "f"
        dtype_name = str(value.dtype)
    elif isinstance(value, Tensor):
        is_uint8, is_float = value.dtype == torch.uint8, value.is_floating_point()
        dtype_name = str(value.dtype).removeprefix("torch.")
    else:
        raise GifError(f"{path}: {key} is a {type(value).__name__}; store an array or tensor")
    shape = tuple(value.shape)
    if len(shape) not in (3, 4) or shape[0] == 0:
        raise GifError(
            f"{path}: {key} has shape {_shape(shape)}; store images shaped "
            f"N x H x W or N x C x H x W (N > 0)"
        )
    channels_last = (
        len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3) and shape[1] == shape[2]
    )  # e.g. N x 32 x 32 x 3
    if channels_last:
        raise GifError(
            f"{path}: {key} has shape {_shape(shape)}, channels last; store "
            f"N x C x H x W (e.g. x.transpose(0, 3, 1, 2))"
        )
    if not (is_uint8 or is_float):
        raise GifError(
            f"{path}: {key} has dtype {dtype_name}; store images as uint8 (0-255, scaled "
            f"to [0, 1]) or float (taken as is)"
        )
    if is_float:
        low, high = math.inf, -math.inf
        for start in range(0, shape[0], _FINITE_CHECK_ROWS):
            rows = value[start : start + _FINITE_CHECK_ROWS]
            rows = rows.float().numpy(force=True) if isinstance(rows, Tensor) else np.asarray(rows)
            if not np.isfinite(rows).all():
                raise GifError(f"{path}: {key} holds NaN or infinite values")
            low, high = min(low, float(rows.min())), max(high, float(rows.max()))
        if (range_note := float_range_note(low, high, f"{path}: {key}")) is not None:
            notes.append(range_note)
    return ArrayStore(value)


def float_range_note(low: float, high: float, where: str) -> str | None:
    """One line when float images are not in [0, 1] (None when they are): they are taken as
    they are, so 0-255 pixels would be normalised as if in [0, 1]."""
    if low >= 0 and high <= 1:
        return None
    if low >= 0 and 1.5 < high <= 255:
        return (
            f"{where} holds floats up to {high:g}, which look like 0-255 pixels; float images "
            "are taken as they are (expected in [0, 1]): divide them by 255 or store uint8"
        )
    return (
        f"{where} holds floats in [{low + 0.0:.3g}, {high + 0.0:.3g}], outside [0, 1]; float "
        "images are taken as they are and normalised with data.mean/data.std: if they are "
        "not already normalised, scale them to [0, 1]"
    )


def _labels(value: object, path: Path, key: str, count: int) -> Tensor:
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
