"""Removal sets: the samples of the classes to forget, and files of training indices.

An index file (known poisoned samples, or samples to forget) lists indices into the data set's
full training set, counted from 0 before the validation split is held out, one format of three:

- ``.txt``: one index per line, for poisoned samples optionally a second whitespace-separated
  column with the sample's true label; ``#`` starts a comment, blank lines are skipped.
- ``.npy``: a 1-D integer array of indices, or (poisoned samples) an N x 2 array of
  (index, true label) rows.
- ``.json``: a list of indices, or ``{"indices": [...], "true_labels": [...]}``.

A file is at most ``MAX_INDEX_FILE_BYTES`` long, and every index and label must fit 64 bits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gifcli.data.splits import Split
from gifcli.errors import GifError

# one parsed entry: (where it is in the file, index, true label or None)
_Entry = tuple[str, int, int | None]

MAX_INDEX_FILE_BYTES = 256 << 20  # 25 million indices as text


def class_removal_indices(train: Split, classes: Iterable[int]) -> tuple[Tensor, Tensor]:
    """Sorted int64 positions ``(removal, retained)`` in ``train`` of the samples whose label is
    one of ``classes``, and of all others."""
    classes = [int(k) for k in classes]
    for k in classes:
        if not bool((train.y == k).any()):
            raise GifError(
                f"removal.classes: class {k} has no samples in the training split; "
                f"list classes the data set has"
            )
    forget = torch.isin(train.y, torch.tensor(classes, dtype=train.y.dtype, device=train.y.device))
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
    entries = _read_entries(path, "removal.poison_indices", labels=True)
    return _check(entries, Path(path), n_train, num_classes)


def read_removal_indices(path: str | Path, n_train: int, *, key: str) -> Tensor:
    """Indices (int64, sorted) of the training samples a file asks to forget: one index per
    entry, no label column. ``n_train`` is the size of the training set they refer to;
    ``key`` is the setting that named the file (for messages). Raises GifError naming the
    file and the line or entry."""
    indices, _ = _check(_read_entries(path, key, labels=False), Path(path), n_train, None)
    return indices


def _read_entries(path: str | Path, key: str, *, labels: bool) -> list[_Entry]:
    """The entries of an index file; ``labels``: whether a true-label column is allowed."""
    path = Path(path)
    if not path.is_file():
        raise GifError(
            f"{key}: {path} not found; point it at a .txt, .npy or .json file of training indices"
        )
    size = path.stat().st_size
    if size > MAX_INDEX_FILE_BYTES:
        raise GifError(
            f"{path}: the index file is {size:,} bytes; it may be at most "
            f"{MAX_INDEX_FILE_BYTES:,} bytes"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        entries = _read_txt(path, labels=labels)
    elif suffix == ".npy":
        entries = _read_npy(path)
    elif suffix == ".json":
        entries = _read_json(path)
    else:
        raise GifError(f"{key}: {path} is not a .txt, .npy or .json file")
    if not labels:
        for where, _, label in entries:
            if label is not None:
                raise GifError(
                    f"{path}: {where}: carries a second value ({label}); list training "
                    f"indices only, one per entry"
                )
    return entries


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


def _read_txt(path: Path, *, labels: bool) -> list[_Entry]:
    entries = []
    text = _read_text(path)
    expected = "an index and an optional true label" if labels else "one index per line"
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens:
            continue
        where = f"line {number}"
        if len(tokens) > (2 if labels else 1):
            raise GifError(f"{path}: {where}: expected {expected}, got {line.strip()!r}")
        try:
            values = [int(token) for token in tokens]
        except ValueError as exc:
            raise GifError(
                f"{path}: {where}: {line.strip()!r} is not an integer index"
                + (" (and optional integer true label)" if labels else "")
            ) from exc
        entries.append((where, values[0], values[1] if len(values) == 2 else None))
    return entries


def _read_npy(path: Path) -> list[_Entry]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise GifError(
            f"{path}: cannot read the .npy file ({exc}); save it with numpy.save"
        ) from exc
    if not np.issubdtype(array.dtype, np.integer):
        raise GifError(f"{path}: holds {array.dtype} values; store integer indices")
    if array.ndim == 1:
        return [(f"entry {i}", int(v), None) for i, v in enumerate(array.tolist())]
    if array.ndim == 2 and array.shape[1] == 2:
        return [
            (f"row {i}", int(index), int(label)) for i, (index, label) in enumerate(array.tolist())
        ]
    raise GifError(
        f"{path}: array has shape {array.shape}; store a 1-D array of indices or an "
        f"N x 2 array of (index, true label) rows"
    )


def _read_json(path: Path) -> list[_Entry]:
    try:
        content = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise GifError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from exc
    except RecursionError:
        raise GifError(
            f'{path}: JSON nested too deeply; expected a list of indices or {{"indices": [...]}}'
        ) from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise GifError(f"{path}: cannot read the JSON ({exc}); store plain indices") from None
    if isinstance(content, list):
        return [
            (f"entry {i}", _json_int(v, path, f"entry {i}"), None) for i, v in enumerate(content)
        ]
    if not isinstance(content, dict) or "indices" not in content:
        raise GifError(
            f'{path}: expected a list of indices or {{"indices": [...], "true_labels": [...]}}'
        )
    unknown = sorted(set(content) - {"indices", "true_labels"})
    if unknown:
        raise GifError(f"{path}: unknown key {unknown[0]!r}; use indices and true_labels")
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
    return [
        (
            f"indices[{i}]",
            _json_int(v, path, f"indices[{i}]"),
            None if labels is None else _json_int(labels[i], path, f"true_labels[{i}]"),
        )
        for i, v in enumerate(indices)
    ]


def _json_int(value: object, path: Path, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise GifError(f"{path}: {where}: {shown} is not an integer")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise GifError(f"{path}: cannot read the file ({exc})") from exc


def _check(
    entries: list[_Entry], path: Path, n_train: int, num_classes: int | None
) -> tuple[Tensor, Tensor | None]:
    if not entries:
        raise GifError(f"{path}: lists no indices; give at least one training index")
    labelled = entries[0][2] is not None
    first_seen: dict[int, str] = {}
    for where, index, label in entries:
        if (label is not None) != labelled:
            raise GifError(
                f"{path}: {where}: {'has no' if labelled else 'has a'} true label "
                f"but {entries[0][0]} {'has one' if labelled else 'has none'}; give a "
                f"true label for every index or for none"
            )
        if not 0 <= index < n_train:
            raise GifError(
                f"{path}: {where}: index {index} is out of range 0..{n_train - 1} "
                f"(the training set has {n_train} samples)"
            )
        if index in first_seen:
            raise GifError(
                f"{path}: {where}: index {index} is repeated (first at "
                f"{first_seen[index]}); list each sample once"
            )
        first_seen[index] = where
        if label is not None and (label < 0 or (num_classes is not None and label >= num_classes)):
            bound = f"0..{num_classes - 1}" if num_classes is not None else "non-negative"
            raise GifError(f"{path}: {where}: true label {label} is out of range ({bound})")
    indices = torch.tensor([index for _, index, _ in entries], dtype=torch.long)
    order = indices.argsort()
    if not labelled:
        return indices[order], None
    labels = torch.tensor([label for _, _, label in entries], dtype=torch.long)
    return indices[order], labels[order]
