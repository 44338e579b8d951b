"""The core's progress hook, free of any UI library.

A ``ProgressFactory`` is called as ``factory(description, total)`` and returns a context
manager yielding ``advance(completed=None, info="")``; the CLI passes one that draws Rich
progress bars on stderr, the library default draws nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

Advance = Callable[..., None]
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Advance]]


@contextmanager
def silent(description: str, total: int | None) -> Iterator[Advance]:
    yield lambda *args, **kwargs: None
