"""The header of a ``.npy`` array, read on its own: what a file declares before any of its data
is read, so that an index file or a ``tensors`` member can be checked against its size first."""

from __future__ import annotations

from typing import IO

import numpy as np

_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The shape, Fortran order and dtype the ``.npy`` header at ``handle``'s position
    declares; ``handle`` is left at the first byte of the data. ValueError for a malformed
    header or a format version other than 1.0 and 2.0."""
    version = np.lib.format.read_magic(handle)
    if version not in _READERS:
        raise ValueError(f"format version {version} is not read")
    return _READERS[version](handle)
