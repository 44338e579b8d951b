"""Removal sets: the samples of the classes to forget, and files of training indices.

An index file (known poisoned samples, or samples to forget) lists indices into the data set's
full training set, counted from 0 before the validation split is held out, one format of three:

- ``.txt``: one index per line, for poisoned samples optionally a second whitespace-separated
  column with the sample's true label; ``#`` starts a comment, blank lines are skipped.
- ``.npy``: a 1-D integer array of indices, or (poisoned samples) an N x 2 array of
  (index, true label) rows.
- ``.json``: a list of indices, or ``{"indices": [...], "true_labels": [...]}``.

A file is at most ``MAX_INDEX_FILE_BYTES`` long (a JSON file at most
``_JSON_BYTES_PER_ENTRY`` bytes a training sample), a ``.txt`` index is written in ASCII
digits, and a ``.npy`` header must match the file's size. The entries are checked as they are
read, so a bad file fails at its first bad entry and memory stays within one entry per training
sample, whatever the file's size.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from gifcli.data.npy import read_npy_header
from gifcli.data.splits import Split
from gifcli.errors import GifError
from gifcli.inputs import check_input, open_input

MAX_INDEX_FILE_BYTES = 256 << 20  # 25 million indices as text


def class_removal_mask(train: Split, classes: Iterable[int]) -> Tensor:
    """A boolean mask over ``train``, True on the samples whose label is one of ``classes``;
    refused when a class has no sample there."""
    classes = [int(k) for k in classes]
    for k in classes:
        if not bool((train.y == k).any()):
            raise GifError(
                f"removal.classes: class {k} has no samples in the training split; "
                f"list classes the data set has"
            )
    return torch.isin(train.y, torch.tensor(classes, dtype=train.y.dtype, device=train.y.device))


def class_removal_indices(train: Split, classes: Iterable[int]) -> tuple[Tensor, Tensor]:
    """Sorted int64 positions ``(removal, retained)`` in ``train`` of the samples whose label is
    one of ``classes`` (``class_removal_mask``), and of all others."""
    forget = class_removal_mask(train, classes)
    return torch.nonzero(forget).flatten(), torch.nonzero(~forget).flatten()


def seeded_subset(count: int, size: int | None, *, seed: int) -> Tensor:
    """Sorted int64 positions of a seeded uniform random subset of ``size`` of ``count`` items;
    all of them (``arange(count)``) when ``size`` is None or at least ``count``.

    The Hessian sample draws its retained points this way, and ``removal.gradient_samples``
    the removal points the removal gradient is averaged over.
    """
    if size is None or size >= count:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:size].sort().values


def read_poison_indices(
    path: str | Path, n_train: int, *, num_classes: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Indices (int64, sorted) of known poisoned training samples and, when the file gives
    them, their true labels (aligned; else None).

    ``n_train`` is the size of the training set the indices refer to; ``num_classes``, when
    given, bounds the true labels. Raises GifError naming the file and the line or entry.
    """
    return _read_index_file(Path(path), "removal.poison_indices", n_train, num_classes, True)


def read_removal_indices(path: str | Path, n_train: int, *, key: str) -> Tensor:
    """Indices (int64, sorted) of the training samples a file asks to forget: one index per
    entry, no label column. ``n_train`` is the size of the training set they refer to;
    ``key`` is the setting that named the file (for messages). Raises GifError naming the
    file and the line or entry."""
    indices, _ = _read_index_file(Path(path), key, n_train, None, False)
    return indices


def _read_index_file(
    path: Path, key: str, n_train: int, num_classes: int | None, labels: bool
) -> tuple[Tensor, Tensor | None]:
    """Each entry is checked as it is read (``_Entries``), so a file fails at its first bad
    entry and memory stays within ``n_train`` entries, whatever the file's size."""
    readers = {".txt": _read_txt, ".npy": _read_npy, ".json": _read_json}
    reader = readers.get(path.suffix.lower())
    missing = "point it at a .txt, .npy or .json file of training indices"
    check_input(path, what=key, missing=missing, limit=MAX_INDEX_FILE_BYTES)
    if reader is None:
        raise GifError(f"{key}: {path} is not a .txt, .npy or .json file")
    entries = _Entries(path, n_train, num_classes, labels)
    with open_input(path, what=key, missing=missing, limit=MAX_INDEX_FILE_BYTES) as handle:
        reader(handle, entries)
    return entries.result()


class _Entries:
    """The entries of one index file, checked one by one as they are read: index in range,
    not repeated, a true label for all or none (and only where labels are allowed). At most
    ``n_train`` entries can pass, so this holds at most that many, however long the file.

    A reader sets ``where``, the format of an entry's place (``"line {}"``), and adds each
    entry with its position in that format."""

    def __init__(self, path: Path, n_train: int, num_classes: int | None, labels: bool) -> None:
        self.path, self.n_train, self.num_classes, self.labels = path, n_train, num_classes, labels
        self.where = "entry {}"
        self.indices = np.empty(0, dtype=np.int64)
        self.true_labels = np.empty(0, dtype=np.int64)
        self.first = np.full(n_train, -1, dtype=np.int64)  # index -> position that listed it
        self.count = 0
        self.labelled: bool | None = None
        self.first_where = ""

    def fail(self, position: int | str, detail: str) -> GifError:
        return GifError(f"{self.path}: {self.where.format(position)}: {detail}")

    def add(self, position: int, index: int, label: int | None = None) -> None:
        where = self.where.format(position)
        if label is not None and not self.labels:
            raise self.fail(
                position,
                f"carries a second value ({label}); list training indices only, one per entry",
            )
        if self.labelled is None:
            self.labelled, self.first_where = label is not None, where
        elif (label is not None) != self.labelled:
            raise self.fail(
                position,
                f"{'has no' if self.labelled else 'has a'} true label but {self.first_where} "
                f"{'has one' if self.labelled else 'has none'}; give a true label for every "
                f"index or for none",
            )
        if not 0 <= index < self.n_train:
            raise self.fail(
                position,
                f"index {index} is out of range 0..{self.n_train - 1} (the training set has "
                f"{self.n_train} samples)",
            )
        if self.first[index] >= 0:
            raise self.fail(
                position,
                f"index {index} is repeated (first at {self.where.format(self.first[index])}); "
                f"list each sample once",
            )
        bound = self.num_classes
        if label is not None and (label < 0 or (bound is not None and label >= bound)):
            shown = f"0..{bound - 1}" if bound is not None else "non-negative"
            raise self.fail(position, f"true label {label} is out of range ({shown})")
        self.first[index] = position
        if self.count == len(self.indices):  # grows by doubling, at most to n_train
            size = min(self.n_train, max(1024, 2 * self.count))
            self.indices = np.resize(self.indices, size)
            self.true_labels = np.resize(self.true_labels, size)
        self.indices[self.count] = index
        self.true_labels[self.count] = -1 if label is None else label
        self.count += 1

    def result(self) -> tuple[Tensor, Tensor | None]:
        if not self.count:
            raise GifError(f"{self.path}: lists no indices; give at least one training index")
        indices = torch.from_numpy(self.indices[: self.count].copy())
        order = indices.argsort()
        if not self.labelled:
            return indices[order], None
        return indices[order], torch.from_numpy(self.true_labels[: self.count].copy())[order]


def to_split_positions(indices: Tensor, split_source: Tensor) -> Tensor:
    """Positions in a split of samples given by their index in the full training set.

    split_source: ``DataSplits.train_source`` (or ``val_source``). Samples not in the split
    (held out for validation) get -1.
    """
    indices = indices.long().cpu()
    split_source = split_source.long().cpu()
    size = 1 + max(
        int(indices.max()) if len(indices) else -1,
        int(split_source.max()) if len(split_source) else -1,
    )
    lookup = torch.full((size,), -1, dtype=torch.long)
    lookup[split_source] = torch.arange(len(split_source))
    return lookup[indices]


_MAX_LINE = 4096  # bytes in one line of a .txt index file
_DIGITS = re.compile(rb"-?[0-9]+")  # ASCII digits only (int() would take 1_0 and other scripts)
_JSON_BYTES_PER_ENTRY = 64  # a JSON file of n_train entries is at most this much per entry
_NPY_CHUNK = 1 << 16  # rows of an .npy index file checked at a time


def _read_txt(handle: BinaryIO, entries: _Entries) -> None:
    """One index per line (and an optional true label, where allowed); ``#`` comments."""
    entries.where = "line {}"
    expected = "an index and an optional true label" if entries.labels else "one index per line"
    for number in itertools.count(1):
        line = handle.readline(_MAX_LINE + 1)
        if not line:
            return
        if len(line) > _MAX_LINE and not line.endswith(b"\n"):
            raise entries.fail(number, f"longer than {_MAX_LINE:,} bytes; one index per line")
        tokens = line.split(b"#", 1)[0].split()
        if not tokens:
            continue
        shown = _show(line.strip())
        if len(tokens) > (2 if entries.labels else 1):
            raise entries.fail(number, f"expected {expected}, got {shown}")
        if not all(_DIGITS.fullmatch(token) for token in tokens):
            label = " (and optional integer true label)" if entries.labels else ""
            raise entries.fail(number, f"{shown} is not an integer index{label}")
        values = [int(token) for token in tokens]
        entries.add(number, values[0], values[1] if len(values) == 2 else None)


def _read_npy(handle: BinaryIO, entries: _Entries) -> None:
    """A 1-D integer array, or N x 2 (index, true label) rows: the header is checked against
    the file before anything is read, then the rows are checked a chunk at a time."""
    path = entries.path
    try:
        shape, fortran_order, dtype = read_npy_header(handle)
    except ValueError as exc:
        raise GifError(
            f"{path}: cannot read the .npy file ({exc}); save it with numpy.save"
        ) from None
    if dtype.hasobject or not np.issubdtype(dtype, np.integer):
        raise GifError(f"{path}: holds {dtype} values; store integer indices")
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 2)):
        raise GifError(
            f"{path}: array has shape {shape}; store a 1-D array of indices or an "
            f"N x 2 array of (index, true label) rows"
        )
    declared = math.prod(shape) * dtype.itemsize
    offset = handle.tell()
    size = os.fstat(handle.fileno()).st_size
    if offset + declared != size:
        raise GifError(
            f"{path}: the header declares {shape} {dtype} values ({declared:,} bytes) but the "
            f"file holds {size - offset:,} bytes of data; save it again with numpy.save"
        )
    if not declared:
        return
    array = np.memmap(
        handle,
        dtype=dtype,
        mode="r",
        shape=shape,
        order="F" if fortran_order else "C",
        offset=offset,
    )
    entries.where = "entry {}" if len(shape) == 1 else "row {}"
    for start in range(0, shape[0], _NPY_CHUNK):
        rows = np.asarray(array[start : start + _NPY_CHUNK]).tolist()
        for position, row in enumerate(rows, start=start):
            if isinstance(row, list):
                entries.add(position, row[0], row[1])
            else:
                entries.add(position, row)


def _read_json(handle: BinaryIO, entries: _Entries) -> None:
    """A list of indices, or ``{"indices": [...], "true_labels": [...]}``; read whole, so
    its size is bounded by the training set's (``_JSON_BYTES_PER_ENTRY`` bytes an entry)."""
    path = entries.path
    limit = 4096 + _JSON_BYTES_PER_ENTRY * entries.n_train
    text = handle.read(limit + 1)
    if len(text) > limit:
        raise GifError(
            f"{path}: a JSON index file for a training set of {entries.n_train:,} samples is at "
            f"most {limit:,} bytes; list each index once, or use a .txt or .npy file"
        )
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GifError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    except RecursionError:
        raise GifError(
            f'{path}: JSON nested too deeply; expected a list of indices or {{"indices": [...]}}'
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # an integer of more than 4300 digits
        raise GifError(f"{path}: cannot read the JSON ({exc}); store plain indices") from None
    if isinstance(content, list):
        for i, value in enumerate(content):
            entries.add(i, _json_int(value, path, f"entry {i}"))
        return
    if not isinstance(content, dict) or "indices" not in content:
        raise GifError(
            f'{path}: expected a list of indices or {{"indices": [...], "true_labels": [...]}}'
        )
    unknown = sorted(set(content) - {"indices", "true_labels"})
    if unknown:
        raise GifError(f"{path}: unknown key {_show(unknown[0])}; use indices and true_labels")
    indices = content["indices"]
    labels = content.get("true_labels")
    for key, values in (("indices", indices), ("true_labels", labels)):
        if values is not None and not isinstance(values, list):
            raise GifError(f"{path}: {key} must be a list of integers")
    if labels is not None and len(labels) != len(indices):
        raise GifError(
            f"{path}: {len(indices)} indices but {len(labels)} true_labels; give "
            f"one true label per index"
        )
    entries.where = "indices[{}]"
    for i, value in enumerate(indices):
        label = None if labels is None else _json_int(labels[i], path, f"true_labels[{i}]")
        entries.add(i, _json_int(value, path, f"indices[{i}]"), label)


def _json_int(value: object, path: Path, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GifError(f"{path}: {where}: {_show(value)} is not an integer")
    return value


def _show(value: object, most: int = 40) -> str:
    """``repr(value)`` (text for bytes), cut short."""
    shown = repr(value.decode(errors="replace") if isinstance(value, bytes) else value)
    return shown if len(shown) <= most else shown[: most - 3] + "..."
