"""A user's own model and data: a validation set of their own (``x_val``/``y_val``, a ``val/``
folder, ``data.val_path``), the data contract's notes, and a deletion request on a model trained
outside the tool on all of its training data: every listed sample is removed."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gifcli.cli.main import app
from gifcli.config import apply_overrides, build_config
from gifcli.context import prepare
from gifcli.data import DataSplits, load_dataset, stratified_split
from gifcli.errors import GifError
from gifcli.report import smallest_step_chosen, summary_lines

ARCH = """
from torch import nn


def small_cnn(in_channels=1, num_classes=10):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, num_classes),
    )
"""


def digits_arrays() -> dict[str, np.ndarray]:
    """scikit-learn's digits as a user would store them: float32 in [0, 1], N x 1 x 8 x 8,
    with a validation set of their own."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, val, test = order[:1200], order[1200:1450], order[1450:]
    return {
        "x_train": x[train],
        "y_train": y[train],
        "x_val": x[val],
        "y_val": y[val],
        "x_test": x[test],
        "y_test": y[test],
    }


def config_of(*overrides: str):
    return build_config(apply_overrides({}, ["device=cpu", *overrides]))


def tensors_config(path, *overrides):
    return config_of("data.dataset=tensors", f"data.path={path}", *overrides)


def test_x_val_of_a_tensors_file_is_the_validation_split(tmp_path):
    arrays = digits_arrays()
    np.savez(tmp_path / "data.npz", **arrays)
    data = prepare(tensors_config(tmp_path / "data.npz")).data
    assert len(data.train) == 1200 and len(data.val) == 250  # nothing held out of x_train
    assert torch.equal(data.val.x, torch.from_numpy(arrays["x_val"]))
    assert data.full_train_size == 1200 and not data.val_held_out
    assert data.validation == f"x_val/y_val of {tmp_path / 'data.npz'} (250 samples)"


def test_without_a_validation_set_one_line_says_which_samples_are_held_out(tmp_path):
    arrays = digits_arrays()
    del arrays["x_val"], arrays["y_val"]
    np.savez(tmp_path / "data.npz", **arrays)
    data = prepare(tensors_config(tmp_path / "data.npz")).data
    assert len(data.train) + len(data.val) == 1200
    assert data.validation.startswith(
        "a stratified 10% of the training set held out (120 of 1,200 samples, drawn with seed 0)"
    )
    assert "\n" not in data.validation


def test_data_val_path_brings_a_validation_set_to_any_data_set(tmp_path):
    arrays = digits_arrays()
    np.savez(tmp_path / "val.npz", x_val=arrays["x_val"], y_val=arrays["y_val"])
    config = config_of(f"data.val_path={tmp_path / 'val.npz'}")  # digits
    data = load_dataset(config.data, seed=0)
    assert len(data.train) == 1438 and len(data.val) == 250
    # normalised like digits' own splits: (x - 0.3) / 0.4
    assert torch.allclose(data.val.x, (torch.from_numpy(arrays["x_val"]) - 0.3) / 0.4)
    np.savez(tmp_path / "bad.npz", x_val=arrays["x_val"][:, :, :4], y_val=arrays["y_val"])
    config = config_of(f"data.val_path={tmp_path / 'bad.npz'}")
    with pytest.raises(GifError, match="x_val images are 1 x 4 x 8 but the training"):
        load_dataset(config.data, seed=0)
    np.savez(tmp_path / "half.npz", x_val=arrays["x_val"])
    config = config_of(f"data.val_path={tmp_path / 'half.npz'}")
    with pytest.raises(GifError, match="missing key 'y_val'; a validation set needs x_val"):
        load_dataset(config.data, seed=0)


def test_a_val_folder_of_an_imagefolder_is_the_validation_split(tmp_path):
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (4, 4), color=40 * i).save(folder / f"{i}.png")
    config = config_of("data.dataset=imagefolder", f"data.root={tmp_path}")
    data = load_dataset(config.data, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 4, 4)
    assert data.validation == f"the images of {tmp_path / 'val'} (4 samples)"


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (255.0, "holds floats up to 255, which look like 0-255 pixels; float images are taken"),
        (-1.0, r"holds floats in \[-1, 0\], outside \[0, 1\]; float images are taken as they"),
        (1.0, None),
    ],
)
def test_float_images_outside_0_1_get_one_line(tmp_path, scale, message):
    arrays = digits_arrays()
    arrays["x_train"] = arrays["x_train"] * scale
    np.savez(tmp_path / "data.npz", **arrays)
    notes = load_dataset(tensors_config(tmp_path / "data.npz").data, seed=0).notes
    if message is None:
        assert notes == ()
    else:
        (note,) = notes
        assert note.startswith(f"{tmp_path / 'data.npz'}: x_train ")
        assert re.search(message, note)


def test_the_library_takes_a_validation_set_and_counts_only_train(tmp_path):
    arrays = {k: torch.from_numpy(v) for k, v in digits_arrays().items()}
    data = DataSplits.from_tensors(
        train=(arrays["x_train"], arrays["y_train"]),
        val=(arrays["x_val"], arrays["y_val"]),
        test=(arrays["x_test"], arrays["y_test"]),
    )
    assert len(data.train) == 1200 and data.full_train_size == 1200
    assert data.with_in_train(torch.arange(5)) == (data, 0)  # the user's split is never touched


def train_outside_the_tool(arrays: dict, folder) -> None:
    """What a user does: their own architecture, plain PyTorch on all of x_train, a .pt."""
    (folder / "own_arch.py").write_text(ARCH)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    x, y = torch.from_numpy(arrays["x_train"]), torch.from_numpy(arrays["y_train"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.save({"state_dict": model.state_dict()}, folder / "own.pt")


@pytest.mark.parametrize("own_val", [True, False], ids=["own-val", "tool-split"])
def test_a_deletion_request_on_an_own_model_removes_every_listed_sample(
    runner, tmp_path, monkeypatch, own_val
):
    torch.set_num_threads(1)
    arrays = digits_arrays()
    train_outside_the_tool(arrays, tmp_path)
    if not own_val:
        del arrays["x_val"], arrays["y_val"]
    np.savez(tmp_path / "data.npz", **arrays)
    monkeypatch.syspath_prepend(str(tmp_path))  # what PYTHONPATH does for the command
    listed = list(range(0, 1200, 24))  # 50 rows of x_train, some in the tool's split
    (tmp_path / "forget50.txt").write_text("".join(f"{i}\n" for i in listed))
    config = tmp_path / "own.yaml"
    config.write_text(
        f"model: {{arch: 'own_arch:small_cnn'}}\ncheckpoint: {tmp_path / 'own.pt'}\n"
        f"data: {{dataset: tensors, path: {tmp_path / 'data.npz'}}}\n"
    )
    overrides = ["device=cpu", "influence.hessian_samples=256", "influence.max_iter=5"]
    result = runner.invoke(
        app,
        [
            "remove-samples",
            str(config),
            *overrides,
            "update.grid_points=8",
            f"output.dir={tmp_path / 'out'}",
            "--indices",
            str(tmp_path / "forget50.txt"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["removal"]["samples"] == 50  # every listed sample, none dropped
    listing = tmp_path / "forget50.txt"
    assert report["removal"]["description"] == f"50 training samples: listed in {listing}"
    validation = report["removal"]["validation"]
    assert f"validation split: {validation}" in summary_lines(report)  # the terminal's line
    if own_val:
        assert report["removal"]["train_samples"] == 1200
        assert validation == f"x_val/y_val of {tmp_path / 'data.npz'} (250 samples)"
    else:
        _, held = stratified_split(torch.from_numpy(arrays["y_train"]), 0.1, seed=0)
        moved = len(set(listed) & set(held.tolist()))
        assert moved > 0
        assert report["removal"]["train_samples"] == 1200 - 120 + moved
        assert validation.endswith(
            f"{moved} of the listed samples were in it: they are taken out of it and removed "
            "with the others"
        )


def test_a_search_that_keeps_its_smallest_step_says_so():
    sweep = [{"relative_step": r} for r in (0.001, 0.01, 0.1)]
    update = {"chosen_by": "validation", "sweep": sweep, "relative_norm": 0.001}
    assert smallest_step_chosen(update)
    assert not smallest_step_chosen({**update, "relative_norm": 0.01})
    assert not smallest_step_chosen({**update, "chosen_by": "config"})
