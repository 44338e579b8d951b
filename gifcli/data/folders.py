"""The ``imagefolder`` data set: ``root/train/<class>/*.png`` and ``root/test/<class>/*.png``,
and optionally a validation set of the user's own in ``root/val/<class>/*.png``.

Loading lists the files and reads each image's header once (its size and bands: no pixel is
decoded), so a wrong layout, an unreadable header, an image over the pixel budget or a size
mismatch is refused before any work. Pixels are decoded batch by batch when a split is read
(``FileStore``); a file that fails to decode then is the same one-line error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gifcli.config import DataConfig
from gifcli.data.images import open_image
from gifcli.data.stores import FileStore
from gifcli.errors import GifError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class ImageFolder:
    """The two splits as stores and their labels (class folders in sorted order)."""

    train: FileStore
    train_labels: list[int]
    test: FileStore
    test_labels: list[int]
    class_names: tuple[str, ...]
    val: FileStore | None = None
    val_labels: list[int] | None = None


def read_imagefolder(data: DataConfig) -> ImageFolder:
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
    split_files = {}
    for split in ("test", "val") if (root / "val").is_dir() else ("test",):
        for name in _class_folders(root / split):
            if name not in classes:
                raise GifError(
                    f"data.root: {root / split / name} is a class with no folder in "
                    f"{root / 'train'}; every {split} class needs training images"
                )
        split_files[split] = _image_files(root / split, classes, require_every_class=False)
        if not split_files[split]:
            raise GifError(f"data.root: {root / split} holds no images; imagefolder reads {layout}")
    test_files, val_files = split_files["test"], split_files.get("val")

    mode, size = _mode_and_size(train_files + test_files + (val_files or []), data.image_size)
    resize = data.image_size is not None

    def store(files: list[tuple[Path, int]]) -> FileStore:
        return FileStore([path for path, _ in files], mode=mode, size=size, resize=resize)

    return ImageFolder(
        train=store(train_files),
        train_labels=[label for _, label in train_files],
        test=store(test_files),
        test_labels=[label for _, label in test_files],
        class_names=tuple(classes),
        val=store(val_files) if val_files is not None else None,
        val_labels=[label for _, label in val_files] if val_files is not None else None,
    )


def _mode_and_size(
    files: list[tuple[Path, int]], image_size: int | None
) -> tuple[str, tuple[int, int]]:
    """From the headers: ``L`` when every image has one band (palette images are colour),
    else ``RGB``; and the one (W, H) every image has, or ``image_size`` squared."""
    grey = True
    size = (image_size, image_size) if image_size is not None else None
    first: Path | None = None
    for path, _ in files:
        with open_image(path, hint="remove or replace it") as image:
            grey = grey and len(image.getbands()) == 1 and image.mode != "P"
            found = image.size
        if image_size is not None:
            continue
        if size is None:
            size, first = found, path
        elif found != size:
            raise GifError(
                f"{path}: image is {found[0]}x{found[1]} but {first} is {size[0]}x{size[1]}; "
                f"set data.image_size to resize every image to one square size"
            )
    return ("L" if grey else "RGB"), size


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
