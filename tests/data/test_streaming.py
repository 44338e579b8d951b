"""Streamed splits: lazy image folders, memory-mapped tensors files, uint8 at rest, workers,
errors met while streaming, augmentation and sampled training metrics."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gifcli.cli.main import app
from gifcli.config import DataConfig, TrainConfig, load_config
from gifcli.data import StreamedSplit, TensorSplit, load_dataset
from gifcli.data import stores as stores_module
from gifcli.data.augment import random_crop_flip
from gifcli.data.stores import ArrayStore, FileStore
from gifcli.errors import GifError
from gifcli.models import TinyNet
from gifcli.tasks import RemoveClass
from gifcli.train import train_model
from tests.conftest import DIGITS


def _colour_folder(root, *, train=12, test=4, size=8):
    """Two classes of RGB PNGs: class ``a`` reddish, ``b`` bluish, with noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(("a", "b")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                array = rng.integers(0, 100, size=(size, size, 3), dtype=np.uint8)
                array[..., 2 * label] += 150
                Image.fromarray(array, mode="RGB").save(folder / f"{i:03d}.png")
    return root


def _truncate(path):
    """A PNG whose header still reads but whose pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _folder_config(root, **keys):
    return DataConfig(dataset="imagefolder", root=str(root), val_fraction=0.25, **keys)


# ------------------------------------------------------------------------- lazy imagefolder


def test_imagefolder_loads_without_decoding_and_decodes_per_batch(tmp_path, monkeypatch):
    _colour_folder(tmp_path)
    decoded = []
    original = stores_module.decode
    monkeypatch.setattr(
        stores_module,
        "decode",
        lambda path, *a, **k: decoded.append(path) or original(path, *a, **k),
    )
    splits = load_dataset(_folder_config(tmp_path), seed=0)
    assert decoded == [], "loading decodes no image"
    assert isinstance(splits.train, StreamedSplit) and isinstance(splits.train.store, FileStore)
    assert len(splits.train) == 18 and len(splits.val) == 6 and len(splits.test) == 8
    x, y = next(splits.train.batches(4))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and len(decoded) == 4
    subset = splits.train.subset(torch.tensor([5, 1]))
    assert len(decoded) == 4, "a subset is a view: nothing is read"
    assert torch.equal(subset.x, splits.train.x[[5, 1]])


def test_streamed_batches_equal_the_eager_normalisation(tmp_path):
    _colour_folder(tmp_path)
    splits = load_dataset(
        _folder_config(tmp_path, mean=[0.5, 0.4, 0.3], std=[0.2, 0.3, 0.4]), seed=0
    )
    files = [splits.train.store.files[p] for p in splits.train.positions.tolist()]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files])
    expected = torch.from_numpy(pixels).to(torch.float32).div_(255.0)
    expected.sub_(torch.tensor([0.5, 0.4, 0.3]).reshape(1, -1, 1, 1))
    expected.div_(torch.tensor([0.2, 0.3, 0.4]).reshape(1, -1, 1, 1))
    assert torch.equal(torch.cat([x for x, _ in splits.train.batches(5)]), expected)
    order = torch.tensor([3, 0, 7])
    ((x, y),) = splits.train.batches(8, order=order)
    assert torch.equal(x, expected[order]) and torch.equal(y, splits.train.y[order])


def test_workers_read_the_same_batches(tmp_path):
    _colour_folder(tmp_path)
    serial = load_dataset(_folder_config(tmp_path), seed=0).train
    parallel = load_dataset(_folder_config(tmp_path, workers=2), seed=0).train
    assert parallel.workers == 2
    for (a, ya), (b, yb) in zip(serial.batches(4), parallel.batches(4), strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_met_while_streaming_names_the_file(tmp_path, workers):
    _colour_folder(tmp_path)
    broken = tmp_path / "train" / "b" / "005.png"
    _truncate(broken)
    splits = load_dataset(_folder_config(tmp_path, workers=workers), seed=0)  # the header reads
    with pytest.raises(GifError) as info:
        for _ in splits.train.batches(4):
            pass
    message = str(info.value)
    assert message.startswith(f"{broken}: cannot read the image") and "\n" not in message


# ---------------------------------------------------------------------------- uint8 at rest


def test_pixels_stay_uint8_at_rest(tmp_path):
    _colour_folder(tmp_path)
    folder = load_dataset(_folder_config(tmp_path), seed=0)
    assert folder.train.store.read(torch.tensor([0])).dtype == torch.uint8
    assert folder.train.in_memory().store.array.dtype == torch.uint8
    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 3, 4, 4), dtype=np.uint8),
        y_train=np.arange(20) % 2,
        x_test=rng.integers(0, 256, (6, 3, 4, 4), dtype=np.uint8),
        y_test=np.arange(6) % 2,
    )
    tensors = load_dataset(DataConfig(dataset="tensors", path=str(path)), seed=0)
    assert tensors.train.store.array.dtype == np.uint8
    x, _ = next(tensors.train.batches(3))
    assert x.dtype == torch.float32


def test_cifar10_layout_is_read_channels_last_as_uint8():
    array = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    store = ArrayStore(array, channels_last=True)
    assert store.shape == (3, 4, 4) and len(store) == 2
    assert torch.equal(
        store.read(torch.tensor([1])), torch.from_numpy(array[[1]]).permute(0, 3, 1, 2)
    )


# ------------------------------------------------------------------------ memory-mapped files


def _arrays():
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (30, 1, 5, 5), dtype=np.uint8),
        "y_train": np.arange(30) % 3,
        "x_test": rng.integers(0, 256, (9, 1, 5, 5), dtype=np.uint8),
        "y_test": np.arange(9) % 3,
    }


def _expected(x):
    return torch.from_numpy(x).to(torch.float32).div_(255.0)


def test_uncompressed_npz_is_memory_mapped(tmp_path):
    arrays = _arrays()
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    splits = load_dataset(DataConfig(dataset="tensors", path=str(path), val_fraction=0.0), seed=0)
    assert isinstance(splits.train.store.array, np.memmap)
    assert torch.equal(splits.train.x, _expected(arrays["x_train"]))
    compressed = tmp_path / "packed.npz"
    np.savez_compressed(compressed, **arrays)
    packed = load_dataset(
        DataConfig(dataset="tensors", path=str(compressed), val_fraction=0.0), seed=0
    )
    assert not isinstance(packed.train.store.array, np.memmap)  # unpacked into memory
    assert torch.equal(packed.test.x, _expected(arrays["x_test"]))


def test_folder_of_npy_files_is_memory_mapped(tmp_path):
    arrays = _arrays()
    for key, value in arrays.items():
        np.save(tmp_path / f"{key}.npy", value)
    splits = load_dataset(
        DataConfig(dataset="tensors", path=str(tmp_path), val_fraction=0.0), seed=0
    )
    assert isinstance(splits.test.store.array, np.memmap)
    assert torch.equal(splits.test.x, _expected(arrays["x_test"]))
    (tmp_path / "y_test.npy").unlink()
    with pytest.raises(GifError, match="missing key 'y_test'"):
        load_dataset(DataConfig(dataset="tensors", path=str(tmp_path)), seed=0)


def test_pt_file_is_loaded_memory_mapped(tmp_path):
    arrays = {k: torch.from_numpy(v) for k, v in _arrays().items()}
    path = tmp_path / "data.pt"
    torch.save(arrays, path)
    splits = load_dataset(DataConfig(dataset="tensors", path=str(path), val_fraction=0.0), seed=0)
    assert isinstance(splits.train.store.array, torch.Tensor)
    assert torch.equal(splits.train.x, arrays["x_train"].float() / 255.0)


# ----------------------------------------------------------------------------- augmentation


def test_random_crop_flip_pads_with_fill_and_flips():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        out = random_crop_flip(x, generator, fill=[-7.0], padding=1)
        assert out.shape == x.shape
        for image, source in zip(out, x, strict=True):
            kept = image[image != -7.0]
            assert set(kept.tolist()) <= set(source.flatten().tolist())
            seen.add(torch.equal(image, source.flip(2)))
    assert seen == {True, False}, "some images flipped, some not"
    padded_only = random_crop_flip(torch.zeros(64, 1, 2, 2), generator, fill=[5.0], padding=4)
    assert (padded_only == 5.0).any() and (padded_only == 0.0).any()


def _digits_like_split():
    generator = torch.Generator().manual_seed(0)
    return TensorSplit(torch.randn(64, 3, 8, 8, generator=generator), torch.arange(64) % 4)


def _trained(augment):
    model = TinyNet(in_channels=3, image_size=(8, 8), num_classes=4)
    config = TrainConfig(epochs=2, batch_size=16, augment=augment)
    return train_model(
        model, _digits_like_split(), config=config, seed=3, device=torch.device("cpu")
    )


def test_augment_false_trains_exactly_as_before():
    """The loop before streaming, written out: augment=false gives bit-identical weights."""
    torch.manual_seed(0)
    ours = _trained(augment=False)
    torch.manual_seed(0)
    model = TinyNet(in_channels=3, image_size=(8, 8), num_classes=4)
    train, config = _digits_like_split(), TrainConfig(epochs=2, batch_size=16)
    torch.manual_seed(3)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * 4)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        order = torch.randperm(64, generator=generator)
        for start in range(0, 64, 16):
            batch = order[start : start + 16]
            loss = torch.nn.functional.cross_entropy(model(train.x[batch]), train.y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    for a, b in zip(ours.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    augmented = _trained(augment=True)
    assert not torch.equal(augmented.classifier.weight, ours.classifier.weight)


# ------------------------------------------------------------------- sampled train metrics


def test_metrics_train_samples_measures_a_seeded_sample(digits_base):
    from gifcli.context import prepare

    config = load_config(DIGITS, [f"checkpoint={digits_base}", "metrics.train_samples=300"])
    ctx = prepare(config)
    model = ctx.load_model()
    task = ctx.task()
    assert task.train_samples == 300 and task.metrics_sample_size(ctx.data) == 300
    sampled = task.metrics(model, ctx.data, device=ctx.device, seed=0)
    train, positions = task.metrics_train(ctx.data, seed=0)
    assert len(train) == 300 and torch.equal(positions, positions.sort().values)
    whole = RemoveClass(classes=[3]).metrics(model, ctx.data, device=ctx.device, seed=0)
    assert sampled["acc_test"] == whole["acc_test"]  # the test split is never sampled
    from gifcli.metrics import predict

    predicted, _ = predict(model, train, device=ctx.device)
    retained = train.y != 3
    expected = 100 * float((predicted[retained] == train.y[retained]).float().mean())
    assert sampled["retain_acc_train"] == pytest.approx(expected)
    big = RemoveClass(classes=[3], train_samples=10**6)
    assert big.metrics_sample_size(ctx.data) is None


# ------------------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A colour image folder, a config for it and TinyNet trained on it (one epoch)."""
    from typer.testing import CliRunner

    root = _colour_folder(tmp_path_factory.mktemp("folder"), train=20, test=6)
    config = root / "config.yaml"
    config.write_text(
        "model: {arch: tinynet, num_classes: 2}\n"
        f"data: {{dataset: imagefolder, root: {root}, val_fraction: 0.2}}\n"
        "removal: {classes: [0]}\n"
        "influence: {hessian_samples: 16, batch_size: 8, max_iter: 3}\n"
        "update: {grid_points: 4}\n"
        "train: {epochs: 1, batch_size: 8}\n"
    )
    checkpoint = root / "base.safetensors"
    result = CliRunner().invoke(app, ["train", str(config), "-o", str(checkpoint)])
    assert result.exit_code == 0, result.output
    return root, config, checkpoint


def test_edit_streams_an_image_folder_and_reports_the_train_sample(runner, folder_run, tmp_path):
    root, config, checkpoint = folder_run
    out = tmp_path / "edit"
    args = [
        str(config),
        f"checkpoint={checkpoint}",
        f"output.dir={out}",
        "metrics.train_samples=10",
    ]
    result = runner.invoke(app, ["remove-class", *args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["train_samples"] == 10
    assert "seeded sample of 10 training samples" in (out / "report.md").read_text()
    assert report["removal"]["samples"] == 16  # class a: 20 images less its validation share


@pytest.mark.parametrize("where", ["train/a/003.png", "test/b/002.png"])
def test_corrupt_image_during_the_edit_exits_1_and_writes_nothing(
    runner, folder_run, tmp_path, where
):
    root, config, checkpoint = folder_run
    image = root / where
    original = image.read_bytes()
    _truncate(image)
    try:
        out = tmp_path / "edit"
        result = runner.invoke(
            app, ["remove-class", str(config), f"checkpoint={checkpoint}", f"output.dir={out}"]
        )
    finally:
        image.write_bytes(original)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    said = [line for line in result.output.splitlines() if not line.startswith("note:")]
    assert said[0].startswith("error:") and f"{image}: cannot read" in result.output
    assert len(said) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [], "no output dir, no staging"


def test_corrupt_image_while_training_exits_1_and_writes_no_checkpoint(runner, tmp_path):
    root = _colour_folder(tmp_path / "folder")
    broken = root / "train" / "a" / "007.png"
    _truncate(broken)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {arch: tinynet, num_classes: 2}\n"
        f"data: {{dataset: imagefolder, root: {root}}}\n"
        "removal: {classes: [0]}\n"
        "train: {epochs: 1, batch_size: 4}\n"
    )
    checkpoint = tmp_path / "out" / "base.safetensors"
    result = runner.invoke(app, ["train", str(config), "-o", str(checkpoint)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and f"{broken}: cannot read" in result.output
    assert not checkpoint.parent.exists() or list(checkpoint.parent.iterdir()) == []
