"""How gif opens what it reads: regular files only, within a size, named in every message.

Every file a command reads (the config, checkpoints, the mask, the oracle, index files, the
files of a ``tensors`` data set, the blend image) is checked by ``check_input`` or opened by
``open_input``. A named pipe (FIFO), a device, a socket or a folder where a file is expected is
refused at once, naming the file: opening a FIFO nobody writes to would block forever, and a
device can be endless. The path is checked with ``stat`` before it is opened, then opened
without blocking (``O_NONBLOCK``) and checked again on the open file, so a FIFO swapped in
between cannot block either. A link to a regular file is read like the file. ``limit`` bounds
the size read (a file that grows past it while read is cut there and refused).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from gifcli.errors import GifError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_kind(path: Path, mode: int, what: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise GifError(f"{path}: {what} is {kind}, not a regular file; point it at a file")


def _refuse_size(path: Path, size: int, what: str, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise GifError(f"{path}: {what} is {size:,} bytes; gif reads at most {limit:,} bytes of it")


def _checked_fd(path: Path, *, what: str, missing: str, limit: int | None) -> int:
    """An open, non-blocking, read-only descriptor of ``path``, checked as the module says."""
    try:
        _refuse_kind(path, os.stat(path).st_mode, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise GifError(f"{path}: {what} not found; {missing}") from None
    except OSError as exc:
        raise GifError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        _refuse_kind(path, info.st_mode, what)
        _refuse_size(path, info.st_size, what, limit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_input(
    path: str | os.PathLike[str], *, what: str, missing: str, limit: int | None = None
) -> int:
    """Refuse ``path`` unless it is a regular file of at most ``limit`` bytes (GifError naming
    it and ``what`` it is; ``missing``: what to do when it does not exist); its size. For a
    reader that takes a path (safetensors, numpy, torch)."""
    fd = _checked_fd(Path(path), what=what, missing=missing, limit=limit)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


@contextmanager
def open_input(
    path: str | os.PathLike[str], *, what: str, missing: str, limit: int | None = None
) -> Iterator[BinaryIO]:
    """``path`` opened for binary reading, after the checks of ``check_input``."""
    fd = _checked_fd(Path(path), what=what, missing=missing, limit=limit)
    with os.fdopen(fd, "rb") as handle:
        yield handle


def read_input(
    path: str | os.PathLike[str], *, what: str, missing: str, limit: int | None = None
) -> bytes:
    """The bytes of ``path`` (at most ``limit``), after the checks of ``check_input``."""
    with open_input(path, what=what, missing=missing, limit=limit) as handle:
        data = handle.read() if limit is None else handle.read(limit + 1)
    _refuse_size(Path(path), len(data), what, limit)
    return data
