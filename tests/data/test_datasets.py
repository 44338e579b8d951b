"""Readers, splits and normalisation of gifcli.data.datasets."""

import numpy as np
import pytest
import torch
from PIL import Image

from gifcli.config import DataConfig
from gifcli.data import TensorSplit, load_dataset, stratified_split
from gifcli.data.datasets import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION
from gifcli.errors import GifError

# ------------------------------------------------------------------------------- TensorSplit


def test_tensor_split_len_subset_batches_to():
    split = TensorSplit(torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10))
    assert len(split) == 10
    sub = split.subset(torch.tensor([7, 2]))
    assert sub.y.tolist() == [7, 2] and sub.x.flatten().tolist() == [7.0, 2.0]
    assert split.subset([1, 3]).y.tolist() == [1, 3]
    assert len(split.subset([])) == 0
    assert split.subset(split.y >= 8).y.tolist() == [8, 9]
    sizes = [len(y) for _, y in split.batches(4)]
    assert sizes == [4, 4, 2]
    assert torch.cat([y for _, y in split.batches(4)]).tolist() == list(range(10))
    assert split.to("cpu").x.device.type == "cpu"


def test_tensor_split_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        TensorSplit(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(dataset="digits", val_fraction=0.1), seed=0)


def test_digits_shapes_and_counts(digits):
    assert digits.num_classes == 10 and digits.in_channels == 1 and digits.image_size == (8, 8)
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert len(digits.test) == 359
    assert len(digits.train) + len(digits.val) == 1438
    assert len(digits.val) == 144  # round(0.1 * 1438), shared among classes
    for split in (digits.train, digits.val, digits.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 8, 8)
    assert torch.bincount(digits.test.y).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert torch.bincount(digits.val.y, minlength=10).min() >= 14
    assert digits.mean == (0.3,) and digits.std == (0.4,)
    pixels = torch.cat([digits.train.x, digits.test.x]) * 0.4 + 0.3
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert digits.poison is None


GOLDEN_DIGITS_TEST_HEAD = [1, 2, 6, 10, 13, 16, 22, 25]


def test_digits_test_split_is_pinned():
    from sklearn.datasets import load_digits

    y = torch.from_numpy(load_digits().target).long()
    _, test = stratified_split(y, DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED)
    # golden: the test split must not move between versions (benchmarks compare across runs)
    assert len(test) == 359
    assert test[:8].tolist() == GOLDEN_DIGITS_TEST_HEAD


def test_digits_splits_are_deterministic(digits):
    again = load_dataset(DataConfig(dataset="digits", val_fraction=0.1), seed=0)
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.val.y, digits.val.y)
    other = load_dataset(DataConfig(dataset="digits", val_fraction=0.1), seed=1)
    assert torch.equal(other.test.x, digits.test.x)  # the test split ignores the config seed
    assert not torch.equal(other.val_source, digits.val_source)
    assert sorted(torch.cat([digits.train_source, digits.val_source]).tolist()) == list(range(1438))


def test_digits_val_fraction_zero_gives_empty_val():
    splits = load_dataset(DataConfig(dataset="digits", val_fraction=0.0), seed=0)
    assert len(splits.val) == 0 and splits.val.x.shape[1:] == (1, 8, 8)
    assert len(splits.train) == 1438


def test_stratified_split_counts():
    y = torch.tensor([0] * 7 + [1] * 3 + [2] * 2)
    kept, held = stratified_split(y, 0.25, seed=0)
    assert len(held) == 3 and len(kept) == 9  # round(0.25 * 12)
    assert torch.bincount(y[held], minlength=3).tolist() == [2, 1, 0]  # quotas 1.75, .75, .5
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(12))
    _, tiny = stratified_split(y, 0.01, seed=0)
    assert len(tiny) == 1  # a positive fraction always holds out a sample
    kept, none = stratified_split(y, 0.0, seed=0)
    assert len(none) == 0 and len(kept) == 12


def test_image_size_is_only_for_imagefolder():
    with pytest.raises(GifError, match="data.image_size"):
        load_dataset(DataConfig(dataset="digits", image_size=16), seed=0)


# ----------------------------------------------------------------------------------- tensors


def _arrays(rng, x_shape, dtype):
    if dtype == np.uint8:
        x_train = rng.integers(0, 256, size=(12, *x_shape), dtype=np.uint8)
        x_test = rng.integers(0, 256, size=(5, *x_shape), dtype=np.uint8)
    else:
        x_train = rng.random((12, *x_shape)).astype(dtype)
        x_test = rng.random((5, *x_shape)).astype(dtype)
    return dict(
        x_train=x_train, y_train=np.arange(12) % 3, x_test=x_test, y_test=np.array([0, 1, 2, 3, 0])
    )


def test_tensors_npz_uint8_nhw(tmp_path):
    arrays = _arrays(np.random.default_rng(0), (4, 5), np.uint8)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    splits = load_dataset(DataConfig(dataset="tensors", path=str(path), val_fraction=0.0), seed=0)
    assert splits.in_channels == 1 and splits.image_size == (4, 5) and splits.num_classes == 4
    assert splits.mean == (0.0,) and splits.std == (1.0,)
    expected = torch.from_numpy(arrays["x_train"]).float().unsqueeze(1) / 255.0
    assert torch.equal(splits.train.x, expected)
    assert splits.train.y.tolist() == arrays["y_train"].tolist()
    assert torch.equal(
        splits.test.x, torch.from_numpy(arrays["x_test"]).float().unsqueeze(1) / 255.0
    )
    assert splits.class_names == ("0", "1", "2", "3")


def test_tensors_pt_float_nchw_taken_as_is(tmp_path):
    arrays = _arrays(np.random.default_rng(1), (3, 4, 4), np.float32)
    arrays["x_train"][0, 0, 0, 0] = 2.5  # floats are not clipped or rescaled
    path = tmp_path / "data.pt"
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    splits = load_dataset(DataConfig(dataset="tensors", path=str(path), val_fraction=0.25), seed=0)
    assert splits.in_channels == 3 and len(splits.train) == 9 and len(splits.val) == 3
    x = torch.from_numpy(arrays["x_train"])
    assert torch.equal(splits.train.x, x[splits.train_source])
    assert torch.equal(splits.val.x, x[splits.val_source])
    assert splits.train.x.dtype == torch.float32


def test_tensors_normalisation(tmp_path):
    arrays = _arrays(np.random.default_rng(2), (2, 3, 3), np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    config = DataConfig(
        dataset="tensors", path=str(path), val_fraction=0.0, mean=[0.5, 0.25], std=[0.5, 2.0]
    )
    splits = load_dataset(config, seed=0)
    x = torch.from_numpy(arrays["x_test"])
    expected = torch.stack([(x[:, 0] - 0.5) / 0.5, (x[:, 1] - 0.25) / 2.0], dim=1)
    torch.testing.assert_close(splits.test.x, expected, rtol=0, atol=1e-6)
    assert splits.mean == (0.5, 0.25) and splits.std == (0.5, 2.0)


@pytest.mark.parametrize("key", ["mean", "std"])
def test_normalisation_length_must_match_channels(tmp_path, key):
    arrays = _arrays(np.random.default_rng(3), (3, 2, 2), np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    config = DataConfig(dataset="tensors", path=str(path), **{key: [0.5]})
    with pytest.raises(GifError, match=f"data.{key}: lists 1 value.*3 channel"):
        load_dataset(config, seed=0)


def _save_npz(tmp_path, **changes):
    arrays = _arrays(np.random.default_rng(4), (4, 4), np.uint8)
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"x_test": None}, "missing key 'x_test'"),
        ({"x_train": np.zeros((12, 16), np.uint8)}, "x_train has shape 12 x 16"),
        ({"x_train": np.zeros((12, 4, 4, 3), np.uint8)}, "x_train .*channels last"),
        ({"x_test": np.zeros((5, 4, 4), np.int32)}, "x_test has dtype int32"),
        ({"x_test": np.zeros((5, 5, 4), np.uint8)}, "x_test images are 1 x 5 x 4"),
        ({"y_train": np.zeros(11, np.int64)}, "y_train has shape 11"),
        ({"y_test": np.zeros(5, np.float32)}, "y_test has dtype float32"),
        ({"y_test": np.array([0, 1, -1, 0, 0])}, "y_test holds negative labels"),
        ({"x_train": np.full((12, 4, 4), np.nan, np.float32)}, "x_train holds NaN"),
        ({"y_test": np.array([0, 1, 10**12, 0, 0])}, "y_test holds the label 1000000000000"),
        ({"y_test": np.array(list("01200"))}, "y_test has dtype <U1"),
        ({"y_test": np.array([0, 1, 2**64 - 1, 0, 0], np.uint64)}, "the label 18446744073709"),
        ({"x_test": np.array([["a"] * 4] * 5)}, "x_test has dtype <U1"),
        ({"x_test": np.zeros((5, 4, 4), np.uint64)}, "x_test has dtype uint64"),
    ],
)
def test_tensors_errors_name_file_and_key(tmp_path, changes, message):
    path = _save_npz(tmp_path, **changes)
    with pytest.raises(GifError, match=message) as info:
        load_dataset(DataConfig(dataset="tensors", path=str(path)), seed=0)
    assert str(path) in str(info.value)


def test_tensors_file_errors(tmp_path):
    with pytest.raises(GifError, match="missing.npz: data.path not found"):
        load_dataset(DataConfig(dataset="tensors", path=str(tmp_path / "missing.npz")), seed=0)
    csv = tmp_path / "data.csv"
    csv.write_text("1,2\n")
    with pytest.raises(GifError, match="not a .pt or .npz"):
        load_dataset(DataConfig(dataset="tensors", path=str(csv)), seed=0)
    pickled = tmp_path / "data.pt"
    torch.save({"x_train": object()}, pickled)  # not loadable with weights_only=True
    with pytest.raises(GifError, match="weights_only=True"):
        load_dataset(DataConfig(dataset="tensors", path=str(pickled)), seed=0)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(GifError, match="holds a list"):
        load_dataset(DataConfig(dataset="tensors", path=str(listed)), seed=0)


# ------------------------------------------------------------------------------- imagefolder


def _write_png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _grey_folder(root, size=(5, 6)):
    rng = np.random.default_rng(0)
    images = {}
    for split, count in (("train", 3), ("test", 2)):
        for name in ("dog", "cat"):
            for i in range(count):
                array = rng.integers(0, 256, size=size, dtype=np.uint8)
                path = root / split / name / f"{i}.png"
                _write_png(path, array, "L")
                images[path] = array
    return images


def test_imagefolder_grey(tmp_path):
    images = _grey_folder(tmp_path)
    splits = load_dataset(
        DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.0), seed=0
    )
    assert splits.class_names == ("cat", "dog") and splits.num_classes == 2
    assert splits.in_channels == 1 and splits.image_size == (5, 6)
    assert splits.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits.test.y.tolist() == [0, 0, 1, 1]
    expected = torch.from_numpy(images[tmp_path / "train" / "dog" / "1.png"]).float() / 255.0
    assert torch.equal(splits.train.x[4, 0], expected)


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    _grey_folder(tmp_path)
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 255
    _write_png(tmp_path / "test" / "cat" / "9.jpg", rgb, "RGB")  # jpg: approximately red
    splits = load_dataset(
        DataConfig(dataset="imagefolder", root=str(tmp_path), val_fraction=0.0), seed=0
    )
    assert splits.in_channels == 3 and splits.mean == (0.0, 0.0, 0.0)
    first = splits.train.x[0]
    assert torch.equal(first[0], first[1]) and torch.equal(first[1], first[2])


def test_imagefolder_sizes(tmp_path):
    _grey_folder(tmp_path)
    odd = tmp_path / "test" / "dog" / "odd.png"
    _write_png(odd, np.zeros((7, 7), np.uint8), "L")
    with pytest.raises(GifError, match=r"odd.png: image is 7x7 .* data.image_size"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0)
    splits = load_dataset(
        DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=4), seed=0
    )
    assert splits.image_size == (4, 4) and splits.test.x.shape == (5, 1, 4, 4)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(GifError, match="train is not a folder"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0)
    _grey_folder(tmp_path)
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(GifError, match="bird is a class with no folder"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0)
    (tmp_path / "test" / "bird").rmdir()
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    assert (
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0).num_classes == 2
    )
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(GifError, match="broken.png: cannot read"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0)


# ------------------------------------------------------------------------------ torchvision


@pytest.mark.parametrize(
    ("dataset", "folder"),
    [
        ("mnist", "MNIST/raw"),
        ("fashion-mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("svhn", ""),
    ],
)
def test_torchvision_missing_on_disk(tmp_path, dataset, folder):
    with pytest.raises(GifError) as info:
        load_dataset(DataConfig(dataset=dataset, root=str(tmp_path)), seed=0)
    message = str(info.value)
    assert str(tmp_path / folder) in message and "data.download: true" in message


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_raw_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train_images)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28), np.uint8))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    splits = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path), val_fraction=0.0), seed=0)
    assert splits.num_classes == 10 and splits.in_channels == 1 and splits.image_size == (28, 28)
    assert len(splits.train) == 20 and len(splits.test) == 10
    assert splits.mean == (0.1307,) and splits.std == (0.3081,)
    expected = (torch.from_numpy(train_images).float() / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(splits.train.x[:, 0], expected, rtol=0, atol=1e-6)


def test_tensors_labels_of_any_integer_dtype_are_read(tmp_path):
    path = _save_npz(tmp_path, y_train=(np.arange(12) % 3).astype(np.uint64))
    splits = load_dataset(DataConfig(dataset="tensors", path=str(path)), seed=0)
    assert splits.train.y.dtype == torch.int64 and splits.num_classes == 4
    pt = tmp_path / "data.pt"
    arrays = _arrays(np.random.default_rng(5), (4, 4), np.uint8)
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    tensors["y_test"] = tensors["y_test"].to(torch.uint16)
    torch.save(tensors, pt)
    assert load_dataset(DataConfig(dataset="tensors", path=str(pt)), seed=0).num_classes == 4


def test_tensors_archive_larger_than_the_bound_is_refused_before_unpacking(tmp_path, monkeypatch):
    from gifcli.data import tensor_files

    path = tmp_path / "packed.npz"
    np.savez_compressed(path, **_arrays(np.random.default_rng(4), (4, 4), np.uint8))
    monkeypatch.setattr(tensor_files, "MAX_UNPACKED_BYTES", 256)
    with pytest.raises(GifError, match="unpack to .* GiB; gif unpacks at most"):
        load_dataset(DataConfig(dataset="tensors", path=str(path)), seed=0)
    # an uncompressed archive is memory-mapped, not unpacked: no memory limit applies
    assert (
        len(load_dataset(DataConfig(dataset="tensors", path=str(_save_npz(tmp_path))), seed=0).test)
        == 5
    )


def test_imagefolder_image_claiming_a_huge_size_is_refused_from_its_header(tmp_path):
    from tests.conftest import png_claiming

    _grey_folder(tmp_path)
    png_claiming(tmp_path / "train" / "cat" / "huge.png", 30000, 30000)
    with pytest.raises(GifError, match="huge.png: the image is larger than the 16,777,216 pixels"):
        load_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path)), seed=0)
