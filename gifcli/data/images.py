"""Image files read with PIL within a size budget, checked on the header before decoding.

A few hundred bytes of PNG or JPEG header can claim 30000 x 30000 pixels; decoding it would
take gigabytes, so an image larger than ``MAX_IMAGE_PIXELS`` is refused before any pixel is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from gifcli.errors import GifError

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_IMAGE_PIXELS = 4096 * 4096


@contextmanager
def open_image(path: str | Path, *, what: str = "the image", hint: str) -> Iterator[Image]:
    """The opened image (header read, pixels not yet decoded); a file PIL cannot read, or an
    image over the budget, is a GifError naming ``path``, ``what`` it is and ``hint``."""
    from PIL import Image, UnidentifiedImageError

    too_large = f"{path}: {what} is larger than the {MAX_IMAGE_PIXELS:,} pixels gif reads"
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise GifError(f"{too_large} ({width}x{height}); {hint}")
            yield image
    except Image.DecompressionBombError as exc:  # PIL's own, larger limit, checked at open
        raise GifError(f"{too_large} ({exc}); {hint}") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise GifError(f"{path}: cannot read {what} ({exc}); {hint}") from exc
